"""Item vocabulary and SentencePiece helpers."""

import uuid

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recjax.data import vocab
from recjax.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID, ItemVocabulary


def test_reserved_ids():
  assert (PAD_ID, MASK_ID, NUM_RESERVED) == (0, 1, 2)
  v = ItemVocabulary(10, extra_ids=3)
  assert v.vocab_size == 15 and v.pad_id == PAD_ID and v.mask_id == MASK_ID
  assert v.eos_id is None and v.unk_id is None and v.bos_id is None
  assert isinstance(v, seqio.Vocabulary)


def test_python_round_trip():
  v = ItemVocabulary(10, extra_ids=2, id_to_text={5: "I5", 11: "I11"})
  text = "2 [MASK] I5 7 I11 <extra_id_1>"
  ids = v.encode(text)
  assert ids == [2, 1, 5, 7, 11, 13]
  assert v.decode(ids) == text
  assert v.decode(ids + [PAD_ID, PAD_ID]) == text  # padding is dropped
  assert v.encode("5 [PAD]") == [5, 0]  # ints are accepted for named ids too
  assert v.decode(np.array([3, 4], np.int32)) == "3 4"


def test_tf_round_trip_matches_python():
  v = ItemVocabulary(10, extra_ids=2, id_to_text={5: "I5"})
  ids = v.encode_tf(tf.constant("2 [MASK] I5 7 <extra_id_0>"))
  assert ids.dtype == tf.int32
  np.testing.assert_array_equal(ids, [2, 1, 5, 7, 12])
  out = v.decode_tf(tf.constant([[2, 1, 5, 7, 12, 0], [3, 0, 0, 0, 0, 0]]))
  assert [s.decode() for s in out.numpy()] == ["2 [MASK] I5 7 <extra_id_0>", "3"]
  batch = v.encode_tf(tf.constant(["2 3", "I5"]))
  assert batch.to_list() == [[2, 3], [5]]

  @tf.function
  def in_graph(s):  # tables must survive being first built inside a tf.function
    return v.decode_tf(v.encode_tf(s))

  assert in_graph(tf.constant("4 I5")).numpy() == b"4 I5"


def test_bad_ids_and_names():
  v = ItemVocabulary(10)
  with pytest.raises(ValueError, match="outside"):
    v.encode("12")
  with pytest.raises(ValueError, match="outside"):
    v.decode([2, 12])
  with pytest.raises(ValueError, match="cannot encode"):
    v.encode("2 banana")
  with pytest.raises(tf.errors.InvalidArgumentError):
    v.encode_tf(tf.constant("2 99"))
  with pytest.raises(ValueError):
    ItemVocabulary(10, id_to_text={3: "17"})  # would be ambiguous with id 17
  with pytest.raises(ValueError):
    ItemVocabulary(10, id_to_text={3: "a", 4: "a"})
  with pytest.raises(ValueError):
    ItemVocabulary(10, id_to_text={1: "m"})  # not an item id


def test_equality_for_mixtures():
  assert ItemVocabulary(10) == ItemVocabulary(10)
  assert hash(ItemVocabulary(10, id_to_text={2: "a"})) == hash(ItemVocabulary(10, id_to_text={2: "a"}))
  assert ItemVocabulary(10) != ItemVocabulary(11)
  assert ItemVocabulary(10) != ItemVocabulary(10, extra_ids=1)


def test_as_a_seqio_feature():
  v = ItemVocabulary(20)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"items": ["2 3 4", "[MASK] 21"]}).map(
        lambda ex: {"items": v.encode_tf(ex["items"])})

  name = f"test_vocab_{uuid.uuid4().hex[:8]}"
  task = seqio.TaskRegistry.add(name, seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                                output_features={"items": seqio.Feature(v, add_eos=False, dtype=tf.int32)})
  try:
    out = [ex["items"].tolist() for ex in task.get_dataset(None, shuffle=False).as_numpy_iterator()]
    assert out == [[2, 3, 4], [1, 21]]
    assert [v.decode(x) for x in out] == ["2 3 4", "[MASK] 21"]
  finally:
    seqio.TaskRegistry.remove(name)


def corpus():
  rng = np.random.default_rng(0)
  words = ["lipstick", "gloss", "matte", "shampoo", "conditioner", "office", "stapler", "paper", "ink",
           "blue", "red", "soft", "long", "lasting", "refill", "pack", "of", "the", "a", "great"]
  return [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(1500)]


def test_sentencepiece_deterministic_and_loadable(tmp_path):
  texts = corpus()
  a = vocab.train_sentencepiece(texts, tmp_path / "a" / "spm", vocab_size=40)
  b = vocab.train_sentencepiece(iter(texts), tmp_path / "b" / "spm", vocab_size=40)
  assert open(a, "rb").read() == open(b, "rb").read()

  v = vocab.load_sentencepiece(a)  # T5 convention: 100 sentinels on top
  assert isinstance(v, seqio.SentencePieceVocabulary)
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  assert v.vocab_size == 40 + 100
  assert v.decode([v.vocab_size - 1]) == "<extra_id_0>"
  ids = v.encode("great matte lipstick refill")
  assert max(ids) < 40 and v.decode(ids) == "great matte lipstick refill"
  np.testing.assert_array_equal(v.encode_tf(tf.constant("great matte lipstick refill")), ids)
  assert vocab.load_sentencepiece(a, extra_ids=0).vocab_size == 40

  c = vocab.train_sentencepiece(texts[::-1], tmp_path / "c" / "spm", vocab_size=40)
  assert c.endswith(".model")


def test_load_missing_sentencepiece(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    vocab.load_sentencepiece(tmp_path / "nope.model")


def test_copies_after_use():
  import copy
  import pickle
  v = ItemVocabulary(10, id_to_text={5: "I5"})
  v.encode_tf(tf.constant("I5"))  # builds the TF tables
  for w in (copy.deepcopy(v), pickle.loads(pickle.dumps(v))):
    assert w == v and w.encode_tf(tf.constant("I5 3")).numpy().tolist() == [5, 3]
