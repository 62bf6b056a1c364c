"""Input pipeline: sharding, epochs, resumable iteration, packing efficiency."""

import json
import uuid

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from recjax.data import converters, pipeline
from recjax.data.vocab import MASK_ID, NUM_RESERVED, ItemVocabulary

L = 50


def make_sequences(num, mean_len, seed=0):
  """Random-length sequences of globally unique tokens (token -> example)."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.geometric(1.0 / mean_len, size=num), 1, 3 * L)
  tokens = np.arange(NUM_RESERVED, NUM_RESERVED + lengths.sum(), dtype=np.int32)
  return np.split(tokens, np.cumsum(lengths)[:-1])


def register_task(seqs, num_items=20_000):
  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    ds = tf.data.Dataset.from_tensor_slices(
        {"items": tf.ragged.constant(seqs, dtype=tf.int32), "example_id": tf.range(len(seqs), dtype=tf.int64)})
    return ds.map(lambda ex: {"items": ex["items"], "example_id": ex["example_id"]})

  name = f"test_pipe_{uuid.uuid4().hex[:8]}"
  vocab = ItemVocabulary(num_items)  # one catalog, so tasks can share a mixture
  seqio.TaskRegistry.add(name, seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                         output_features={"items": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)})
  return name


@pytest.fixture(scope="module")
def task():
  seqs = make_sequences(600, 9)
  name = register_task(seqs)
  yield name, seqs
  seqio.TaskRegistry.remove(name)


def iterator(name, **kw):
  args = dict(split="train", feature_converter=converters.ItemSequencePackingConverter(seed=1),
              task_feature_lengths={"items": L}, batch_size=16, seed=7, epochs_per_chunk=2)
  args.update(kw)
  return pipeline.DataIterator(name, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def stream(task):
  """Three epochs of batches, and the (JSON round-tripped) state before each, converting
  every epoch (get_dataset's stream; reused rows are tested below)."""
  name, _ = task
  it = iterator(name, num_epochs=3, reuse_rows=False)
  batches, states = [], [it.state()]
  for batch in it:
    batches.append(batch)
    states.append(json.loads(json.dumps(it.state())))
  return batches, states


def test_state_restore_gives_exactly_the_next_batches(task, stream):
  name, _ = task
  batches, states = stream
  # 600 examples x ~9 items in rows of 50 at 16 rows/batch: ~7 batches an epoch.
  per_epoch = sum(s["epoch"] == 0 for s in states) - 1
  assert per_epoch >= 5 and len(batches) == 3 * per_epoch
  assert states[per_epoch] == {**states[per_epoch], "epoch": 0, "step": per_epoch}
  # Take 7, save, take 5 more: a fresh iterator restored to the saved state
  # yields the same 5, also across epoch ends (and the chunk end at epoch 2),
  # and from exactly an epoch's end.
  for k in (7, 2 * per_epoch - 2, per_epoch):
    fresh = iterator(name, num_epochs=3, reuse_rows=False)
    fresh.restore(states[k])
    assert_same(take(fresh, 5), batches[k:k + 5])
  fresh = iterator(name, num_epochs=3, reuse_rows=False)
  fresh.restore(states[-1])
  assert list(fresh) == []


def test_epochs_reshuffle_and_remask_the_same_examples(task, stream):
  name, seqs = task
  conv = converters.ItemSequencePackingConverter(seed=1)
  ds = pipeline.get_dataset(name, split="train", feature_converter=conv, task_feature_lengths={"items": L},
                            batch_size=16, seed=7, num_epochs=2)
  batches = list(ds.as_numpy_iterator())
  assert_same(batches, stream[0][:len(batches)])  # a re-run, and the same stream as the iterator
  half = len(batches) // 2
  e0 = {k: np.concatenate([b[k] for b in batches[:half]]) for k in batches[0]}
  e1 = {k: np.concatenate([b[k] for b in batches[half:]]) for k in batches[0]}
  assert e0["targets"].shape == (half * 16, L) and e0["targets"].dtype == np.int32
  assert not np.array_equal(e0["targets"], e1["targets"])  # reshuffled and repacked
  # Each epoch holds whole examples only (remainders dropped), most of them.
  for e in (e0, e1):
    tokens = e["targets"][e["segment_ids"] > 0]
    assert len(np.unique(tokens)) == len(tokens)
    assert len(tokens) > 0.8 * sum(min(len(s), L) for s in seqs)
  # The examples both epochs contain are masked differently.
  common = set(e0["targets"][e0["segment_ids"] > 0]) & set(e1["targets"][e1["segment_ids"] > 0])
  m0 = set(e0["targets"][e0["weights"] > 0].tolist()) & common
  m1 = set(e1["targets"][e1["weights"] > 0].tolist()) & common
  assert len(m0) > 100 and len(m0 & m1) < 0.5 * len(m0)


def test_shards_are_disjoint_and_split_the_batch(task):
  name, seqs = task
  got = []
  for index in range(2):
    ds = pipeline.get_dataset(name, split="train", feature_converter=converters.ItemSequenceEvalConverter(),
                              task_feature_lengths={"items": L}, batch_size=8, shuffle=False,
                              shard_info=seqio.ShardInfo(index, 2))
    batches = list(ds.as_numpy_iterator())
    assert batches[0]["inputs"].shape == (4, L)  # per-process batch = global // shards
    got.append(np.concatenate([b["example_id"] for b in batches]))
  assert not set(got[0]) & set(got[1])
  assert len(got[0]) + len(got[1]) == len(seqs) // 8 * 8
  with pytest.raises(ValueError, match="divisible"):
    iterator(name, batch_size=9, shard_info=seqio.ShardInfo(0, 2))


def test_packing_efficiency_packed_vs_padded(task):
  name, _ = task  # mean length ~9, rows of 50
  kw = dict(split="train", task_feature_lengths={"items": L}, batch_size=16, num_epochs=1)
  packed = list(pipeline.get_dataset(name, feature_converter=converters.ItemSequencePackingConverter(), **kw)
                .as_numpy_iterator())
  padded = list(pipeline.get_dataset(name, feature_converter=converters.ItemSequencePackingConverter(pack=False),
                                     **kw).as_numpy_iterator())
  eff_packed = np.mean([pipeline.packing_efficiency(b) for b in packed])
  eff_padded = np.mean([pipeline.packing_efficiency(b) for b in padded])
  assert eff_packed > 0.95, eff_packed
  assert 0.12 < eff_padded < 0.25, eff_padded
  assert pipeline.packing_efficiency({"segment_ids": np.array([[1, 1, 2, 0]])}) == 0.75


def test_mixture_keeps_example_ids(task):
  name, _ = task
  other = register_task(make_sequences(300, 9, seed=3))
  mix = f"test_mix_{uuid.uuid4().hex[:8]}"
  seqio.MixtureRegistry.add(mix, [(name, 1.0), (other, 1.0)])
  try:
    it = iterator(mix, num_epochs=1)
    batches = list(it)
    assert batches and all(b["inputs"].shape == (16, L) for b in batches)
    spec = it.element_spec
    assert spec["inputs"].shape == (16, L) and spec["weights"].dtype == np.float32
  finally:
    seqio.MixtureRegistry.remove(mix)
    seqio.TaskRegistry.remove(other)


def test_clear_errors(task):
  name, _ = task
  with pytest.raises(ValueError, match="Unknown SeqIO task"):
    iterator("no_such_task_xyz")
  state = iterator(name).state()
  with pytest.raises(ValueError, match="configured differently"):
    iterator(name, seed=8).restore(state)
  with pytest.raises(ValueError, match="smaller than one batch"):
    next(iterator(name, batch_size=4096, epochs_per_chunk=1))


def _rows(batches):
  """Each packed row as a hashable tuple of its (inputs, targets, segment_ids)."""
  return [tuple(map(bytes, (b["inputs"][i], b["targets"][i], b["segment_ids"][i])))
          for b in batches for i in range(len(b["inputs"]))]


def test_epoch_invariant_converter_reuses_epoch_0_rows(task):
  name, seqs = task
  next_item = lambda **kw: iterator(name, feature_converter=converters.NextItemPackingConverter(), **kw)
  it = next_item(num_epochs=3)
  batches, states = [], [it.state()]
  for batch in it:
    batches.append(batch)
    states.append(json.loads(json.dumps(it.state())))
  # The state after a batch names that batch's epoch.
  epochs = [[b for b, s in zip(batches, states[1:]) if s["epoch"] == e] for e in range(3)]
  assert all(len(e) >= 5 for e in epochs) and states[-1]["reuse_rows"] is True
  # Epoch 0 is tf.data's; later epochs serve whole batches of its rows (its partial last
  # batch included) in a new order each epoch, each row at most once.
  all_rows = set(_rows(epochs[0])) | set(_rows(epochs[1])) | set(_rows(epochs[2]))
  tokens = np.concatenate([np.frombuffer(r[1], np.int32) for r in all_rows])
  tokens = tokens[tokens > 0]
  assert len(tokens) == len(np.unique(tokens)) == sum(min(len(s), L) - 1 for s in seqs if len(s) > 1)
  for e in (1, 2):
    rows = _rows(epochs[e])
    assert len(rows) == len(set(rows)) >= len(_rows(epochs[0]))
  assert _rows(epochs[1]) != _rows(epochs[2])
  # Resuming anywhere (mid epoch 0, mid epoch 1, at an epoch end) gives the same batches.
  per_epoch = len(epochs[0])
  for k in (3, per_epoch + 2, 2 * per_epoch, len(batches) - 2):
    fresh = next_item(num_epochs=3)
    fresh.restore(states[k])
    assert_same(list(fresh), batches[k:])
  # reuse_rows=False converts every epoch again: other packings, and a state that
  # cannot resume the reusing stream.
  plain = next_item(num_epochs=2, reuse_rows=False)
  again = list(plain)
  assert_same(again[:per_epoch], epochs[0][:per_epoch])
  assert not set(_rows(again[per_epoch:])) <= set(_rows(epochs[0]))
  with pytest.raises(ValueError, match="configured differently"):
    next_item(num_epochs=3, reuse_rows=False).restore(states[3])


def _masked_tokens(batches):
  """Per batch list -> ({target token: masked?}, set of masked tokens)."""
  seen = {}
  for b in batches:
    real = b["segment_ids"] > 0
    for tok, w in zip(b["targets"][real], b["weights"][real]):
      assert tok not in seen  # each example at most once per epoch
      seen[int(tok)] = bool(w)
  return seen


def test_cloze_converter_reuses_rows_with_the_same_masks_per_epoch(task):
  name, seqs = task
  reused = iterator(name, num_epochs=3)
  assert reused.state()["reuse_rows"] is True  # auto: the masks split off the packing
  states, batches = [reused.state()], []
  for b in reused:
    batches.append(b)
    states.append(reused.state())
  plain = list(iterator(name, num_epochs=3, reuse_rows=False))
  by_epoch = lambda bs, st: [[b for b, s in zip(bs, st) if s["epoch"] == e] for e in range(3)]
  per_epoch = sum(s["epoch"] == 0 for s in states[1:])
  ours = by_epoch(batches, states[1:])
  theirs = [plain[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
  masks = []
  for e in range(3):
    a, b = _masked_tokens(ours[e]), _masked_tokens(theirs[e])
    common = a.keys() & b.keys()
    assert len(common) > 0.9 * len(b)
    # numpy masks on reused rows == tf masks converted that epoch, example by example.
    assert {t: a[t] for t in common} == {t: b[t] for t in common}
    assert all((b["inputs"][b["weights"] > 0] == MASK_ID).all() for b in ours[e])
    masks.append({t for t in common if a[t]})
    for b in ours[e]:
      np.testing.assert_array_equal(b["inputs"] == b["targets"], (b["weights"] == 0))
  assert masks[0] != masks[1] != masks[2]  # fresh masks every epoch
  assert set(ours[0][0]) == set(theirs[0][0])  # the same model features
  # Resuming in epoch 1 gives the same batches (masks included).
  fresh = iterator(name, num_epochs=3)
  fresh.restore(states[per_epoch + 2])
  assert_same(list(fresh), batches[per_epoch + 2:])
  # A position saved by a converting iterator names the switch that resumes it.
  plain_state = iterator(name, num_epochs=3, reuse_rows=False).state()
  with pytest.raises(ValueError, match="reuse_rows=False"):
    iterator(name, num_epochs=3).restore(plain_state)


def test_to_global(stream):
  batch = stream[0][0]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  out = pipeline.to_global(batch, sharding)
  assert out["inputs"].shape == (16 * jax.process_count(), L)
  np.testing.assert_array_equal(np.asarray(out["segment_ids"]), batch["segment_ids"])


def test_train_item_counts_of_a_prepared_dataset_equal_counting_the_task(synthetic_prepared, monkeypatch):
  """Item-sequence tasks read the train split's counts from the prepared dataset (`recjax
  prepare` counted them); they equal counting the task's own train examples."""
  import recjax.tasks as tasks
  item_sequences = tasks.item_sequences
  tasks.register_dataset_tasks("pcount", synthetic_prepared["synthetic"])
  rows = 4096
  for name in ("pcount_items", "pcount_critique_mix"):
    fast = pipeline.train_item_counts(name, rows)
    first = seqio.get_mixture_or_task(name)
    first = first.tasks[0].name if isinstance(first, seqio.Mixture) else name
    with monkeypatch.context() as m:
      m.delitem(item_sequences.SOURCE_ITEMS, first)
      counted = pipeline.train_item_counts(name, rows)
    np.testing.assert_array_equal(fast, counted)
    assert fast[:NUM_RESERVED].sum() == 0 and fast.sum() > 1000
  with pytest.raises(ValueError, match="table of 10 rows"):
    pipeline.train_item_counts("pcount_items", 10)
