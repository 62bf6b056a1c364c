"""Critiquing evaluation: path mutation, Cat-nDCG, and FLARE end to end on synthetic data."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from recjax.evaluation import critiquing

REPO = pathlib.Path(__file__).resolve().parents[1]

PATHS = [("a", "b", "c", "d"), ("a", "b", "c", "e"), ("a", "b", "f", "g"), ("a", "h", "i", "j"),
         ("k", "l", "m", "n"), ("a", "b", "c")]


def test_shared_levels():
  assert critiquing.shared_levels(("a", "b", "c"), ("a", "b", "x")) == 2
  assert critiquing.shared_levels(("a",), ("b",)) == 0
  assert critiquing.shared_levels(("a", "b"), ("a", "b", "c")) == 2


@pytest.mark.parametrize("level", [2, 3, 4])
def test_mutated_path_keeps_the_prefix_and_changes_the_level(level):
  rng = np.random.default_rng(0)
  original = ("a", "b", "c", "d")
  seen = set()
  for _ in range(50):
    new = critiquing.mutate_path(original, level, PATHS, rng)
    assert new in PATHS  # a real catalogue path: still valid
    assert new[:level - 1] == original[:level - 1] and new[level - 1] != original[level - 1]
    seen.add(new)
  expected = {p for p in PATHS if len(p) >= level and p[:level - 1] == original[:level - 1]
              and p[level - 1] != original[level - 1]}
  assert seen == expected  # every candidate is drawn


def test_no_alternative_path_gives_none():
  rng = np.random.default_rng(0)
  assert critiquing.mutate_path(("k", "l", "m", "n"), 4, PATHS, rng) is None  # only child
  assert critiquing.mutate_path(("a", "b"), 3, PATHS, rng) is None  # too short


def test_cat_dcg_is_one_for_the_ideal_ranking():
  rel = np.array([4, 4, 3, 2, 0, 1], float)
  ideal = critiquing.cat_dcg(np.sort(rel)[::-1], 10)
  assert critiquing.cat_dcg(np.sort(rel)[::-1], 10) / ideal == pytest.approx(1.0)
  assert critiquing.cat_dcg(rel[::-1], 10) / ideal < 1.0
  assert critiquing.cat_dcg(np.array([0.0, 0.0, 4.0]), 2) == 0.0  # beyond k


def test_candidate_ideal_leaves_out_the_history():
  r = critiquing.ranking.NUM_RESERVED
  index = object.__new__(critiquing.CategoryIndex)  # items r.. have PATHS' categories
  index.paths, index.vocab_size, index._counts = [()] * r + PATHS, r + len(PATHS), {}
  path = ("a", "b", "c", "d")  # relevances of PATHS: 4, 3, 2, 1, 0, 3
  assert index.ideal_dcg(path, 3) == pytest.approx(critiquing.cat_dcg(np.array([4, 3, 3.0])))
  # The exact match and one 3 are in the history; reserved ids and repeats are ignored.
  history = [0, 1, r, r + 1, r + 1]
  assert index.ideal_dcg(path, 3, exclude=history) == pytest.approx(critiquing.cat_dcg(np.array([3, 2, 1.0])))
  assert index.ideal_dcg(path, 10, exclude=history) == pytest.approx(critiquing.cat_dcg(np.array([3, 2, 1, 0.0])))


class _ConstantScorer:
  """Scores item i as -i: the top 10 are always the 10 lowest ids."""

  def __init__(self, vocab_size):
    import jax.numpy as jnp
    self.params, self.vocab_size = None, vocab_size
    self.item_table = jnp.asarray(-np.arange(vocab_size, dtype=np.float32))[:, None]
    self.bias = None

  def queries_fn(self, params, features):
    import jax.numpy as jnp
    return jnp.ones((features["inputs"].shape[0], 1), jnp.float32)


def test_mutated_critique_names_a_category_of_min_items():
  """FLARE footnote 2: a mutated critique's category holds at least `min_items` items."""
  r = critiquing.ranking.NUM_RESERVED
  big, small = ("a", "b", "c", "e"), ("a", "b", "c", "f")
  paths = [()] * r + [("a", "b", "c", "d")] * 3 + [big] * 5 + [small] * 2
  index = object.__new__(critiquing.CategoryIndex)
  index.paths, index.vocab_size, index._counts = paths, len(paths), {}
  index.items_per_path = collections.Counter(p for p in paths if p)
  index.distinct = sorted(index.items_per_path)
  index.critique_id = {p: i + 1 for i, p in enumerate(index.distinct)}
  batch = {"inputs": np.full((3, 2), r + 9), "critiques": np.zeros((3, 2), np.int32),
           "mask_position": np.ones(3, np.int32), "valid": np.array([True, True, True]),
           "target": np.array([r, r + 1, r + 3])}  # two users of path ...d, one of ...e
  scorer = _ConstantScorer(len(paths))
  strict = critiquing.out_of_sequence(scorer, [batch], index, 4, min_items=5)
  # Users of ...d may only be sent to ...e (5 items); the ...e user's alternatives (...d: 3
  # items, ...f: 2) are too small.
  assert strict["count"] == 2 and strict["skipped"] == 1
  loose = critiquing.out_of_sequence(scorer, [batch], index, 4, min_items=1)
  assert loose["count"] == 3 and loose["skipped"] == 0


def _recjax(*args, dataset, timeout=1200):
  env = dict(os.environ, RECJAX_DATA_DIR=str(pathlib.Path(dataset).parent))
  cmd = [sys.executable, "-m", "recjax.main", *map(str, args), "--dataset", f"synthetic={dataset}"]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_flare_with_critiques_end_to_end(synthetic_prepared, tmp_path):
  """Train FLARE on the critique mixture (gin experiment), export it and re-evaluate the
  export. The critiquing evaluation and one user's explanation of a FLARE checkpoint run
  in the main job (tests/test_train.py::test_main_job_tiny)."""
  data = synthetic_prepared["synthetic"]
  common = ["--gin_file=experiments/flare_synthetic.gin", f"--gin.MODEL_DIR='{tmp_path / 'm'}'",
            f"--gin.EXPORT_DIR='{tmp_path / 'e'}'", f"--gin.flare.Flare.text_cache_dir='{tmp_path / 'cache'}'"]
  out = _recjax("train", *common, "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16", dataset=data)
  assert out.returncode == 0, out.stderr[-3000:]
  assert list((tmp_path / "cache").glob("text-*/states.npy")), "the token states were cached"
  out = _recjax("export", *common, dataset=data)
  assert out.returncode == 0, out.stderr[-3000:]
  ev = _recjax("evaluate", *common, dataset=data)
  ex = _recjax("evaluate", *common, f"--exported={tmp_path / 'e'}", dataset=data)
  assert ev.returncode == 0 and ex.returncode == 0, (ev.stderr + ex.stderr)[-3000:]
  ckpt = json.loads((tmp_path / "m" / "eval_step_30.json").read_text())["results"]
  exported = json.loads((tmp_path / "e" / "eval_export.json").read_text())["results"]
  assert ckpt == exported


def test_sweep_reports_the_critiquing_evaluation_per_seed(synthetic_prepared, tmp_path):
  """`recjax sweep --evaluation critique`: each seed's critique_step_N.json (in-sequence
  rows and Cat-nDCG per level) is what sweep.json aggregates into mean and std."""
  data = synthetic_prepared["synthetic"]
  out = _recjax("sweep", "--gin_file=experiments/flare_synthetic.gin", "--seeds", "0,1", "--evaluation", "critique",
                f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.flare.Flare.text_cache_dir='{tmp_path / 'cache'}'",
                "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=16", dataset=data)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "sweep.json").read_text())
  per_seed = [json.loads((tmp_path / f"seed_{s}" / "critique_step_6.json").read_text()) for s in (0, 1)]
  for row in ("test/precise", "test/broad", "test/none", "test/level_4", "test/level_2"):
    metric = "cat_ndcg@10" if "level" in row else "recall@10"
    values = [p["results"][row][metric] for p in per_seed]
    got = summary["mean_std"][row][metric]
    assert got["values"] == values and got["mean"] == pytest.approx(np.mean(values))
    assert got["std"] == pytest.approx(np.std(values, ddof=1))
  assert per_seed[0]["results"]["test/level_4"] == per_seed[0]["out_of_sequence"]["level_4"]
  assert summary["mean_std"]["test/level_4"]["count"] == per_seed[1]["out_of_sequence"]["level_4"]["count"]
  assert "cat_ndcg@10" in out.stdout and "test/level_4" in out.stdout
