"""Item-sequence and critique preprocessing, and the critique-string tables.

Critiques are text a model reads beside the item ids. Tasks carry them as int32 ids, one
per position of "items", into a per-dataset table of distinct strings, so a model encodes
each string once (e.g. with a frozen text encoder) and looks it up by id:

  kind "category"  FLARE category critiques: an item's category path truncated to its
                   first 4 levels ("precise") or first 2 ("broad"), levels joined by
                   " > ". One table holds both granularities, so precise, broad and
                   none tasks share a vocabulary and can be mixed.
  kind "regen"     REGEN critiques: the user's request that led from the previous item to
                   this one (sequences.parquet "critiques"); position t holds the
                   critique given with item t.

Tables are deterministic: id 0 is "" (no critique, also padding), then the distinct
non-empty strings in sorted order. They depend only on the prepared data and are cached
by its content hash.

The preprocessors here are deterministic lookups; they sit before
`seqio.CacheDatasetPlaceholder`. The stochastic step of these tasks (cloze masking) lives
in the feature converter, seeded by (seed, epoch, example_id).
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from recjax.data import vocab as _vocab
from recjax.data.prepared import PreparedDataset

_vocab.hide_accelerators_from_tf()

KINDS = ("category", "regen")
# Category levels kept by each FLARE critique granularity.
LEVELS = {"precise": 4, "broad": 2}
PATH_SEPARATOR = " > "
NO_CRITIQUE = 0
_AUTOTUNE = tf.data.AUTOTUNE


# --- critique tables ------------------------------------------------------------------


def category_critique(categories: Sequence[str] | None, levels: int) -> str:
  """The category critique of an item: its first `levels` category levels, or ""."""
  return PATH_SEPARATOR.join(categories[:levels]) if categories else ""


def critique_table(data_dir, kind: str) -> list[str]:
  """The critique strings of a prepared dataset; index = critique id, [0] = "".

  Args:
    data_dir: a prepared dataset directory.
    kind: "category" (truncated category paths, precise and broad) or "regen"
      (the distinct REGEN critique texts).

  Returns:
    A fresh list; entry 0 is "" and the rest are sorted and distinct.
  """
  return list(_table(*_key(data_dir, kind)))


def item_critique_ids(data_dir, granularity: str) -> np.ndarray:
  """int32 [vocab_size]: the category-critique id of every item id (0 for PAD, MASK and
  items without categories), at `granularity` "precise" or "broad"."""
  if granularity not in LEVELS:
    raise ValueError(f"unknown critique granularity {granularity!r}; expected one of {sorted(LEVELS)}")
  return _item_ids(*_key(data_dir, "category"), granularity)


def _key(data_dir, kind: str) -> tuple[str, str, str]:
  if kind not in KINDS:
    raise ValueError(f"unknown critique table kind {kind!r}; expected one of {KINDS}")
  ds = PreparedDataset(data_dir)
  return str(pathlib.Path(data_dir).resolve()), ds.content_hash, kind


@functools.lru_cache(maxsize=32)
def _table(data_dir: str, content_hash: str, kind: str) -> tuple[str, ...]:
  # The content hash in the key keeps a re-prepared directory from being served stale.
  del content_hash
  ds = PreparedDataset(data_dir)
  if kind == "category":
    paths = ds.items(["categories"]).column("categories").to_pylist()
    strings = {category_critique(p, n) for p in paths for n in LEVELS.values()}
  else:
    if not ds.has_field("critiques"):
      raise ValueError(f"{data_dir} has no 'critiques' column, so no REGEN critique table")
    col = ds.sequences(["critiques"]).column("critiques").combine_chunks()
    strings = set(col.values.drop_null().to_pylist())
  strings.discard("")
  return ("", *sorted(strings))


@functools.lru_cache(maxsize=32)
def _item_ids(data_dir: str, content_hash: str, kind: str, granularity: str) -> np.ndarray:
  index = {s: i for i, s in enumerate(_table(data_dir, content_hash, kind))}
  ds = PreparedDataset(data_dir)
  table = ds.items(["item_id", "categories"])
  out = np.zeros(ds.vocab_size, np.int32)
  ids = table.column("item_id").to_numpy()
  out[ids] = [index[category_critique(p, LEVELS[granularity])]
              for p in table.column("categories").to_pylist()]
  out.setflags(write=False)  # shared by every caller through the cache
  return out


class CritiqueVocabulary(seqio.Vocabulary):
  """Critique ids as a seqio vocabulary over a critique table (id 0 = "" = none / PAD).

  The feature is per position, so a "string" is the critiques of a sequence joined by
  " | ": `decode([3, 0, 5]) == "a > b |  | c > d"`, and `encode` inverts it. `table`
  gives the strings themselves, for models that embed critique text by id.

  Built from a prepared dataset, the table loads lazily (registering a task reads no
  parquet) and two vocabularies are equal when their tables are, so tasks over the same
  table (precise / broad / none) can form a seqio Mixture.
  """

  SEPARATOR = " | "

  def __init__(self, data_dir=None, kind: str = "category", *, table: Sequence[str] | None = None):
    super().__init__(extra_ids=0)
    if (data_dir is None) == (table is None):
      raise ValueError("CritiqueVocabulary needs exactly one of data_dir (with kind) or table")
    if table is not None:
      table = tuple(table)
      if not table or table[0] != "" or len(set(table)) != len(table):
        raise ValueError("a critique table starts with '' (id 0) and has distinct strings")
      self._source = ("table", hashlib.sha256("\0".join(table).encode()).hexdigest())
    else:
      self._source = _key(data_dir, kind)  # (dir, content hash, kind); validates kind
    self._strings = table
    self._tf = None

  @property
  def table(self) -> tuple[str, ...]:
    if self._strings is None:
      self._strings = _table(*self._source)
    return self._strings

  @property
  def kind(self) -> str | None:
    return self._source[2] if len(self._source) == 3 else None

  def lookup(self, i: int) -> str:
    return self.table[i]

  # --- seqio.Vocabulary ---------------------------------------------------------------

  @property
  def _base_vocab_size(self) -> int:
    return len(self.table)

  @property
  def pad_id(self) -> int:
    return NO_CRITIQUE

  @property
  def eos_id(self) -> int | None:
    return None

  @property
  def unk_id(self) -> int | None:
    return None

  def _index(self) -> Mapping[str, int]:
    return {s: i for i, s in enumerate(self.table)}

  def _encode(self, s: str) -> Sequence[int]:
    index = self._index()
    out = []
    for part in s.split(self.SEPARATOR):
      if part not in index:
        raise ValueError(f"{part!r} is not in the critique table ({len(self.table)} strings)")
      out.append(index[part])
    return out

  def _decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(self.table)]
    if bad:
      raise ValueError(f"critique id {bad[0]} is outside the table [0, {len(self.table)})")
    return self.SEPARATOR.join(self.table[i] for i in ids)

  def _tf_tables(self):
    if self._tf is None:
      with tf.init_scope():  # must outlive whichever tf.function asks first
        strings = tf.constant(self.table, tf.string)
        to_id = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(strings, tf.range(len(self.table), dtype=tf.int32)), -1)
      self._tf = (to_id, strings)
    return self._tf

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    to_id, _ = self._tf_tables()
    return _checked(to_id.lookup(tf.strings.split(s, sep=self.SEPARATOR)), "critique not in the table")

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    _, strings = self._tf_tables()
    return tf.strings.reduce_join(tf.gather(strings, ids), axis=-1, separator=self.SEPARATOR)

  def __eq__(self, other):
    return isinstance(other, CritiqueVocabulary) and self._identity() == other._identity()

  def __hash__(self):
    return hash(self._identity())

  def _identity(self):
    # Same content hash and kind = same table, wherever the directory lives.
    return self._source[1:]

  def __repr__(self):
    return f"CritiqueVocabulary({self._source[0] if self.kind else 'table'}, kind={self.kind})"


def _checked(ids: tf.Tensor, message: str) -> tf.Tensor:
  ok = tf.reduce_all(ids >= 0)
  with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
    return tf.identity(ids)


# --- preprocessors (deterministic; place before seqio.CacheDatasetPlaceholder) ----------


def _map(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  # Plain TF without Python control flow: skipping autograph makes building faster.
  return ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=_AUTOTUNE)


def add_category_critiques(ds: tf.data.Dataset, *, data_dir, granularity: str,
                           output_key: str = "critiques") -> tf.data.Dataset:
  """Adds int32 [n] `output_key`: the category-critique id of each item in "items"."""
  table = tf.constant(item_critique_ids(data_dir, granularity))
  return _map(ds, lambda ex: {**ex, output_key: tf.gather(table, ex["items"])})


def no_critiques(ds: tf.data.Dataset, *, output_key: str = "critiques") -> tf.data.Dataset:
  """Adds int32 [n] `output_key` of zeros: the no-critique baseline, same features."""
  return _map(ds, lambda ex: {**ex, output_key: tf.zeros_like(ex["items"])})


def encode_critique_strings(ds: tf.data.Dataset, *, data_dir, kind: str = "regen", input_key: str = "critiques",
                            output_key: str = "critiques") -> tf.data.Dataset:
  """Replaces per-step critique strings by their ids in the dataset's `kind` table."""
  to_id, _ = CritiqueVocabulary(data_dir, kind)._tf_tables()

  def encode(ex):
    ids = _checked(to_id.lookup(ex[input_key]), f"a critique of {data_dir} is not in its {kind} table")
    return {**ex, output_key: ids}

  return _map(ds, encode)


# --- semantic IDs -------------------------------------------------------------------------


def to_semantic_ids(ds: tf.data.Dataset, *, tokens_fn) -> tf.data.Dataset:
  """(history, target) item ids -> semantic-ID tokens.

  `tokens_fn()` returns the int32 [vocab, L] table of every item id's L tokens (rows of
  PAD / MASK are never looked up); it is called when the dataset is built, so registering
  a task reads no artifact. Output: "inputs" (the history's tokens, flattened, oldest item
  first), "targets" (the next item's L tokens), "target_item", and every other feature of
  the source ("history" item ids, "user_id", "example_id", preference features...).
  """
  table = tf.constant(np.asarray(tokens_fn(), np.int32))

  def fn(ex):
    out = {k: v for k, v in ex.items() if k != "target"}
    out.update(inputs=tf.reshape(tf.gather(table, ex["history"]), [-1]), targets=tf.gather(table, ex["target"]),
               target_item=ex["target"])
    return out

  return _map(ds, fn)


# --- preference texts (Mender_Tok) --------------------------------------------------------


def preference_text(history, preferences, statements, titles) -> str:
  """One row's text: "Preference: s1; s2. History: title_n; title_{n-1}; ..." with the
  history newest first, so that cutting the tokens drops the oldest items. `history`:
  item ids (0 = padding), `preferences`: statement ids (-1 = empty)."""
  said = "; ".join(statements[i].strip().rstrip(".") for i in preferences if i >= 0)
  h = np.asarray(history)
  names = "; ".join(titles[i].strip() or f"item {i}" for i in h[h > 0][::-1])
  return f"Preference: {said}. History: {names}" if said else f"History: {names}"
