"""Vocabularies: item ids as a seqio.Vocabulary, and SentencePiece for text.

Item id convention of every prepared dataset (fixed):

  0 = PAD, 1 = MASK, real items are 2 .. num_items + 1; vocab size = num_items + 2.

`ItemVocabulary` lets item sequences be seqio `Feature`s like any text feature:
`encode("2 17 5") == [2, 17, 5]`, `decode([2, 17, 5, 0, 0]) == "2 17 5"`.
Item sequences have no EOS (use `seqio.Feature(vocab, add_eos=False)`) and no
UNK: the catalog is closed, so an id outside the vocabulary is an error, not
something to paper over.

Text uses SentencePiece with T5 conventions (pad=0, eos=1, unk=2, no BOS) and
T5's 100 sentinel ids appended by `seqio.SentencePieceVocabulary(extra_ids=100)`.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterable, Mapping, Sequence

import seqio
import tensorflow as tf

PAD_ID = 0
MASK_ID = 1
NUM_RESERVED = 2  # PAD and MASK; real item ids start here.

PAD_TOKEN = "[PAD]"
MASK_TOKEN = "[MASK]"
_EXTRA_RE = re.compile(r"^<extra_id_(\d+)>$")


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow (the input pipeline only) off the GPUs JAX owns.

  As in t5x / big_vision. (On TPU hosts the TF wheel has no TPU support, so
  there is nothing to hide.) Idempotent; a no-op once TF has initialised its
  devices: then it is too late to change, and whoever initialised them decided.
  """
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass


hide_accelerators_from_tf()


class ItemVocabulary(seqio.Vocabulary):
  """Item ids as a seqio vocabulary; strings are whitespace-separated tokens.

  Token forms (encode accepts all, decode writes the first that applies):
    `[MASK]`, `[PAD]`     the reserved ids 1 and 0 (decode drops PAD),
    `<extra_id_k>`        extra id k = num_items + 2 + k (not reversed as in T5:
                          these are appended task/special tokens, not sentinels),
    a name from `id_to_text` (e.g. "I123"), if given,
    a decimal integer     the id itself.

  Special ids: `pad_id` = 0; `eos_id` = None (sequences are not terminated, so
  seqio's decode never truncates); `unk_id` = None (no UNK item: encode and
  decode raise on ids outside [0, vocab_size), encode_tf/decode_tf fail the
  tf.data pipeline with an InvalidArgumentError); `bos_id` = None.
  """

  def __init__(
      self,
      num_items: int,
      extra_ids: int = 0,
      id_to_text: Mapping[int, str] | None = None,
  ):
    if num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {num_items}")
    super().__init__(extra_ids=extra_ids)
    self._num_items = int(num_items)
    self._id_to_text = dict(id_to_text or {})
    self._text_to_id: dict[str, int] = {}
    for i, name in self._id_to_text.items():
      if not NUM_RESERVED <= i < self._base_vocab_size:
        raise ValueError(f"id_to_text has id {i}, outside the item ids [{NUM_RESERVED}, {self._base_vocab_size})")
      # Names must not look like ids or specials, or encode would be ambiguous.
      if not name or name.strip() != name or " " in name or _parse_int(name) is not None or name in (
          PAD_TOKEN, MASK_TOKEN) or _EXTRA_RE.match(name):
        raise ValueError(f"id_to_text name {name!r} for id {i} must be one non-numeric token")
      if name in self._text_to_id:
        raise ValueError(f"id_to_text name {name!r} is used by ids {self._text_to_id[name]} and {i}")
      self._text_to_id[name] = i
    self._tables = None  # built lazily, see _tf_tables

  # --- seqio.Vocabulary interface -------------------------------------------

  @property
  def num_items(self) -> int:
    return self._num_items

  @property
  def _base_vocab_size(self) -> int:
    return self._num_items + NUM_RESERVED

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def mask_id(self) -> int:
    return MASK_ID

  @property
  def eos_id(self) -> int | None:
    return None

  @property
  def unk_id(self) -> int | None:
    return None

  @property
  def bos_id(self) -> int | None:
    return None

  def _special_tokens(self) -> dict[str, int]:
    out = {PAD_TOKEN: PAD_ID, MASK_TOKEN: MASK_ID}
    for k in range(self.extra_ids):
      out[f"<extra_id_{k}>"] = self._base_vocab_size + k
    return out

  def _check_id(self, i: int) -> int:
    if not 0 <= i < self.vocab_size:
      raise ValueError(f"id {i} is outside the item vocabulary [0, {self.vocab_size})")
    return i

  def _encode(self, s: str) -> Sequence[int]:
    specials = self._special_tokens()
    ids = []
    for tok in s.split():
      if tok in specials:
        ids.append(specials[tok])
      elif tok in self._text_to_id:
        ids.append(self._text_to_id[tok])
      else:
        i = _parse_int(tok)
        if i is None:
          raise ValueError(f"cannot encode token {tok!r}: not an item id, a known name or a special token")
        ids.append(self._check_id(i))
    return ids

  def _token(self, i: int) -> str:
    if i == MASK_ID:
      return MASK_TOKEN
    if i >= self._base_vocab_size:
      return f"<extra_id_{i - self._base_vocab_size}>"
    return self._id_to_text.get(i, str(i))

  def _decode(self, ids: Iterable[int]) -> str:
    return " ".join(self._token(self._check_id(int(i))) for i in ids if int(i) != PAD_ID)

  def _tf_tables(self):
    """(string -> id, id -> string) lookup tables for the named tokens."""
    if self._tables is None:
      named = {**self._special_tokens(), **self._text_to_id}
      names = sorted(named, key=named.get)
      ids = [named[n] for n in names]
      # init_scope: tables must outlive whichever tf.function first asks for them.
      with tf.init_scope():
        to_id = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(names or [""], tf.string),
                                                tf.constant(ids or [-1], tf.int64)), default_value=-1)
        to_text = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids or [-1], tf.int64),
                                                tf.constant([self._token(i) for i in ids] or [""], tf.string)),
            default_value="")
      self._tables = (to_id, to_text)
    return self._tables

  def _assert_in_range(self, ids: tf.Tensor) -> tf.Tensor:
    ok = tf.reduce_all((ids >= 0) & (ids < self.vocab_size))
    with tf.control_dependencies([tf.debugging.Assert(ok, [f"item id outside [0, {self.vocab_size})", ids],
                                                      summarize=16)]):
      return tf.identity(ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 [n] (a [B] batch of strings -> ragged [B, None])."""
    toks = tf.strings.split(s)
    if isinstance(toks, tf.RaggedTensor):
      return tf.ragged.map_flat_values(self._encode_tokens_tf, toks)
    return self._encode_tokens_tf(toks)

  def _encode_tokens_tf(self, toks: tf.Tensor) -> tf.Tensor:
    to_id, _ = self._tf_tables()
    named = to_id.lookup(toks)
    is_named = named >= 0
    # Named tokens are swapped for "0" so to_number never sees them.
    parsed = tf.strings.to_number(tf.where(is_named, "0", toks), tf.int64)
    return tf.cast(self._assert_in_range(tf.where(is_named, named, parsed)), tf.int32)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int [..., n] -> string [...], PAD dropped, tokens joined by spaces."""
    _, to_text = self._tf_tables()
    ids = self._assert_in_range(tf.cast(ids, tf.int64))
    named = to_text.lookup(ids)
    toks = tf.where(tf.strings.length(named) > 0, named, tf.strings.as_string(ids))
    toks = tf.ragged.boolean_mask(toks, tf.not_equal(ids, PAD_ID))
    return tf.strings.reduce_join(toks, axis=-1, separator=" ")

  def __getstate__(self):
    # TF lookup tables do not pickle or deepcopy; they are rebuilt on demand.
    return {**self.__dict__, "_tables": None}

  # --- identity: mixtures compare their tasks' vocabularies with == ----------

  def _key(self):
    digest = hashlib.sha256(repr(sorted(self._id_to_text.items())).encode()).hexdigest()
    return (self._num_items, self.extra_ids, digest)

  def __eq__(self, other):
    return isinstance(other, ItemVocabulary) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def __repr__(self):
    named = f", id_to_text=<{len(self._id_to_text)} names>" if self._id_to_text else ""
    return f"ItemVocabulary(num_items={self._num_items}, extra_ids={self.extra_ids}{named})"


class SemanticIdVocabulary(ItemVocabulary):
  """Semantic-ID tokens (0 = PAD, 1 = EOS, then each level's codes): ids like item ids, but
  not items (`recjax tasks show` prints them as tokens, not as titled items)."""

  def __init__(self, vocab_size: int):
    super().__init__(vocab_size - NUM_RESERVED)

  def __eq__(self, other):
    return isinstance(other, SemanticIdVocabulary) and self._key() == other._key()

  def __hash__(self):
    return hash(("sid", *self._key()))

  def __repr__(self):
    return f"SemanticIdVocabulary(vocab_size={self.vocab_size})"


def _parse_int(tok: str) -> int | None:
  try:
    return int(tok)
  except ValueError:
    return None


# --- SentencePiece -------------------------------------------------------------

T5_EXTRA_IDS = 100


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    *,
    character_coverage: float = 1.0,
    input_sentence_size: int = 0,
    max_sentence_length: int = 1 << 14,
    byte_fallback: bool = False,
    user_defined_symbols: Sequence[str] = (),
    hard_vocab_limit: bool = True,
    split_digits: bool = False,
    normalization_rule_name: str = "nmt_nfkc",
) -> str:
  """Trains a SentencePiece model deterministically; returns the `.model` path.

  The same `texts` in the same order give a byte-identical `.model`: training
  is single-threaded and the input is never shuffled or sampled at random (with
  `input_sentence_size` > 0 the first N sentences are used, in order). Callers
  pass `texts` in a fixed order (e.g. item text sorted by item id). Empty texts
  are skipped.

  Ids follow T5: pad=0, eos=1, unk=2, no BOS. Sentinels are not trained in;
  load with `load_sentencepiece(path, extra_ids=100)` to append T5's 100
  `<extra_id_k>` ids after the trained pieces, exactly as seqio does for T5.

  Args:
    texts: training sentences (one document / field per element).
    model_prefix: output path without suffix; writes PREFIX.model and .vocab.
    vocab_size: number of pieces including pad/eos/unk, excluding extra ids.
    model_type: "unigram" (T5), "bpe", "char" or "word".
    character_coverage: fraction of characters covered by the alphabet.
    input_sentence_size: use only the first N sentences (0 = all).
    max_sentence_length: longer sentences (bytes) are skipped by SentencePiece.
    byte_fallback: encode unknown characters as bytes instead of unk.
    user_defined_symbols: pieces always kept whole (e.g. markup tokens).
    hard_vocab_limit: if False, `vocab_size` is an upper bound (small corpora).
    split_digits: split numbers into single digits.
    normalization_rule_name: SentencePiece normaliser (T5 uses nmt_nfkc).

  Returns:
    The path of the written `.model` file.
  """
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  model_prefix = os.fspath(model_prefix)
  parent = os.path.dirname(model_prefix)
  if parent:
    tf.io.gfile.makedirs(parent)
  # Train into memory: with model_prefix SentencePiece records the output path
  # in the model, so the same training written elsewhere would differ.
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(t for t in texts if t),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      character_coverage=character_coverage,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=False,
      max_sentence_length=max_sentence_length,
      num_threads=1,
      byte_fallback=byte_fallback,
      user_defined_symbols=list(user_defined_symbols),
      hard_vocab_limit=hard_vocab_limit,
      split_digits=split_digits,
      normalization_rule_name=normalization_rule_name,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      minloglevel=2,
  )
  path = model_prefix + ".model"
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(model.getvalue())
  # The human-readable piece list SentencePiece writes beside a model.
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  with tf.io.gfile.GFile(model_prefix + ".vocab", "w") as f:
    f.write("".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces))
  return path


def load_sentencepiece(path: str | os.PathLike, extra_ids: int = T5_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
  """A seqio vocabulary for an existing `.model` (ours or T5's), with sentinels.

  Fails here, with the path, rather than on first use deep inside tf.data
  (seqio loads the model lazily).
  """
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"SentencePiece model not found: {path}")
  vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  if vocab.pad_id != PAD_ID:
    raise ValueError(f"{path}: pad id is {vocab.pad_id}; seqio and recjax need pad id {PAD_ID}")
  return vocab
