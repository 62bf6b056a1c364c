"""Text-to-text preprocessing: ReAT recommendation tasks and REGEN narrative tasks.

Every text task runs the same pipeline (registered by `recjax.tasks.text`):

  text_source              one row per user and split, plus "all_windows"
  window                   sliding windows: history (<= 20 items) -> target   deterministic
  CacheDatasetPlaceholder  windows are what an offline (seqio / Beam) cache stores
  <task>                   negatives, masks, spans; render the prompt, tokenize,
                           fit the inputs length                              per (seed, epoch, example)
  append_eos_after_trim

Rendering needs `sequence_length` (histories are cut at item boundaries, oldest first,
so the question and the newest items always survive), and seqio forbids that before the
cache, so everything after windowing is post-cache.

Randomness is stateless: each example draws from a key folded from (seqio seed, task salt,
epoch, example_id), never from dataset position, so shuffling, sharding, re-runs and
resumes see identical draws. `recjax.data.pipeline` passes a different seqio seed per
epoch (and an "epoch" feature, when present, is folded in too), so draws are fresh every
epoch. Without a seed (plain `task.get_dataset(seed=None)`) seed 0 is used: data stay
deterministic, and with seqio's own `num_epochs > 1` every epoch repeats the same draws.

Example ids: window (user u, target position t in the user's full sequence) has
example_id = u * 2**32 + t, unique across windows and splits.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import pathlib
import re
import string
from typing import Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from recjax.data import sources
from recjax.data import vocab as _vocab
from recjax.data.formats.common import NARRATIVE_FIELDS
from recjax.data.prepared import PreparedDataset

_vocab.hide_accelerators_from_tf()

_AUTOTUNE = tf.data.AUTOTUNE
_ALG = "philox"


def _map(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  # The functions are plain TF (no Python control flow on tensors): skipping autograph
  # makes building a task's dataset several times faster.
  return ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=_AUTOTUNE)


def _filter(ds: tf.data.Dataset, fn) -> tf.data.Dataset:
  return ds.filter(tf.autograph.experimental.do_not_convert(fn))

HISTORY_LENGTH = 20  # ReAT sliding window
NUM_NEGATIVES = 99  # ranking: 1 positive + 99 negatives
MIM_RATE = 0.2
MLM_NOISE_DENSITY = 0.15
MLM_MEAN_SPAN = 3.0
MASKED_ITEM = "[masked item]"
ITEM_PLACEHOLDER = "<item>"
LIKE, DISLIKE = "yes", "no"  # rating target: rating > 3
_SALT = {"ranking": 1, "mim": 2, "mlm": 3, "bpr": 4}

# --- prompt templates ----------------------------------------------------------------
# `{history}` is the rendered items joined by "; "; the text right after `{history}` up
# to the next space ends the list. Every template is plain `str.format` text, so
# `TEMPLATE.format(...)` gives exactly what the tasks produce.

ITEM_TEMPLATE = "Item ID: {short_id}, Title: {title}"
RETRIEVAL_TEMPLATE = ("Here is the purchase history of a user, oldest first: {history}. "
                      "Predict the next item the user will buy. Answer with its item ID.")
RANKING_TEMPLATE = ("Here is the purchase history of a user, oldest first: {history}. "
                    "Candidates: {candidates}. Which candidate will the user buy next? "
                    "Answer with its item ID.")
RATING_TEMPLATE = ("Here is the purchase history of a user, oldest first: {history}. "
                   "Will the user like {item}? Answer yes or no.")
MIM_TEMPLATE = ("Here is the purchase history of a user, oldest first, with some items hidden as "
                "[masked item]: {history}. Recover the hidden items in order. Answer with their item IDs.")
BPR_TEMPLATE = ("Here is the purchase history of a user, oldest first: {history}. "
                "Which of these two items will the user buy next? A: {option_a}. B: {option_b}. "
                "Answer with its item ID.")
MLM_TEMPLATE = "{history}."  # span corruption over the window's rendered items, no instruction

# REGEN. History items are "[User: <critique> ]Item: <item> <title> (<category>)"; the
# `<item>` placeholders line up with the "inputs_item_ids" feature.
LUMEN_ITEM_TEMPLATE = "Item: {placeholder} {title}"
LUMEN_TEMPLATE = ("Shopping history, oldest first: {history}. {request}"
                  "Recommend the next item and {instruction}.")
LUMEN_TARGET_TEMPLATE = "ID: {placeholder} Text: {narrative}"
NARRATIVE_TEMPLATE = ("Shopping history, oldest first: {history}. {request}"
                      "The next item is {next_item}. {instruction}.")
REQUEST_TEMPLATE = "User: {critique} "  # the critique that led to the target, when present

# Narrative -> (column, LUMEN instruction, narrative-only instruction).
NARRATIVES = {
    "purchase_reason": ("purchase_reason", "give the reason for the purchase",
                        "Give the reason the user bought it"),
    "explanation": ("explanation", "explain the recommendation", "Explain why it suits the user"),
    "brief_summary": ("brief_summary", "briefly summarize the user's preferences",
                      "Briefly summarize the user's preferences"),
    "long_summary": ("long_summary", "summarize the user's purchase history in detail",
                     "Summarize the user's purchase history in detail"),
    "profile": ("profile", "describe the user's shopping profile", "Describe the user's shopping profile"),
    "endorsement": ("endorsements", "write an endorsement of it for the user",
                    "Write an endorsement of it for the user"),
}
PER_USER_NARRATIVES = NARRATIVE_FIELDS  # about the user's last purchase (REGEN)

_ALL_TEMPLATES = (ITEM_TEMPLATE, RETRIEVAL_TEMPLATE, RANKING_TEMPLATE, RATING_TEMPLATE, MIM_TEMPLATE,
                  BPR_TEMPLATE, LUMEN_ITEM_TEMPLATE, LUMEN_TEMPLATE, LUMEN_TARGET_TEMPLATE,
                  NARRATIVE_TEMPLATE, REQUEST_TEMPLATE)


def _clean(text: str | None) -> str:
  return " ".join(str(text).split()) if text else ""


def _clean_tf(text: tf.Tensor) -> tf.Tensor:
  # One space between words, none at the ends: pieces then tokenize the same alone or joined.
  return tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))


# --- the catalog as string / number tables ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Catalog:
  """Per-item tables indexed by item id (0 = PAD and 1 = MASK hold empty strings / 0)."""

  short_ids: np.ndarray  # "I123"
  titles: np.ndarray  # title, else the deepest category, else "unknown item"
  categories: np.ndarray  # deepest category or ""
  item_text: np.ndarray  # ITEM_TEMPLATE
  train_count: np.ndarray  # int64, popularity for negatives (training portion only)
  num_items: int

  def lumen_text(self, placeholder: str) -> np.ndarray:
    out = np.empty(len(self.titles), object)
    for i, (title, cat) in enumerate(zip(self.titles, self.categories)):
      if i >= _vocab.NUM_RESERVED:
        text = LUMEN_ITEM_TEMPLATE.format(placeholder=placeholder, title=title)
        out[i] = f"{text} ({cat})" if cat and cat != title else text
      else:
        out[i] = ""
    return out


@functools.lru_cache(maxsize=16)
def _catalog(data_dir: str, content_hash: str) -> Catalog:
  del content_hash  # part of the key: a re-prepared dataset is re-read
  ds = PreparedDataset(data_dir)
  t = ds.items(["item_id", "short_id", "title", "categories", "train_count"]).to_pydict()
  size = ds.vocab_size
  short = np.full(size, "", object)
  titles = np.full(size, "", object)
  cats = np.full(size, "", object)
  count = np.zeros(size, np.int64)
  for i, s, title, c, n in zip(t["item_id"], t["short_id"], t["title"], t["categories"], t["train_count"]):
    short[i] = s
    cats[i] = _clean(c[-1]) if c else ""
    titles[i] = _clean(title) or cats[i] or "unknown item"
    count[i] = n
  text = np.full(size, "", object)
  for i in range(_vocab.NUM_RESERVED, size):
    text[i] = ITEM_TEMPLATE.format(short_id=short[i], title=titles[i])
  return Catalog(short, titles, cats, text, count, ds.num_items)


def catalog(data_dir) -> Catalog:
  ds = PreparedDataset(data_dir)
  return _catalog(str(ds.data_dir), ds.content_hash)


@functools.lru_cache(maxsize=16)
def _user_items(data_dir: str, content_hash: str) -> tuple[np.ndarray, np.ndarray]:
  """(values, row_splits) of every user's full sequence, row = user id."""
  del content_hash
  col = PreparedDataset(data_dir).sequences(["items"]).column("items").combine_chunks()
  return (np.asarray(col.values.to_numpy(zero_copy_only=False), np.int32),
          np.asarray(col.offsets, np.int64))


# --- the SentencePiece vocabulary of a prepared dataset -----------------------------

DEFAULT_VOCAB_SIZE = 8000
_PLACEHOLDER_PIECE = "\u2581" + ITEM_PLACEHOLDER  # one piece, like T5's "▁<extra_id_0>"
_MAX_SENTENCES = 2_000_000


def sentencepiece_corpus(data_dir) -> Iterator[str]:
  """The text a dataset's SentencePiece model is trained on, in a fixed order.

  Template wording, then per item (by id) the rendered item, description, brand and
  category path, then per user (by id) critiques, endorsements and narratives. Reviews
  are left out: no task shows them, and they would dominate the corpus.
  """
  literals = [lit for tpl in _ALL_TEMPLATES for lit, *_ in string.Formatter().parse(tpl)]
  literals += [MASKED_ITEM, LIKE, DISLIKE, " ".join("0123456789")]
  literals += [i for _, (_, a, b) in NARRATIVES.items() for i in (a, b)]
  yield from (_clean(x) for x in literals if _clean(x))
  ds = PreparedDataset(data_dir)
  cat = catalog(data_dir)
  items = ds.items(["item_id", "description", "brand", "categories"]).to_pydict()
  for i, desc, brand, cats in zip(items["item_id"], items["description"], items["brand"], items["categories"]):
    yield cat.item_text[i]
    for text in (desc, brand, " > ".join(cats or [])):
      if _clean(text):
        yield _clean(text)
  columns = [c for c in ("critiques", "endorsements", *NARRATIVE_FIELDS) if ds.has_field(c)]
  if columns:
    for batch in ds.iter_sequences(columns):
      for row in batch.to_pylist():
        for c in columns:
          values = row[c] if isinstance(row[c], list) else [row[c]]
          yield from (_clean(v) for v in values if _clean(v))


def train_dataset_sentencepiece(data_dir, model_prefix, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """Trains SentencePiece on a prepared dataset's text; returns the `.model` path.

  Deterministic: the same dataset gives a byte-identical model. Unigram, T5 ids (pad 0,
  eos 1, unk 2), digits split (short ids "I123" tokenize as "▁I" + digits, uniformly),
  byte fallback (no unk for unseen characters at test time), and `<item>` kept as one
  piece for the REGEN placeholders. `vocab_size` is an upper bound, so small datasets
  still train. Load with `load_sentencepiece(path)` (adds T5's 100 sentinels).
  """
  return _vocab.train_sentencepiece(
      sentencepiece_corpus(data_dir), model_prefix, vocab_size=vocab_size,
      input_sentence_size=_MAX_SENTENCES, byte_fallback=True, user_defined_symbols=[_PLACEHOLDER_PIECE],
      hard_vocab_limit=False, split_digits=True)


def dataset_sentencepiece_path(data_dir, vocab_size: int = DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Where a dataset's model lives: DATA_DIR/vocab/spm_<size>_<hash>.model, or a user cache.

  <hash> is the start of the dataset's content hash, so a dataset re-prepared in place
  gets a fresh model. The cache ($RECJAX_CACHE_DIR, else ~/.cache/recjax) is used when
  the dataset directory is read-only.
  """
  ds = PreparedDataset(data_dir)
  digest = ds.content_hash.split(":")[-1][:12]
  local = ds.data_dir / "vocab" / f"spm_{vocab_size}_{digest}.model"
  if local.is_file() or os.access(ds.data_dir, os.W_OK):
    return local
  root = pathlib.Path(os.environ.get("RECJAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "recjax"))
  return root / "vocab" / local.name


def ensure_dataset_sentencepiece(data_dir, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """The dataset's model path, training it first if absent (once, under a file lock)."""
  path = dataset_sentencepiece_path(data_dir, vocab_size)
  if path.is_file():
    return str(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # other processes wait, then find the model
    if not path.is_file():
      tmp = path.parent / f".{path.stem}.{os.getpid()}"
      model = train_dataset_sentencepiece(data_dir, tmp, vocab_size)
      os.replace(str(tmp) + ".vocab", path.with_suffix(".vocab"))
      os.replace(model, path)  # last: the .model appearing means training finished
  return str(path)


@gin.configurable
def text_vocabulary_options(spm_model: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
  """Gin knobs of text tasks' vocabularies, read when a vocabulary is first used.

  Args:
    spm_model: an existing SentencePiece `.model` (e.g. T5's) used for every dataset
      instead of one trained on the dataset.
    vocab_size: size of the dataset-trained model (an upper bound).

  Returns:
    (spm_model, vocab_size).
  """
  return spm_model, vocab_size


class DatasetVocabulary(seqio.SentencePieceVocabulary):
  """SentencePiece (plus T5's 100 sentinels) for a prepared dataset's text tasks.

  Resolved on first use, not at registration, so registering tasks stays cheap and gin
  bindings of `text_vocabulary_options` parsed after the tasks were registered still
  apply: an explicit `spm_model` (argument, else gin), else the dataset's own model
  (trained on first use, see `ensure_dataset_sentencepiece`).
  """

  def __init__(self, data_dir, spm_model: str | None = None, vocab_size: int | None = None,
               extra_ids: int = _vocab.T5_EXTRA_IDS):
    super().__init__("", extra_ids=extra_ids)
    self._data_dir = os.fspath(data_dir)
    self._spm_model = spm_model
    self._spm_vocab_size = vocab_size

  def _model_context(self):
    if not self._sentencepiece_model_file:
      gin_model, gin_size = text_vocabulary_options()
      model = self._spm_model or gin_model
      if model:
        _vocab.load_sentencepiece(model, self._extra_ids)  # clear errors: missing file, pad id
      else:
        model = ensure_dataset_sentencepiece(self._data_dir, self._spm_vocab_size or gin_size)
      self._sentencepiece_model_file = model
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file

  @property
  def item_placeholder_id(self) -> int:
    """The `<item>` token the LUMEN / narrative tasks pair with their item ids."""
    return item_placeholder_id(self)

  def __repr__(self):
    return f"DatasetVocabulary({self._data_dir!r}, file={self._sentencepiece_model_file or '<on first use>'})"


def text_vocabulary(data_dir, spm_model: str | None = None, vocab_size: int | None = None):
  """The vocabulary of a dataset's text tasks: one shared object per (dataset content,
  options), so every task's features compare equal and mix."""
  ds = PreparedDataset(data_dir)
  return _text_vocabulary(str(ds.data_dir), ds.content_hash, spm_model, vocab_size)


@functools.lru_cache(maxsize=None)
def _text_vocabulary(data_dir: str, content_hash: str, spm_model, vocab_size):
  del content_hash  # part of the key only
  return DatasetVocabulary(data_dir, spm_model, vocab_size)


def item_placeholder(vocabulary: seqio.SentencePieceVocabulary) -> str:
  """The placeholder token of REGEN histories: `<item>` when the model has it as one piece
  (dataset-trained models do), else the last sentinel `<extra_id_{extra_ids-1}>` (e.g. T5's
  model), which then never serves as an MLM sentinel (see `_mlm_max_tokens`)."""
  if vocabulary.tokenizer.PieceToId(_PLACEHOLDER_PIECE) != vocabulary.tokenizer.unk_id():
    return ITEM_PLACEHOLDER
  if not vocabulary.extra_ids:
    raise ValueError(f"{vocabulary}: no single-piece {ITEM_PLACEHOLDER} and no extra ids for a placeholder")
  return f"<extra_id_{vocabulary.extra_ids - 1}>"


def item_placeholder_id(vocabulary: seqio.SentencePieceVocabulary) -> int:
  """Token id a model swaps for item embeddings (one per "inputs_item_ids" entry): the piece
  "▁" + placeholder, which the templates always put after a space. Read as a piece, not
  by encoding the bare placeholder: a model without a dummy prefix (Gemma's tokenizer.model)
  splits a bare `<extra_id_99>` into bytes, though it reads " <extra_id_99>" as one piece."""
  placeholder = item_placeholder(vocabulary)
  piece = vocabulary.tokenizer.PieceToId("\u2581" + placeholder)
  if piece == vocabulary.tokenizer.unk_id():
    raise ValueError(f"{vocabulary}: the placeholder {placeholder} is not one piece")
  return piece


# --- source ----------------------------------------------------------------------------

_SPLIT_BUCKETS = 10  # per-user narratives: bucket 0 -> test, 1 -> validation, 2..9 -> train
_BUCKET_SPLIT = {"test": 0, "validation": 1}


def narrative_split_of_users(user_ids) -> np.ndarray:
  """Split ("train" / "validation" / "test") of each user for per-user narrative tasks:
  a FarmHash of the user id, 80 / 10 / 10, stable across machines and runs."""
  bucket = tf.strings.to_hash_bucket_fast(tf.strings.as_string(user_ids), _SPLIT_BUCKETS).numpy()
  return np.where(bucket == 0, "test", np.where(bucket == 1, "validation", "train"))


def _user_bucket(user_id: tf.Tensor) -> tf.Tensor:
  return tf.strings.to_hash_bucket_fast(tf.strings.as_string(user_id), _SPLIT_BUCKETS)


def text_source(data_dir, columns: Sequence[str] = ("items",), per_user: bool = False) -> seqio.DataSource:
  """A seqio source for text tasks: `sources.prepared_source` rows plus "all_windows".

  per_user=False (leave-one-out, every task but per-user narratives): the split's rows;
    "all_windows" is True for train (every position is a target), else only the last.
  per_user=True (narratives about the last purchase): users are partitioned 80/10/10
    (`narrative_split_of_users`) and each split holds its users' full sequences, with
    the last item as the only target.
  """
  base = sources.prepared_source(data_dir, columns)
  dataset = PreparedDataset(data_dir)

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # order is the user order; seqio shuffles after preprocessing
    if split not in sources.SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {sources.SPLITS}")
    if not per_user:
      ds = base.get_dataset(split, shuffle=False)
      return _map(ds, lambda ex: {**ex, "all_windows": tf.constant(split == "train")})
    ds = base.get_dataset("test", shuffle=False)
    if split == "train":
      ds = _filter(ds, lambda ex: _user_bucket(ex["user_id"]) >= len(_BUCKET_SPLIT))
    else:
      ds = _filter(ds, lambda ex: tf.equal(_user_bucket(ex["user_id"]), _BUCKET_SPLIT[split]))
    return _map(ds, lambda ex: {**ex, "all_windows": tf.constant(False)})

  if per_user:
    split_of = narrative_split_of_users(np.arange(dataset.num_users))
    counts = {s: int((split_of == s).sum()) for s in sources.SPLITS}
  else:
    counts = {s: dataset.num_users for s in sources.SPLITS}
  return seqio.FunctionDataSource(dataset_fn, splits=sources.SPLITS, num_input_examples=counts)


# --- windowing (deterministic, before the cache) --------------------------------------


def window(ds: tf.data.Dataset, max_history: int = HISTORY_LENGTH) -> tf.data.Dataset:
  """One example per target position: the previous `max_history` items -> the target.

  all_windows (train): targets at every position t >= 1 of the split's items; otherwise
  only the last item is the target. Output features: user_id, example_id
  (user_id * 2**32 + t), position (t), history int32 [h], target int32 [], and, when the
  row has them, target_rating, history_critiques [h] / target_critique,
  target_endorsement, the per-user narratives and epoch.
  """
  if "all_windows" not in ds.element_spec:
    raise ValueError("window() needs the 'all_windows' feature of preprocessors.text_source "
                     f"(got {sorted(ds.element_spec)})")

  def split_windows(ex):
    items = ex["items"]
    n = tf.size(items)
    t = tf.range(tf.where(ex["all_windows"], 1, n - 1), n)
    w = tf.size(t)
    past = tf.ragged.range(tf.maximum(t - max_history, 0), t)
    out = {
        "user_id": tf.fill([w], ex["user_id"]),
        "example_id": tf.cast(ex["user_id"], tf.int64) * (1 << 32) + tf.cast(t, tf.int64),
        "position": t,
        "history": tf.gather(items, past),
        "target": tf.gather(items, t),
    }
    if "ratings" in ex:
      out["target_rating"] = tf.gather(ex["ratings"], t)
    if "critiques" in ex:
      out["history_critiques"] = tf.gather(ex["critiques"], past)
      out["target_critique"] = tf.gather(ex["critiques"], t)
    if "endorsements" in ex:
      out["target_endorsement"] = tf.gather(ex["endorsements"], t)
    for k in (*NARRATIVE_FIELDS, "epoch"):
      if k in ex:
        out[k] = tf.fill([w], ex[k])
    return out

  ds = _map(ds, split_windows).unbatch()
  # unbatch leaves ragged specs of rank 1; make them plain tensors for caching / seqio.
  return _map(ds, lambda ex: {k: tf.identity(v) for k, v in ex.items()})


# --- deterministic randomness ----------------------------------------------------------


def _stream_seed() -> int:
  """The seed seqio's get_dataset(seed=...) set for this preprocessing pass (0 if none)."""
  seed = getattr(seqio.utils, "_NEXT_MAP_SEED", None)
  return 0 if seed is None else int(seed)


def example_key(seed: int, salt: int, epoch, example_id) -> tf.Tensor:
  """Philox key of one example: a function of (seed, salt, epoch, example_id) only."""
  key = tf.constant([seed, salt], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64), alg=_ALG)
  return tf.random.experimental.stateless_fold_in(key, tf.cast(example_id, tf.int64), alg=_ALG)


def _keys(key: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(key, n, alg=_ALG))


def _example_key(ex, seed: int, task: str) -> tf.Tensor:
  return example_key(seed, _SALT[task], ex.get("epoch", 0), ex["example_id"])


def popularity_logits(train_count: np.ndarray) -> np.ndarray:
  """Gumbel-top-k logits: log(count); never-trained items rank after every trained one;
  PAD / MASK can never be drawn."""
  logits = np.where(train_count > 0, np.log(np.maximum(train_count, 1)), -1e4).astype(np.float32)
  logits[:_vocab.NUM_RESERVED] = -np.inf
  return logits


def sample_negatives(key: tf.Tensor, logits: tf.Tensor, exclude: tf.Tensor, k: int) -> tf.Tensor:
  """Up to k distinct items drawn by popularity without replacement, none in `exclude`.

  Gumbel-top-k: the top k of logits + Gumbel noise is a popularity-weighted sample
  without replacement. Returns fewer than k (all that remain, in random order) when the
  catalog has fewer than k items outside `exclude`.
  """
  size = logits.shape[0]
  u = tf.random.stateless_uniform([size], key, minval=1e-20, maxval=1.0, alg=_ALG)
  scores = logits - tf.math.log(-tf.math.log(u))
  hit = tf.scatter_nd(tf.cast(exclude[:, None], tf.int32), tf.ones_like(exclude, tf.int32), [size]) > 0
  scores = tf.where(hit, -np.inf, scores)
  available = tf.reduce_sum(tf.cast(scores > -np.inf, tf.int32))
  top = tf.math.top_k(scores, min(k, size)).indices
  return top[:tf.minimum(available, k)]


def _user_history(data_dir: str) -> tf.RaggedTensor:
  ds = PreparedDataset(data_dir)
  values, splits = _user_items(str(ds.data_dir), ds.content_hash)
  return tf.RaggedTensor.from_row_splits(tf.constant(values), tf.constant(splits))


def _shuffle(key: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  return tf.gather(x, tf.argsort(tf.random.stateless_uniform(tf.shape(x)[:1], key, alg=_ALG)))


def mask_positions(key: tf.Tensor, n: tf.Tensor, rate: float = MIM_RATE) -> tf.Tensor:
  """bool [n]: exactly max(1, round(rate * n)) positions, uniformly chosen."""
  m = tf.maximum(1, tf.cast(tf.floor(rate * tf.cast(n, tf.float32) + 0.5), tf.int32))
  u = tf.random.stateless_uniform([n], key, alg=_ALG)
  chosen = tf.math.top_k(u, tf.minimum(m, n)).indices
  return tf.scatter_nd(chosen[:, None], tf.ones_like(chosen), [n]) > 0


# --- span corruption (T5) ----------------------------------------------------------------


def _random_segmentation(key, num_items, num_segments):
  """Lengths [num_segments] (each >= 1) of a uniformly random split of num_items."""
  first = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  first = _shuffle(key, first)
  first = tf.pad(first, [[1, 0]])
  segment_id = tf.cumsum(first)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def span_noise_counts(length: int, noise_density: float = MLM_NOISE_DENSITY,
                      mean_span: float = MLM_MEAN_SPAN) -> tuple[int, int]:
  """(noise tokens, noise spans) of T5's span corruption for a sequence of `length`."""
  noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return noise, max(int(round(noise / mean_span)), 1)


def span_noise_mask(key: tf.Tensor, length: tf.Tensor, noise_density: float = MLM_NOISE_DENSITY,
                    mean_span: float = MLM_MEAN_SPAN) -> tf.Tensor:
  """bool [length]: T5's random_spans_noise_mask with stateless randomness.

  round(length * density) noise tokens (at least 1, at most length - 1) in
  round(noise / mean_span) spans (at least 1), alternating with as many non-noise
  spans; the sequence starts with non-noise. Needs length >= 2.
  """
  lf = tf.cast(length, tf.float32)
  noise = tf.clip_by_value(tf.cast(tf.round(lf * noise_density), tf.int32), 1, length - 1)
  spans = tf.maximum(tf.cast(tf.round(tf.cast(noise, tf.float32) / mean_span), tf.int32), 1)
  k1, k2 = _keys(key, 2)
  noise_lengths = _random_segmentation(k1, noise, spans)
  keep_lengths = _random_segmentation(k2, length - noise, spans)
  interleaved = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
  starts = tf.cumsum(interleaved)[:-1]
  indicator = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length)
  return tf.equal(tf.math.floormod(tf.cumsum(indicator), 2), 1)


def _spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Each masked span -> one sentinel (<extra_id_0>, 1, ... = vocab_size - 1, - 2, ...)."""
  prev = tf.pad(mask[:-1], [[1, 0]])
  first = mask & ~prev
  sentinel = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  return tf.boolean_mask(tf.where(first, sentinel, tokens), ~(mask & prev))


def span_corrupt(tokens: tf.Tensor, key: tf.Tensor, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """T5 span corruption: (inputs with one sentinel per noise span, targets = sentinel +
  span for each span, then a final sentinel)."""
  mask = span_noise_mask(key, tf.size(tokens))
  return _spans_to_sentinels(tokens, mask, vocab_size), _spans_to_sentinels(tokens, ~mask, vocab_size)


def _mlm_max_tokens(inputs_len: int | None, targets_len: int | None, max_sentinels: int) -> int | None:
  """Longest text whose corruption fits both lengths (with EOS) and the sentinel budget."""
  if not inputs_len and not targets_len:
    return None
  n = (inputs_len or 1 << 16) - 1
  while n > 2:
    noise, spans = span_noise_counts(n)
    if (spans <= max_sentinels and n - noise + spans + 1 <= (inputs_len or n + spans + 1)
        and noise + spans + 1 <= (targets_len or noise + spans + 1)):
      return n
    n -= 1
  return 2


# --- rendering ----------------------------------------------------------------------------


class _Template:
  """A prompt template split around its `{history}` list, for item-boundary truncation.

  head / tail are `str.format` pieces around the list; `terminator` is the text right
  after `{history}` (up to the next space), attached to the last history item.
  Joining head, the items (each but the last followed by ";") and tail with single
  spaces reproduces `template.format(history="; ".join(items), ...)`.
  """

  def __init__(self, template: str):
    head, tail = template.split("{history}")
    if head and not head.endswith(" "):
      raise ValueError(f"template {template!r}: {{history}} must follow a space")
    match = re.match(r"(\S*)( ?)(.*)\Z", tail, re.S)
    self.template = template
    self.head = head[:-1]
    self.terminator, self.tail = match.group(1), match.group(3)

  @staticmethod
  def _format(piece: str, values: Mapping[str, tf.Tensor | str]) -> tf.Tensor:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(piece):
      parts.append(literal)
      if field is not None:
        parts.append(values[field])
    return tf.strings.join(parts) if parts else tf.constant("")


def _encode_rows(vocabulary, strings: tf.Tensor) -> tf.RaggedTensor:
  toks = vocabulary.encode_tf(strings)
  if not isinstance(toks, tf.RaggedTensor):
    toks = tf.RaggedTensor.from_tensor(toks)
  return tf.cast(toks, tf.int32)


def _keep_last(lengths: tf.Tensor, budget) -> tf.Tensor:
  """How many trailing entries fit in `budget` tokens (their sum)."""
  if budget is None:
    return tf.size(lengths)
  return tf.reduce_sum(tf.cast(tf.cumsum(lengths, reverse=True) <= budget, tf.int32))


def _max_len(sequence_length, key: str) -> int | None:
  return int(sequence_length[key]) if sequence_length and sequence_length.get(key) else None


def _render(vocabulary, template: _Template, segments: tf.Tensor, values: Mapping, max_len: int | None,
            alternatives: tf.Tensor | None = None, use_alternative: tf.Tensor | None = None):
  """(token ids, text, kept) of `template` with the newest items of `segments` that fit.

  Items are dropped oldest first until head + items + tail + EOS fit in `max_len`.
  With `alternatives` ([2]: the replacement text of a non-last and of the last item) and
  `use_alternative` (bool [n], decided AFTER truncation by a callable), items can be
  swapped for the replacement (MIM); the fit then uses the longer of the two, so any
  choice fits.
  """
  n = tf.size(segments)
  is_last = tf.equal(tf.range(n), n - 1)
  sep = tf.where(is_last, template.terminator, ";")
  head = template._format(template.head, values)
  tail = template._format(template.tail, values)
  rows = [tf.reshape(head, [1]), tf.strings.join([segments, sep]), tf.reshape(tail, [1])]
  if alternatives is not None:
    rows.append(tf.strings.join([alternatives, [";", template.terminator]]))
  strings = tf.concat(rows, 0)
  toks = _encode_rows(vocabulary, strings)
  lengths = tf.cast(toks.row_lengths(), tf.int32)
  seg_len = lengths[1:n + 1]
  if alternatives is not None:
    alt_len = tf.where(is_last, lengths[n + 3], lengths[n + 2])
    seg_len = tf.maximum(seg_len, alt_len)
  budget = None if max_len is None else max_len - 1 - lengths[0] - lengths[n + 1]
  keep = _keep_last(seg_len, budget)
  item_rows = tf.range(n - keep, n) + 1
  if alternatives is not None:
    chosen = use_alternative(keep)  # bool [keep] over the kept items
    alt_rows = tf.where(is_last[n - keep:], n + 3, n + 2)
    item_rows = tf.where(chosen, alt_rows, item_rows)
  order = tf.concat([[0], item_rows, [n + 1]], 0)
  ids = tf.gather(toks, order).flat_values
  parts = tf.gather(strings, order)
  text = tf.strings.reduce_join(tf.boolean_mask(parts, tf.strings.length(parts) > 0), separator=" ")
  return ids, text, keep


def _encode(vocabulary, text: tf.Tensor) -> tf.Tensor:
  return _encode_rows(vocabulary, tf.reshape(text, [1])).flat_values


def _join_ids(short_ids: tf.Tensor) -> tf.Tensor:
  return tf.strings.reduce_join(short_ids, separator=", ")


def _text_example(ex, inputs_ids, inputs_text, targets_text, vocabulary, extra=None):
  out = dict(ex)
  out.update({"inputs": inputs_ids, "inputs_pretokenized": inputs_text,
              "targets": _encode(vocabulary, targets_text), "targets_pretokenized": targets_text})
  out.update(extra or {})
  return out


def _tables(data_dir: str):
  cat = catalog(data_dir)
  return cat, tf.constant(cat.item_text), tf.constant(cat.short_ids)


# --- ReAT tasks (post-cache) ------------------------------------------------------------


def reat_retrieval(ds, output_features, sequence_length, data_dir: str):
  """history -> the next item's short id."""
  vocabulary = output_features["inputs"].vocabulary
  _, item_text, short = _tables(data_dir)
  tpl = _Template(RETRIEVAL_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")

  def fn(ex):
    ids, text, _ = _render(vocabulary, tpl, tf.gather(item_text, ex["history"]), {}, max_len)
    return _text_example(ex, ids, text, tf.gather(short, ex["target"]), vocabulary)

  return _map(ds, fn)


def reat_ranking(ds, output_features, sequence_length, data_dir: str, num_negatives: int = NUM_NEGATIVES):
  """history + candidates (the target and `num_negatives` popularity-sampled items the
  user never bought, in random order) -> the target's short id. Adds "candidates" (int32)."""
  vocabulary = output_features["inputs"].vocabulary
  cat, item_text, short = _tables(data_dir)
  logits = tf.constant(popularity_logits(cat.train_count))
  users = _user_history(data_dir)
  tpl = _Template(RANKING_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")
  seed = _stream_seed()

  def fn(ex):
    k_neg, k_order = _keys(_example_key(ex, seed, "ranking"), 2)
    negatives = sample_negatives(k_neg, logits, users[ex["user_id"]], num_negatives)
    candidates = _shuffle(k_order, tf.concat([[ex["target"]], negatives], 0))
    values = {"candidates": _join_ids(tf.gather(short, candidates))}
    ids, text, _ = _render(vocabulary, tpl, tf.gather(item_text, ex["history"]), values, max_len)
    return _text_example(ex, ids, text, tf.gather(short, ex["target"]), vocabulary, {"candidates": candidates})

  return _map(ds, fn)


def reat_rating(ds, output_features, sequence_length, data_dir: str):
  """history + the target item -> "yes" if its rating > 3 else "no" (unrated targets dropped)."""
  vocabulary = output_features["inputs"].vocabulary
  _, item_text, _ = _tables(data_dir)
  tpl = _Template(RATING_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")

  def fn(ex):
    values = {"item": tf.gather(item_text, ex["target"])}
    ids, text, _ = _render(vocabulary, tpl, tf.gather(item_text, ex["history"]), values, max_len)
    target = tf.where(ex["target_rating"] > 3.0, LIKE, DISLIKE)
    return _text_example(ex, ids, text, target, vocabulary)

  ds = _filter(ds, lambda ex: tf.logical_not(tf.math.is_nan(ex["target_rating"])))
  return _map(ds, fn)


def reat_mim(ds, output_features, sequence_length, data_dir: str, rate: float = MIM_RATE):
  """The window (history + target) with max(1, round(20%)) items shown as "[masked item]"
  -> the masked items' short ids in order. Adds "masked" (bool, per kept window item)."""
  vocabulary = output_features["inputs"].vocabulary
  _, item_text, short = _tables(data_dir)
  tpl = _Template(MIM_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")
  seed = _stream_seed()

  def fn(ex):
    items = tf.concat([ex["history"], [ex["target"]]], 0)
    key = _example_key(ex, seed, "mim")
    chosen = {}

    def draw(keep):
      chosen["mask"] = mask_positions(key, keep, rate)
      return chosen["mask"]

    ids, text, keep = _render(vocabulary, tpl, tf.gather(item_text, items), {}, max_len,
                              alternatives=tf.constant([MASKED_ITEM, MASKED_ITEM]), use_alternative=draw)
    kept = items[tf.size(items) - keep:]
    target = _join_ids(tf.gather(short, tf.boolean_mask(kept, chosen["mask"])))
    return _text_example(ex, ids, text, target, vocabulary, {"masked": chosen["mask"]})

  return _map(ds, fn)


def reat_mlm(ds, output_features, sequence_length, data_dir: str):
  """T5 span corruption (density 0.15, mean span 3) over the window's rendered items.

  A random crop of the tokens is corrupted when the text is longer than what fits
  the inputs / targets lengths. Adds "text" (the uncorrupted rendered window).
  """
  vocabulary = output_features["inputs"].vocabulary
  _, item_text, _ = _tables(data_dir)
  tpl = _Template(MLM_TEMPLATE)
  reserved = 1 if item_placeholder(vocabulary) != ITEM_PLACEHOLDER else 0
  max_tokens = _mlm_max_tokens(_max_len(sequence_length, "inputs"), _max_len(sequence_length, "targets"),
                               vocabulary.extra_ids - reserved)
  vocab_size = vocabulary.vocab_size
  seed = _stream_seed()

  def fn(ex):
    items = tf.concat([ex["history"], [ex["target"]]], 0)
    tokens, text, _ = _render(vocabulary, tpl, tf.gather(item_text, items), {}, None)
    k_crop, k_mask = _keys(_example_key(ex, seed, "mlm"), 2)
    if max_tokens is not None:
      extra = tf.maximum(tf.size(tokens) - max_tokens, 0)
      start = tf.random.stateless_uniform([], k_crop, 0, extra + 1, tf.int32, alg=_ALG)
      tokens = tokens[start:start + max_tokens]
    inputs, targets = span_corrupt(tokens, k_mask, vocab_size)
    out = dict(ex)
    out.update({"inputs": inputs, "targets": targets, "text": text})
    return out

  return _map(ds, fn)


def reat_bpr(ds, output_features, sequence_length, data_dir: str):
  """history + two options (the target and one popularity-sampled item the user never
  bought, in random order) -> the target's short id. Adds "candidates" ([A, B]).
  Users who bought every item have no negative and are dropped."""
  vocabulary = output_features["inputs"].vocabulary
  cat, item_text, short = _tables(data_dir)
  logits = tf.constant(popularity_logits(cat.train_count))
  users = _user_history(data_dir)
  tpl = _Template(BPR_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")
  seed = _stream_seed()

  def fn(ex):
    k_neg, k_order = _keys(_example_key(ex, seed, "bpr"), 2)
    negative = sample_negatives(k_neg, logits, users[ex["user_id"]], 1)
    pair = _shuffle(k_order, tf.concat([[ex["target"]], negative], 0))
    pair = tf.concat([pair, [0, 0]], 0)[:2]  # no negative: filtered below
    values = {"option_a": tf.gather(item_text, pair[0]), "option_b": tf.gather(item_text, pair[1])}
    ids, text, _ = _render(vocabulary, tpl, tf.gather(item_text, ex["history"]), values, max_len)
    return _text_example(ex, ids, text, tf.gather(short, ex["target"]), vocabulary, {"candidates": pair})

  ds = _map(ds, fn)
  return _filter(ds, lambda ex: tf.reduce_all(ex["candidates"] > 0))


# --- REGEN tasks (post-cache) -------------------------------------------------------------


def _regen_history(ex, lumen_text, critiques: bool):
  """History segments: "[User: <critique> ]Item: <item> <title> (<category>)"."""
  text = tf.gather(lumen_text, ex["history"])
  if critiques and "history_critiques" in ex:
    c = _clean_tf(ex["history_critiques"])
    text = tf.where(tf.strings.length(c) > 0, tf.strings.join(["User: ", c, " ", text]), text)
  return text


def _request(ex, critiques: bool) -> tf.Tensor:
  if not critiques or "target_critique" not in ex:
    return tf.constant("")
  c = _clean_tf(ex["target_critique"])
  return tf.where(tf.strings.length(c) > 0, tf.strings.join(["User: ", c, " "]), "")


def _narrative_column(narrative: str) -> str:
  return "target_endorsement" if narrative == "endorsement" else NARRATIVES[narrative][0]


def regen_lumen(ds, output_features, sequence_length, data_dir: str, narrative: str, critiques: bool = True):
  """LUMEN joint task: history with `<item>` placeholders (and critiques) -> "ID: <item>
  Text: <narrative>". Adds "inputs_item_ids" (the placeholders' items, in order) and
  "targets_item_ids" ([target]). Examples without the narrative are dropped."""
  vocabulary = output_features["inputs"].vocabulary
  placeholder = item_placeholder(vocabulary)
  lumen_text = tf.constant(catalog(data_dir).lumen_text(placeholder))
  _, instruction, _ = NARRATIVES[narrative]
  tpl = _Template(LUMEN_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")
  column = _narrative_column(narrative)

  def fn(ex):
    values = {"request": _request(ex, critiques), "instruction": instruction}
    ids, text, keep = _render(vocabulary, tpl, _regen_history(ex, lumen_text, critiques), values, max_len)
    history = ex["history"]
    target = tf.strings.join([f"ID: {placeholder} Text: ", _clean_tf(ex[column])])
    return _text_example(ex, ids, text, target, vocabulary, {
        "inputs_item_ids": history[tf.size(history) - keep:],
        "targets_item_ids": tf.reshape(ex["target"], [1])})

  ds = _filter(ds, lambda ex: tf.strings.length(_clean_tf(ex[column])) > 0)
  return _map(ds, fn)


def regen_narrative(ds, output_features, sequence_length, data_dir: str, narrative: str, critiques: bool = True):
  """Narrative given the true next item (the FLARE + LLM setting): history and the next
  item, all as `<item>` placeholders -> the narrative. Adds "inputs_item_ids" (history
  items kept, then the next item)."""
  vocabulary = output_features["inputs"].vocabulary
  placeholder = item_placeholder(vocabulary)
  lumen_text = tf.constant(catalog(data_dir).lumen_text(placeholder))
  _, _, instruction = NARRATIVES[narrative]
  tpl = _Template(NARRATIVE_TEMPLATE)
  max_len = _max_len(sequence_length, "inputs")
  column = _narrative_column(narrative)

  def fn(ex):
    values = {"request": _request(ex, critiques), "instruction": instruction,
              "next_item": tf.gather(lumen_text, ex["target"])}
    ids, text, keep = _render(vocabulary, tpl, _regen_history(ex, lumen_text, critiques), values, max_len)
    history = ex["history"]
    return _text_example(ex, ids, text, _clean_tf(ex[column]), vocabulary, {
        "inputs_item_ids": tf.concat([history[tf.size(history) - keep:], [ex["target"]]], 0)})

  ds = _filter(ds, lambda ex: tf.strings.length(_clean_tf(ex[column])) > 0)
  return _map(ds, fn)


# --- metrics ------------------------------------------------------------------------------


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Accuracy (%) of predictions equal to the target (hit@1 for item-id targets)."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}

