"""Item-sequence feature converters through real seqio Tasks."""

import uuid

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recjax.data import converters
from recjax.data.vocab import MASK_ID, NUM_RESERVED, PAD_ID, ItemVocabulary

L = 50


def make_sequences(num, mean_len, max_len, seed=0):
  """Sequences whose tokens are unique across the set, so every token names
  its (example, position) and packing can be checked exactly."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.geometric(1.0 / mean_len, size=num), 1, max_len)
  tokens = np.arange(NUM_RESERVED, NUM_RESERVED + lengths.sum(), dtype=np.int32)
  return np.split(tokens, np.cumsum(lengths)[:-1])


def critique_of(items):
  return (items % 5).astype(np.int32)  # zeros inside sequences too: 0 = "no critique"


def register_task(seqs, with_critiques=False):
  """A throw-away Task over an in-memory source; returns its name."""
  num_items = int(max(s.max() for s in seqs))

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    ragged = tf.ragged.constant(seqs, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensor_slices({"items": ragged, "example_id": tf.range(len(seqs), dtype=tf.int64)})

    def to_dense(ex):
      out = {"items": ex["items"], "example_id": ex["example_id"]}
      if with_critiques:
        out["critiques"] = ex["items"] % 5
      return out

    return ds.map(to_dense)

  name = f"test_conv_{uuid.uuid4().hex[:8]}"
  features = {"items": seqio.Feature(ItemVocabulary(num_items), add_eos=False, dtype=tf.int32)}
  if with_critiques:
    features["critiques"] = seqio.Feature(seqio.PassThroughVocabulary(5), add_eos=False, dtype=tf.int32)
  seqio.TaskRegistry.add(name, seqio.FunctionDataSource(dataset_fn, splits=["train"]), output_features=features)
  return name


@pytest.fixture(scope="module")
def tasks():
  names = {}
  names["short"] = (register_task(make_sequences(1500, 9, 70)), make_sequences(1500, 9, 70))
  names["long"] = (register_task(make_sequences(400, 60, 60, seed=1)), make_sequences(400, 60, 60, seed=1))
  names["crit"] = (register_task(make_sequences(300, 9, 70, seed=2), with_critiques=True),
                   make_sequences(300, 9, 70, seed=2))
  yield names
  for name, _ in names.values():
    seqio.TaskRegistry.remove(name)


def convert(task, converter, length=L, shuffle=False, seed=None):
  ds = seqio.get_dataset(task, {"items": length}, converter, shuffle=shuffle, seed=seed,
                         trim_output_features=False)
  return list(ds.as_numpy_iterator())


def stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def owner_of(seqs):
  """token -> (example index, position in the untrimmed sequence)."""
  return {int(t): (i, p) for i, s in enumerate(seqs) for p, t in enumerate(s)}


def segments(b):
  """Yields (row, segment id, column indices) of every segment in a batch."""
  for r, seg in enumerate(b["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      yield r, s, np.flatnonzero(seg == s)


def test_packing_invariants(tasks):
  name, seqs = tasks["short"]
  b = stack(convert(name, converters.ItemSequencePackingConverter(pack=True, seed=3)))
  owner = owner_of(seqs)
  assert all(b[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))
  assert b["weights"].dtype == np.float32 and b["inputs"].shape[1] == L

  seen = {}
  for r, s, cols in segments(b):
    tokens = b["targets"][r, cols]
    examples = {owner[int(t)][0] for t in tokens}
    assert len(examples) == 1, "a segment mixes examples"
    (ex,) = examples
    assert ex not in seen, f"example {ex} packed twice"
    seen[ex] = r
    # The whole example, most recent L items, contiguous and in order.
    np.testing.assert_array_equal(tokens, seqs[ex][-L:])
    np.testing.assert_array_equal(cols, cols[0] + np.arange(len(cols)))
    np.testing.assert_array_equal(b["positions"][r, cols], np.arange(len(cols)))
  assert len(seen) == len(seqs), "every example lands in exactly one row"

  seg = b["segment_ids"]
  # Segment ids count 1..k along each row; padding is all zeros.
  for row in seg:
    ids = row[row > 0]
    assert (np.diff(ids) >= 0).all() and ids[0] == 1 and set(ids) == set(range(1, ids.max() + 1))
  pad = seg == 0
  assert (b["inputs"][pad] == PAD_ID).all() and (b["weights"][pad] == 0).all() and (b["positions"][pad] == 0).all()

  # Attention allowed only where seg_q == seg_k != 0: exactly within one example.
  attend = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  ex_of = np.vectorize(lambda t: owner[int(t)][0] if t >= NUM_RESERVED else -1)(b["targets"])
  same_example = (ex_of[:, :, None] == ex_of[:, None, :]) & (ex_of[:, :, None] >= 0)
  np.testing.assert_array_equal(attend, same_example)


def test_masking(tasks):
  name, seqs = tasks["short"]
  b = stack(convert(name, converters.ItemSequencePackingConverter(pack=True, seed=3)))
  masked = b["weights"] > 0
  np.testing.assert_array_equal(masked, b["inputs"] == MASK_ID)
  keep = (b["segment_ids"] > 0) & ~masked
  np.testing.assert_array_equal(b["inputs"][keep], b["targets"][keep])
  assert (b["targets"][masked] >= NUM_RESERVED).all()
  for r, _, cols in segments(b):
    assert masked[r, cols].any(), "every segment has a target"


def test_mask_rate_and_last_item_fraction(tasks):
  name, _ = tasks["long"]  # 400 x 60 items: 24k positions
  b = stack(convert(name, converters.ItemSequencePackingConverter(pack=False, last_item_prob=0.0)))
  rate = b["weights"].sum() / b["segment_ids"].sum()
  assert 0.14 < rate < 0.16, rate

  b = stack(convert(name, converters.ItemSequencePackingConverter(pack=False, last_item_prob=0.3)))
  n = b["segment_ids"].sum(1)
  only_last = (b["weights"].sum(1) == 1) & (b["weights"][np.arange(len(n)), n - 1] == 1)
  assert 0.22 < only_last.mean() < 0.38, only_last.mean()

  b = stack(convert(name, converters.ItemSequencePackingConverter(pack=False, last_item_prob=1.0)))
  expected = np.zeros_like(b["weights"])
  expected[np.arange(len(n)), n - 1] = 1
  np.testing.assert_array_equal(b["weights"], expected)


def masks_by_example(rows, seqs):
  """example index -> its inputs, independent of where it was packed."""
  owner = owner_of(seqs)
  b = stack(rows)
  out = {}
  for r, _, cols in segments(b):
    out[owner[int(b["targets"][r, cols[0]])][0]] = b["inputs"][r, cols]
  return out


def test_masks_deterministic_per_example_and_epoch(tasks):
  name, seqs = tasks["short"]
  conv = converters.ItemSequencePackingConverter(pack=True, seed=5)
  a = masks_by_example(convert(name, conv), seqs)
  # Another run, in another order (shuffled), packed differently: same masks.
  b = masks_by_example(convert(name, conv, shuffle=True, seed=11), seqs)
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # Another epoch (and another seed) draws new masks.
  for other in (conv.with_epoch(1), converters.ItemSequencePackingConverter(pack=True, seed=6)):
    c = masks_by_example(convert(name, other), seqs)
    differ = np.mean([not np.array_equal(a[k], c[k]) for k in a])
    assert differ > 0.5, differ
  assert conv.epoch == 0 and conv.with_epoch(3).epoch == 3


def test_prefix_examples(tasks):
  # prefixes=True: every prefix of 2..n items of each (trimmed) sequence is an example; with
  # last_item_prob=1 its last item is the one masked, the evaluation layout.
  name, seqs = tasks["crit"]
  conv = converters.ItemSequencePackingConverter(pack=True, last_item_prob=1.0, prefixes=True, seed=1)
  b = stack(convert(name, conv))
  owner = owner_of(seqs)
  got = []
  for r, _, cols in segments(b):
    toks = b["targets"][r, cols]
    np.testing.assert_array_equal(b["positions"][r, cols], np.arange(len(cols)))
    np.testing.assert_array_equal(b["weights"][r, cols], [0] * (len(cols) - 1) + [1])  # the last one
    assert b["inputs"][r, cols[-1]] == MASK_ID and (b["inputs"][r, cols[:-1]] == toks[:-1]).all()
    np.testing.assert_array_equal(b["critiques"][r, cols], critique_of(toks))
    i, p = owner[int(toks[-1])]
    np.testing.assert_array_equal(toks, seqs[i][max(len(seqs[i]) - L, 0):p + 1])  # from the kept start
    got.append((i, p))
  # Each item past the first of the kept (most recent L) items ends exactly one example.
  want = [(i, p) for i, s in enumerate(seqs) for p in range(max(len(s) - L, 0) + 1, len(s))]
  assert sorted(got) == sorted(want)


def test_padded_layout(tasks):
  name, seqs = tasks["short"]
  rows = convert(name, converters.ItemSequencePackingConverter(pack=False))
  assert len(rows) == len(seqs)
  b = stack(rows)
  for i, s in enumerate(seqs):  # unshuffled: source order
    s = s[-L:]
    n = len(s)
    np.testing.assert_array_equal(b["targets"][i, :n], s)
    assert (b["targets"][i, n:] == PAD_ID).all()
    np.testing.assert_array_equal(b["segment_ids"][i], (np.arange(L) < n).astype(np.int32))
    np.testing.assert_array_equal(b["positions"][i, :n], np.arange(n))


def test_critiques_follow_their_items(tasks):
  name, seqs = tasks["crit"]
  for pack in (True, False):
    b = stack(convert(name, converters.ItemSequencePackingConverter(pack=pack)))
    assert b["critiques"].dtype == np.int32
    real = b["segment_ids"] > 0
    np.testing.assert_array_equal(b["critiques"][real], critique_of(b["targets"][real]))
    assert (b["critiques"][~real] == 0).all()
    assert real.sum() == sum(min(len(s), L) for s in seqs)


def test_eval_converter(tasks):
  name, seqs = tasks["crit"]
  length = 20
  b = stack(convert(name, converters.ItemSequenceEvalConverter(), length=length))
  assert b["target"].shape == (len(seqs),) and b["inputs"].shape == (len(seqs), length)
  for i, s in enumerate(seqs):
    history = s[:-1][-(length - 1):]
    n = len(history)
    assert b["target"][i] == s[-1] and b["mask_position"][i] == n and b["example_id"][i] == i
    np.testing.assert_array_equal(b["inputs"][i, :n], history)
    assert b["inputs"][i, n] == MASK_ID and (b["inputs"][i, n + 1:] == PAD_ID).all()
    np.testing.assert_array_equal(b["segment_ids"][i], (np.arange(length) <= n).astype(np.int32))
    np.testing.assert_array_equal(b["positions"][i, :n + 1], np.arange(n + 1))
    # The critique given with the target step sits at the MASK.
    np.testing.assert_array_equal(b["critiques"][i, :n + 1], critique_of(s[-(n + 1):]))


def test_missing_example_id_is_a_clear_error():
  ds = tf.data.Dataset.from_tensors({"items": tf.constant([2, 3, 4], tf.int32)})
  with pytest.raises(ValueError, match="example_id"):
    converters.ItemSequencePackingConverter()(ds, {"items": 8})
  # Eval needs no example id.
  out = next(converters.ItemSequenceEvalConverter()(ds, {"items": 8}).as_numpy_iterator())
  assert out["target"] == 4 and "example_id" not in out


def test_pack_examples_any_dtype():
  ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1.5, 0.0], [0.0], [2.5, 3.5, 0.0]]))
  ds = ds.map(lambda x: {"x": x})
  rows = list(converters.pack_examples(ds, 4, window=8).as_numpy_iterator())
  # First fit decreasing: the 3 opens row 1, the 2 does not fit beside it, the 1 does.
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["x"], [2.5, 3.5, 0.0, 0.0])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0])
  np.testing.assert_array_equal(rows[1]["x"], [1.5, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 0, 0])
  assert rows[0]["x"].dtype == np.float32


def test_stored_padding_and_empty_sequences():
  ds = tf.data.Dataset.from_tensor_slices({
      "items": tf.constant([[5, 6, 0, 0], [0, 0, 0, 0], [7, 0, 0, 0]], tf.int32),
      "example_id": tf.constant([-3, 2**40, 9], tf.int64),  # any int64 id works
  })
  rows = list(converters.ItemSequencePackingConverter(pack=False)(ds, {"items": 3}).as_numpy_iterator())
  assert [r["targets"].tolist() for r in rows] == [[5, 6, 0], [7, 0, 0]]
  assert [r["weights"].sum() for r in rows[1:]] == [1.0]  # a single item is its own target
  rows = list(converters.ItemSequenceEvalConverter()(ds, {"items": 3}).as_numpy_iterator())
  assert [(r["inputs"].tolist(), r["target"], r["mask_position"]) for r in rows] == [
      ([5, MASK_ID, 0], 6, 1), ([MASK_ID, 0, 0], 7, 0)]


def test_ragged_sources():
  ds = tf.data.Dataset.from_tensor_slices({"items": tf.ragged.constant([[5, 6, 7], [8]], dtype=tf.int32),
                                           "example_id": tf.constant([0, 1], tf.int64)})
  assert isinstance(ds.element_spec["items"], tf.RaggedTensorSpec)
  rows = list(converters.ItemSequencePackingConverter()(ds, {"items": 4}).as_numpy_iterator())
  assert [r["targets"].tolist() for r in rows] == [[5, 6, 7, 8]]


def test_encoder_decoder_and_preference_converters_keep_recent_whole_ids():
  import tensorflow as tf
  from recjax.data.converters import EncoderDecoderConverter, PreferenceConverter, user_bucket
  ex = {"inputs": tf.ragged.constant([[3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5]], tf.int32),
        "targets": tf.constant([[20, 21, 22], [23, 24, 25]], tf.int32),
        "target_item": tf.constant([7, 8], tf.int32), "user_id": tf.constant([5, 6], tf.int32),
        "history": tf.ragged.constant([[2, 3, 4], [9]], tf.int32),
        "preferences": tf.ragged.constant([[4, 2], []], tf.int32), "sign": tf.constant([1.0, -1.0]),
        "text_id": tf.constant([11, 12], tf.int32)}
  ds = tf.data.Dataset.from_tensor_slices(ex)
  # 8 input tokens with a user token: 7 left, so the 2 most recent whole 3-token IDs.
  conv = EncoderDecoderConverter(input_unit=3, user_buckets=4, user_token_start=100)
  rows = next(conv(ds, {"inputs": 8, "targets": 3}).batch(2).as_numpy_iterator())
  user = 100 + user_bucket([5, 6], 4)
  np.testing.assert_array_equal(rows["encoder_input_tokens"],
                                [[user[0], 6, 7, 8, 9, 10, 11, 0], [user[1], 3, 4, 5, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["decoder_input_tokens"], [[0, 20, 21], [0, 23, 24]])
  np.testing.assert_array_equal(rows["decoder_loss_weights"], np.ones((2, 3)))
  assert set(rows) == {"encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
                       "decoder_loss_weights", "target_item", "user_id"}
  pref = PreferenceConverter(max_items=2, num_preferences=3, input_unit=3)
  rows = next(pref(ds, {"inputs": 6, "targets": 3}).batch(2).as_numpy_iterator())
  np.testing.assert_array_equal(rows["history"], [[3, 4], [9, 0]])  # the most recent items
  np.testing.assert_array_equal(rows["preferences"], [[3, 1, -1], [-1, -1, -1]])  # ids + 1 -> ids, -1 = none
  np.testing.assert_array_equal(rows["sign"], [1.0, -1.0])
  np.testing.assert_array_equal(rows["text"], [11, 12])
  with pytest.raises(ValueError, match="holds no whole input of 3 tokens"):
    conv(ds, {"inputs": 3, "targets": 3})
