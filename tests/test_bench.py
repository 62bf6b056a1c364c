"""Bench smoke tests: tiny sizes, the JSON schema and sane values (never timings)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _json_lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def train_rows(synthetic_prepared):
  cmd = [sys.executable, "-m", "recjax.main", "bench", "train", "--dataset",
         f"tsyn={synthetic_prepared['synthetic']}", "--budget_s", "30", "--eval_every_s", "30",
         "--max_steps", "6", "--batch_size", "8", "--length", "20", "--dim", "16"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  return _json_lines(out.stdout)


def test_bench_train_rows(train_rows):
  dataset, alone, *evals = train_rows
  assert dataset["event"] == "dataset" and dataset["test_users"] > 200 and dataset["task"] == "tsyn_items"
  assert alone["event"] == "step_alone" and alone["step_s"] > 0 and alone["items_per_step"] > 0
  assert alone["gflop_per_step"] > 0 and 0 < alone["mfu"] < 1
  assert len(evals) == 1  # max_steps ends the run at its first evaluation
  row = evals[0]
  assert row["peer"] == "recjax" and row["model"] == "sasrec" and row["steps"] == 6
  assert 0 < row["sequences"] <= row["items"] <= 6 * 8 * 20
  assert row["targets"] == row["items"]  # SASRec scores every input position
  assert 0 <= row["input_wait_fraction"] < 1
  m = row["test"]
  assert 0 <= m["ndcg@10"] <= m["hr@10"] <= m["hr@20"] <= 1 and 0 < m["mrr"] <= 1


def test_bench_loop_rows(synthetic_prepared):
  cmd = [sys.executable, "-m", "recjax.main", "bench", "loop", "--dataset", f"tsyn={synthetic_prepared['synthetic']}",
         "--task", "tsyn_items", "--batch_size", "8", "--length", "20", "--steps", "2", "--rounds", "2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["mode"]: r for r in _json_lines(out.stdout)}
  assert set(rows) == {"alone", "reuse", "convert"}  # SASRec's converter is epoch-invariant
  for r in rows.values():
    assert r["steps"] == 4 and r["step_s"] > 0 and 0 <= r["blocked_in_next_fraction"] < 1
  assert rows["alone"]["overhead_vs_alone"] == 0 and rows["alone"]["blocked_in_next_fraction"] == 0


def test_scale_point_shards_the_item_table():
  from recjax.bench import scale
  one, two = scale.run(vocab_sizes=(1000,), device_counts=(2,), device_vocab_size=1000, batch_size=4, steps=1,
                       length=10, dim=8)
  assert one["sweep"] == "catalog" and two["sweep"] == "devices"
  assert one["devices"] == 1 and two["devices"] == 2 and two["mesh"]["model"] == 2
  assert one["item_table_shard_rows"] == 1024 and two["item_table_shard_rows"] == 512
  assert two["arguments_mib_per_device"] < one["arguments_mib_per_device"]
  assert one["step_s"] > 0 and one["temp_mib_per_device"] > 0


def test_scale_variants_losses_and_sparse_updates(tmp_path):
  from recjax.bench import scale
  # Every loss with the dense update, and the sampled loss with the sparse one (4 compiles, not 6).
  shape = dict(vocab_sizes=(3000,), device_counts=(), batch_size=4, steps=1, length=10, dim=8, num_negatives=64,
               loss_chunk=256)
  rows = (scale.run(losses=("full", "chunked", "sampled"), optimizers=("dense",), **shape)
          + scale.run(losses=("sampled",), optimizers=("sparse",), **shape))
  got = {(r["loss"], r["optimizer"]): r for r in rows}
  assert len(got) == 4 and all(r["step_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
  assert got[("sampled", "dense")]["num_negatives"] == 64 and got[("full", "dense")]["num_negatives"] == 0
  # The chunked loss never holds the [positions x catalogue] logits.
  assert got[("chunked", "dense")]["temp_mib_per_device"] < got[("full", "dense")]["temp_mib_per_device"]
  scale.plot(rows, tmp_path / "scale.png")  # one line per (loss, update)
  assert (tmp_path / "scale.png").stat().st_size > 1000


def test_report_writes_tables_and_figures(train_rows, tmp_path):
  from recjax.bench import suite
  results = tmp_path / "results"
  results.mkdir()
  (results / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
  doc = tmp_path / "docs" / "performance.md"
  doc.parent.mkdir()
  doc.write_text("# Performance\n\nhand-written text\n")
  section = suite.report(results, doc)
  assert "| recjax | sasrec |" in section and "model-FLOPs utilisation" in section
  assert (tmp_path / "docs" / "figures" / "train_quality.png").stat().st_size > 1000
  text = doc.read_text()
  assert text.startswith("# Performance\n\nhand-written text\n") and text.count(suite.BEGIN) == 1
  suite.report(results, doc)  # re-running replaces the generated section, keeps the rest
  assert doc.read_text() == text
