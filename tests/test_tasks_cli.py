"""`recjax tasks list|show` and `recjax bench pipeline`."""

import json
import os
import subprocess
import sys

import pytest
import seqio

from recjax import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_tasks():
  try:
    from recjax import tasks  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "recjax.tasks":
      raise
    import tasks  # pylint: disable=g-import-not-at-top  (source checkout, not pip-installed)
  return tasks


@pytest.fixture(scope="module")
def datasets(synthetic_prepared):
  """--dataset arguments registering both synthetic sets under test-only names."""
  args = ["--dataset", f"cli_syn={synthetic_prepared['synthetic']}",
          "--dataset", f"cli_regen={synthetic_prepared['synthetic_regen']}"]
  yield args
  tasks = import_tasks()
  for name in ("cli_syn", "cli_regen"):
    tasks.unregister_dataset_tasks(name)


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_list_groups_tasks_by_dataset(capsys, datasets):
  code, out, _ = run(capsys, "tasks", "list", *datasets)
  assert code == 0
  assert "cli_syn  " in out and "(300 users" in out.replace(",", "")
  for name in ("cli_syn_items", "cli_syn_critique_precise", "cli_syn_critique_mix", "cli_regen_critique_regen"):
    line = next(l for l in out.splitlines() if l.split()[:1] == [name])
    assert len(line.split()) > 3  # name, kind, description
  assert "mixture" in next(l for l in out.splitlines() if "cli_syn_critique_mix " in l)
  # Text families are listed too.
  registered = import_tasks().tasks_by_dataset()["cli_syn"]
  assert all(name in out for name in registered)


def test_show_item_task_decodes_titles_and_critiques(capsys, datasets, synthetic_prepared):
  code, out, _ = run(capsys, "tasks", "show", "cli_regen_critique_regen", "--split", "test", "-n", "2", *datasets)
  assert code == 0
  assert out.count("--- cli_regen_critique_regen test example") == 2
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  items = pq.read_table(synthetic_prepared["synthetic_regen"] / "items.parquet").to_pylist()
  first = pq.read_table(synthetic_prepared["synthetic_regen"] / "sequences.parquet").to_pylist()[0]
  title = next(i["title"] for i in items if i["item_id"] == first["items"][-1])
  assert title[:40] in out  # the held-out item, with its title
  critique = next(c for c in first["critiques"] if c)
  assert f"critiques: {critique}" in out

  code, out, _ = run(capsys, "tasks", "show", "cli_syn_items", "-n", "1", *datasets)
  assert code == 0 and "critiques_precise: " in out and " > " in out


def test_show_text_task_decodes_prompt_and_target(capsys, datasets):
  import_tasks().register_dataset_tasks("cli_syn", datasets[1].split("=", 1)[1])
  ours = set(import_tasks().item_sequences.DESCRIPTIONS)
  text_task = next(n for n in import_tasks().tasks_by_dataset()["cli_syn"]
                   if n not in ours and n in seqio.TaskRegistry.names()
                   and {"inputs", "targets"} <= set(seqio.get_mixture_or_task(n).output_features))
  code, out, _ = run(capsys, "tasks", "show", text_task, "-n", "1", *datasets)
  assert code == 0
  assert "\ninputs: '" in out or '\ninputs: "' in out
  assert "\ntargets: " in out


@pytest.mark.parametrize("argv,message", [
    (["tasks", "show", "cli_syn_itemz"], "unknown task or mixture 'cli_syn_itemz'; did you mean cli_syn_items"),
    (["tasks", "show", "cli_syn_items", "--split", "dev"], "has no split 'dev'"),
    (["tasks", "list", "--dataset", "nodir"], "expected NAME=DIR"),
    (["tasks", "list", "--dataset", "cli_missing=/nonexistent/dir"], "has no manifest.json"),
    (["tasks", "list", "--dataset", "Bad-Name=/tmp"], "must match"),
])
def test_errors_are_one_sentence(capsys, datasets, argv, message):
  code, _, err = run(capsys, *argv, *(datasets if "show" in argv else []))
  assert code == 2
  assert err.startswith(f"recjax {argv[0]}: error: ") and message in err and err.count("\n") == 1


def test_unknown_dataset_key_error_is_one_sentence(capsys, monkeypatch):
  tasks = import_tasks()

  def unknown(*_):
    return tasks.registry.get("cli_nope")  # raises KeyError

  monkeypatch.setattr(tasks, "tasks_by_dataset", unknown)
  code, _, err = run(capsys, "tasks", "list")
  assert code == 2 and err.startswith("recjax tasks: error: unknown dataset 'cli_nope'")


def test_discovered_under_data_dir(synthetic_prepared):
  """A prepared directory under $RECJAX_DATA_DIR is registered by name, without Python."""
  env = dict(os.environ, RECJAX_DATA_DIR=str(synthetic_prepared["synthetic"].parent),
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-m", "recjax.main", "tasks", "list"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  names = [l.split()[0] for l in proc.stdout.splitlines() if l.startswith("  ")]
  assert {"synthetic_items", "synthetic_critique_mix", "synthetic_regen_critique_regen"} <= set(names)


def test_bench_pipeline_prints_json_lines(capsys, datasets):
  code, out, _ = run(capsys, "bench", "pipeline", *datasets[:2], "--steps", "2", "--batch_size", "8",
                     "--length", "30")
  assert code == 0
  rows = [json.loads(l) for l in out.splitlines()]
  assert [r["mode"] for r in rows] == ["packed", "padded"]
  for r in rows:
    assert r["task"] == "cli_syn_items" and r["examples_per_s"] > 0 and r["items_per_s"] > 0
    assert 0 < r["packing_efficiency"] <= 1
  packed, padded = rows
  assert packed["packing_efficiency"] > 0.8 > padded["packing_efficiency"]
  assert packed["examples_per_batch"] > padded["examples_per_batch"] == 8
