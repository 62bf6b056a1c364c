"""Task families 1 and 3 (item sequences, critiques) over the synthetic prepared datasets."""

import collections
import gzip
import json

import gin
import numpy as np
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

from recjax.data import converters, pipeline, prepare
from recjax.data import sequence_preprocessors as sp
from recjax.data.vocab import MASK_ID, NUM_RESERVED, ItemVocabulary

L = 20
SPLIT_DROP = {"train": 2, "validation": 1, "test": 0}
FAMILY_SUFFIXES = ["items", "critique_precise", "critique_broad", "critique_none"]


def import_tasks():
  try:
    from recjax import tasks  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "recjax.tasks":
      raise
    import tasks  # pylint: disable=g-import-not-at-top  (source checkout, not pip-installed)
  return tasks


@pytest.fixture(scope="module")
def tasks_module():
  return import_tasks()


@pytest.fixture(scope="module")
def registered(tasks_module, synthetic_prepared):
  """Tasks of both synthetic datasets under test-only names; removed afterwards."""
  dirs = {"it_syn": synthetic_prepared["synthetic"], "it_regen": synthetic_prepared["synthetic_regen"]}
  names = {ds: tasks_module.register_dataset_tasks(ds, d) for ds, d in dirs.items()}
  yield dirs, names
  for ds in dirs:
    tasks_module.unregister_dataset_tasks(ds)


def sequences(data_dir, columns=("items",)):
  return pq.read_table(data_dir / "sequences.parquet", columns=["user_id", *columns]).to_pylist()


def examples(name, split):
  provider = seqio.get_mixture_or_task(name)
  kwargs = dict(split=split, shuffle=False, num_epochs=1, trim_output_features=False)
  if isinstance(provider, seqio.Mixture):
    kwargs.update(seed=0, passthrough_features=["example_id", "user_id"])
  else:
    kwargs.update(try_in_mem_cache=False)
  return list(provider.get_dataset(None, **kwargs).as_numpy_iterator())


def test_names_and_features(registered):
  _, names = registered
  # Families 1 and 3 come first; the text families follow.
  ours = ["it_syn_" + s for s in FAMILY_SUFFIXES] + ["it_syn_critique_mix", "it_syn_critique_mix_precise"]
  assert names["it_syn"][:len(ours)] == ours and "it_syn_critique_regen" not in names["it_syn"]
  ours = ["it_regen_" + s for s in FAMILY_SUFFIXES] + ["it_regen_critique_mix", "it_regen_critique_mix_precise",
                                                      "it_regen_critique_regen"]
  assert names["it_regen"][:len(ours)] == ours
  items = seqio.get_mixture_or_task("it_syn_items").output_features
  assert sorted(items) == ["critiques_broad", "critiques_precise", "items"]
  assert isinstance(items["items"].vocabulary, ItemVocabulary) and not items["items"].add_eos
  # Precise, broad and none share one table (so they mix); REGEN has its own.
  crit = [seqio.get_mixture_or_task(f"it_regen_critique_{k}").output_features["critiques"].vocabulary
          for k in ("precise", "broad", "none", "regen")]
  assert crit[0] == crit[1] == crit[2] != crit[3]
  assert crit[3].table == tuple(sp.critique_table(registered[0]["it_regen"], "regen"))
  assert isinstance(seqio.get_mixture_or_task("it_syn_critique_mix"), seqio.Mixture)
  rates = {t.name: seqio.get_mixture_or_task("it_syn_critique_mix_precise").get_rate(t)
           for t in seqio.get_mixture_or_task("it_syn_critique_mix_precise").tasks}
  assert rates == {"it_syn_critique_precise": 2.0, "it_syn_critique_broad": 1.0, "it_syn_critique_none": 1.0}


@pytest.mark.parametrize("dataset,suffix", [("it_syn", s) for s in FAMILY_SUFFIXES]
                         + [("it_regen", "critique_regen"), ("it_regen", "items")])
def test_examples_are_well_formed(registered, dataset, suffix):
  dirs, _ = registered
  data_dir = dirs[dataset]
  name = f"{dataset}_{suffix}"
  features = seqio.get_mixture_or_task(name).output_features
  rows = sequences(data_dir, ("items", "critiques") if suffix == "critique_regen" else ("items",))
  vocab_size = features["items"].vocabulary.vocab_size
  regen_index = {s: i for i, s in enumerate(sp.critique_table(data_dir, "regen"))} if suffix.endswith("regen") else {}
  for split, drop in SPLIT_DROP.items():
    exs = examples(name, split)
    assert len(exs) == len(rows)
    for ex, row in zip(exs, rows):
      assert ex["example_id"] == ex["user_id"] == row["user_id"]
      expected = row["items"][:len(row["items"]) - drop]
      assert ex["items"].dtype == np.int32 and ex["items"].tolist() == expected
      assert ((ex["items"] >= NUM_RESERVED) & (ex["items"] < vocab_size)).all()
      # Validation / test examples end with the held-out item.
      if split != "train":
        assert ex["items"][-1] == row["items"][-1 - (split == "validation")]
      for key, feature in features.items():
        if key == "items":
          continue
        ids = ex[key]
        assert ids.dtype == np.int32 and ids.shape == ex["items"].shape
        assert ((ids >= 0) & (ids < feature.vocabulary.vocab_size)).all()
        if suffix == "critique_none":
          assert not ids.any()
        elif suffix == "critique_regen":
          strings = [c or "" for c in row["critiques"][:len(expected)]]
          assert ids.tolist() == [regen_index[s] for s in strings]
        else:
          granularity = "broad" if key.endswith("broad") or suffix == "critique_broad" else "precise"
          assert ids.tolist() == sp.item_critique_ids(data_dir, granularity)[ex["items"]].tolist()


def test_mixture_yields_examples_of_its_tasks(registered):
  exs = examples("it_syn_critique_mix", "validation")
  assert exs and all(ex["items"].shape == ex["critiques"].shape for ex in exs)
  table = seqio.get_mixture_or_task("it_syn_critique_mix").output_features["critiques"].vocabulary.table
  # Precise, broad and no-critique examples all appear (ids at 4, 2 and 0 levels).
  depths = {table[int(c)].count(sp.PATH_SEPARATOR) + 1 if c else 0 for ex in exs for c in ex["critiques"]}
  assert {0, 2, 4} <= depths


def _write_regen(path):
  """Four items (5, 3, 1 and 0 category levels) and three users with critiques."""
  cats = {"A1": "Office - Paper - Notebooks - Spiral - Small", "A2": "Office - Paper - Notebooks",
          "A3": "Office", "A4": ""}
  users = {"u1": [("A1", None), ("A2", "cheaper please"), ("A3", "<no_critique>"), ("A1", "in blue")],
           "u2": [("A2", None), ("A3", "cheaper please"), ("A4", None)],
           "u3": [("A3", None), ("A4", None), ("A1", "zzz last")]}
  with gzip.open(path, "wt") as f:
    for user, history in users.items():
      entries = []
      for t, (asin, critique) in enumerate(history):
        entry = {"item": {"asin": asin, "title": f"title {asin}", "category": cats[asin]},
                 "review": {"rating": 4, "unix_time": 1_000_000 + t}}
        if critique is not None:
          entry["critique"] = critique
        entries.append(entry)
      f.write(json.dumps({"reviewer_id": user, "purchase_history": entries}) + "\n")


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
  root = tmp_path_factory.mktemp("hand")
  _write_regen(root / "h.jsonl.gz")
  prepare.prepare("regen", root / "h.jsonl.gz", root / "prepared")
  return root / "prepared"


def test_critique_tables_on_a_hand_made_dataset(hand_made):
  assert sp.critique_table(hand_made, "category") == [
      "", "Office", "Office > Paper", "Office > Paper > Notebooks", "Office > Paper > Notebooks > Spiral"]
  # Items A1..A4 are ids 2..5; PAD and MASK have no critique.
  assert sp.item_critique_ids(hand_made, "precise").tolist() == [0, 0, 4, 3, 1, 0]
  assert sp.item_critique_ids(hand_made, "broad").tolist() == [0, 0, 2, 2, 1, 0]
  assert sp.critique_table(hand_made, "regen") == ["", "cheaper please", "in blue", "zzz last"]
  with pytest.raises(ValueError, match="kind"):
    sp.critique_table(hand_made, "nope")


def test_critique_tasks_on_a_hand_made_dataset(tasks_module, hand_made):
  names = tasks_module.register_dataset_tasks("it_hand", hand_made)
  try:
    assert "it_hand_critique_regen" in names
    test = examples("it_hand_critique_regen", "test")
    assert [ex["critiques"].tolist() for ex in test] == [[0, 1, 0, 2], [0, 1, 0], [0, 0, 3]]
    broad = examples("it_hand_critique_broad", "validation")
    assert [ex["critiques"].tolist() for ex in broad] == [[2, 2, 1], [2, 1], [1, 0]]
  finally:
    tasks_module.unregister_dataset_tasks("it_hand")


def test_critique_vocabulary_round_trips(hand_made):
  vocab = sp.CritiqueVocabulary(hand_made, "regen")
  assert vocab.vocab_size == 4 and vocab.pad_id == 0 and vocab.eos_id is None
  text = "cheaper please |  | zzz last"
  assert vocab.decode([1, 0, 3]) == text and vocab.encode(text) == [1, 0, 3]
  assert vocab.decode_tf(tf.constant([1, 0, 3])).numpy().decode() == text
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == [1, 0, 3]
  with pytest.raises(ValueError, match="not in the critique table"):
    vocab.encode("never said")
  assert vocab == sp.CritiqueVocabulary(hand_made, "regen") != sp.CritiqueVocabulary(hand_made, "category")
  assert sp.CritiqueVocabulary(table=["", "a"]) == sp.CritiqueVocabulary(table=["", "a"])


def packed_rows(task, split="train", seed=3, length=L):
  conv = converters.ItemSequencePackingConverter(pack=True, seed=seed)
  ds = seqio.get_mixture_or_task(task).get_dataset(
      {"items": length}, split=split, shuffle=True, seed=5, num_epochs=1, trim_output_features=False)
  return list(conv(ds, {"items": length}).as_numpy_iterator())


def test_packing_invariants_through_the_task(registered):
  dirs, _ = registered
  rows = packed_rows("it_syn_critique_precise")
  precise = sp.item_critique_ids(dirs["it_syn"], "precise")
  segments = collections.Counter()
  for r in rows:
    assert {k: v.shape for k, v in r.items()} == {k: (L,) for k in
                                                  ("inputs", "targets", "weights", "segment_ids", "positions",
                                                   "critiques")}
    seg = r["segment_ids"]
    used = int(np.count_nonzero(seg))
    assert (seg[:used] > 0).all() and not seg[used:].any()  # real tokens first, then padding
    assert seg[0] == 1 and set(np.diff(seg[:used])) <= {0, 1}  # segments 1..k, contiguous
    for s in range(1, seg.max() + 1):
      at = seg == s
      assert r["positions"][at].tolist() == list(range(at.sum()))
      assert r["weights"][at].sum() >= 1  # every example has a target
      segments[tuple(r["targets"][at].tolist())] += 1
    masked = r["weights"] > 0
    assert (r["inputs"][masked] == MASK_ID).all()
    assert (r["inputs"][~masked] == r["targets"][~masked]).all()
    assert not r["weights"][seg == 0].any() and not r["targets"][seg == 0].any()
    # Critiques stay aligned with their item and are never masked.
    assert (r["critiques"] == np.where(seg > 0, precise[r["targets"]], 0)).all()
  # Each training prefix appears exactly once, trimmed to its most recent L items.
  expected = collections.Counter(tuple(row["items"][:-2][-L:]) for row in sequences(dirs["it_syn"]))
  assert segments == expected
  efficiency = sum(np.count_nonzero(r["segment_ids"]) for r in rows) / (len(rows) * L)
  assert efficiency > 0.9


def test_eval_examples_end_with_the_held_out_item(registered):
  dirs, _ = registered
  conv = converters.ItemSequenceEvalConverter()
  ds = seqio.get_mixture_or_task("it_syn_critique_precise").get_dataset(
      {"items": L}, split="test", shuffle=False, num_epochs=1, trim_output_features=False)
  precise = sp.item_critique_ids(dirs["it_syn"], "precise")
  rows = sequences(dirs["it_syn"])
  for ex, row in zip(conv(ds, {"items": L}).as_numpy_iterator(), rows):
    assert ex["target"] == row["items"][-1] and ex["example_id"] == row["user_id"]
    m = ex["mask_position"]
    assert ex["inputs"][m] == MASK_ID and ex["inputs"][:m].tolist() == row["items"][:-1][-(L - 1):]
    assert ex["critiques"][m] == precise[row["items"][-1]]  # the critique of the target


def make_iterator(task="it_syn_critique_precise", seed=7):
  return pipeline.DataIterator(task, split="train", feature_converter=converters.ItemSequencePackingConverter(seed=1),
                               task_feature_lengths={"items": L}, batch_size=16, shuffle=True, seed=seed,
                               shard_info=seqio.ShardInfo(0, 1), epochs_per_chunk=1)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_deterministic_across_runs_and_resume(registered):
  # Run into the second epoch, recording the resumable state after every batch.
  it = make_iterator()
  run, states = [], []
  while not states or states[-1]["epoch"] < 1 or states[-1]["step"] < 3:
    run.append(next(it))
    states.append(json.loads(json.dumps(it.state())))  # as a checkpoint would store it
  per_epoch = len(run) - 3
  # A second run gives the same batches.
  again = make_iterator()
  assert_batches_equal(run, [next(again) for _ in run])
  # Resuming mid-epoch 1 (after its first batch) continues with exactly the next batches.
  assert states[per_epoch]["epoch"] == 1 and states[per_epoch]["step"] == 1
  resumed = make_iterator()
  resumed.restore(states[per_epoch])
  assert_batches_equal([next(resumed), next(resumed)], run[per_epoch + 1:])
  # Masks are resampled per epoch, so epoch 1 is not epoch 0 again.
  assert not all(np.array_equal(a["weights"], b["weights"]) for a, b in zip(run, run[per_epoch:]))


def test_register_is_idempotent_and_repointable(tasks_module, synthetic_prepared):
  try:
    a = tasks_module.register_dataset_tasks("it_move", synthetic_prepared["synthetic"])
    assert tasks_module.register_dataset_tasks("it_move", synthetic_prepared["synthetic"]) == a
    assert tasks_module.register_dataset_tasks("it_move") == a  # by name, from the registry
    assert "it_move_critique_regen" not in seqio.TaskRegistry.names()
    b = tasks_module.register_dataset_tasks("it_move", synthetic_prepared["synthetic_regen"])
    assert "it_move_critique_regen" in b and "it_move_critique_regen" in seqio.TaskRegistry.names()
    assert tasks_module.dataset_of("it_move_items") == "it_move"
    assert tasks_module.data_dir_of("it_move_items") == synthetic_prepared["synthetic_regen"].resolve()
  finally:
    tasks_module.unregister_dataset_tasks("it_move")
  assert not [n for n in seqio.TaskRegistry.names() if n.startswith("it_move_")]
  assert not [n for n in seqio.MixtureRegistry.names() if n.startswith("it_move_")]


def test_register_through_gin(tasks_module, synthetic_prepared):
  path = synthetic_prepared["synthetic"]
  try:
    with gin.unlock_config():
      gin.parse_config(f'recjax.tasks.register_datasets.datasets = {{"it_gin": "{path}"}}')
    assert "it_gin_items" in tasks_module.register_datasets()
    assert "it_gin_items" in seqio.TaskRegistry.names()
  finally:
    gin.clear_config()
    tasks_module.unregister_dataset_tasks("it_gin")


def test_unknown_dataset_is_one_sentence(tasks_module):
  with pytest.raises(KeyError, match="unknown dataset 'it_nope'"):
    tasks_module.register_dataset_tasks("it_nope")


def test_eval_batches_report_progress_with_rows_rate_and_eta(registered, capsys):
  """A long evaluation says how far it is: one line per `progress_every_s` (here every
  batch), counting rows of the split (max_rows honoured), with a rate and an ETA."""
  from recjax.evaluation import evaluate as eval_lib
  conv = converters.ItemSequenceEvalConverter()
  rows = len(sequences(registered[0]["it_syn"]))
  batches = list(eval_lib.eval_batches("it_syn_items", "test", conv, {"items": L}, 16, progress_every_s=0.0))
  lines = capsys.readouterr().out.splitlines()
  n = -(-rows // 16)
  assert len(batches) == n and len(lines) == n - 1  # none after the first batch (compilation)
  assert lines[0].startswith(f"evaluating it_syn_items/test: batch 2/{n}, 32 of {rows:,} rows, ")
  assert lines[-1].startswith(f"evaluating it_syn_items/test: batch {n}/{n}, {rows:,} of {rows:,} rows, ")
  assert " rows/s, ETA " in lines[0] and lines[-1].endswith("ETA 0:00")
  list(eval_lib.eval_batches("it_syn_items", "test", conv, {"items": L}, 16, max_rows=40, progress_every_s=0.0))
  assert capsys.readouterr().out.splitlines()[-1].startswith("evaluating it_syn_items/test: batch 3/3, 40 of 40 rows")
  list(eval_lib.eval_batches("it_syn_items", "test", conv, {"items": L}, 16))  # default: once a minute
  assert capsys.readouterr().out == ""
