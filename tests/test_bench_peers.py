"""The RecBole peer's pure-Python parts: Beauty -> atomic file conversion and the driver's plumbing.

None of these tests builds the RecBole virtualenv or imports torch/recbole: the driver is run
against a fake "python" that prints what the real runner would.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from recjax.bench.peers import driver, recbole_runner

BEAUTY = "1 10 11 12 13 14\n2 12 15 16 10 17\n\n3 18 10 15 19 11 20\n"


def test_convert_beauty_writes_atomic_file_in_order(tmp_path):
  src = tmp_path / "Beauty.txt"
  src.write_text(BEAUTY)
  stats = recbole_runner.convert_beauty(src, tmp_path / "out")

  path = tmp_path / "out" / "beauty" / "beauty.inter"
  assert stats == {"users": 3, "items": 11, "interactions": 16, "path": str(path)}
  lines = path.read_text().splitlines()
  assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
  rows = [line.split("\t") for line in lines[1:]]
  assert len(rows) == 16
  # Every user's items come back in file order when sorted by timestamp, as RecBole's 'TO' does.
  for line in BEAUTY.split("\n"):
    if not line.strip():
      continue
    user, *items = line.split()
    mine = sorted((float(t), i) for u, i, t in rows if u == user)
    assert [i for _, i in mine] == items
    assert [t for t, _ in mine] == list(range(len(items)))
  assert not list((tmp_path / "out" / "beauty").glob("*.tmp"))


def test_convert_beauty_rejects_repeated_user(tmp_path):
  src = tmp_path / "Beauty.txt"
  src.write_text("1 10 11\n2 11 12\n1 13 14\n")
  with pytest.raises(ValueError, match="appears twice"):
    recbole_runner.convert_beauty(src, tmp_path / "out")
  assert not (tmp_path / "out" / "beauty" / "beauty.inter").exists()


def test_runner_imports_without_torch_or_recbole():
  code = ("import sys; from recjax.bench.peers import recbole_runner; "
          "bad = [m for m in ('torch', 'recbole', 'jax', 'tensorflow') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


def test_runner_metric_names():
  assert recbole_runner.rename_metrics({"hit@10": 0.5, "ndcg@10": 0.25, "mrr@5": 0.1}) == {
      "hr@10": 0.5, "ndcg@10": 0.25, "mrr@5": 0.1}


# --- driver, against a fake interpreter -----------------------------------------------------

FAKE_RUNNER = textwrap.dedent("""
    import json, sys, time
    args = sys.argv[2:]  # sys.argv[1] is the path of recbole_runner.py
    model = args[args.index("--model") + 1]
    print("RecBole says hello on stderr", file=sys.stderr)
    print(json.dumps({"event": "dataset", "users": 3}))
    print("not json")
    print("[1, 2]")
    print(json.dumps({"peer": "recbole", "model": model, "epoch": 1, "args": args}), flush=True)
    if model == "fail":
        print("Traceback: something broke", file=sys.stderr)
        sys.exit(3)
    if model == "slow":
        time.sleep(60)
""")


@pytest.fixture
def fake_python(tmp_path):
  script = tmp_path / "fake_runner.py"
  script.write_text(FAKE_RUNNER)
  python = tmp_path / "python"
  python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
  python.chmod(0o755)
  return python


def test_run_recbole_yields_json_rows(tmp_path, fake_python):
  rows = list(driver.run_recbole("sasrec", tmp_path / "data", 30.0, tmp_path / "work", python=fake_python,
                                 eval_every_epoch=False, epochs_max=2))
  assert [r.get("event", r.get("epoch")) for r in rows] == ["dataset", 1]
  args = rows[1]["args"]
  assert args[args.index("--budget_s") + 1] == "30.0"
  assert args[args.index("--epochs_max") + 1] == "2"
  assert args[args.index("--eval") + 1] == "last"
  assert args[args.index("--work_dir") + 1] == str((tmp_path / "work").resolve())
  assert "hello on stderr" in (tmp_path / "work" / "recbole_sasrec.log").read_text()


def test_run_recbole_raises_on_failure(tmp_path, fake_python):
  rows = []
  with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*recbole_fail\.log(.|\n)*something broke"):
    for row in driver.run_recbole("fail", tmp_path, 1.0, tmp_path / "work", python=fake_python):
      rows.append(row)
  assert len(rows) == 2  # the rows before the failure still came through


def test_run_recbole_stops_runner_when_caller_stops(tmp_path, fake_python):
  start = time.monotonic()
  rows = driver.run_recbole("slow", tmp_path, 1.0, tmp_path / "work", python=fake_python)
  assert next(rows)["event"] == "dataset"
  rows.close()  # the fake runner would sleep for a minute
  assert time.monotonic() - start < 30


def test_ensure_venv_reuses_matching_stamp(tmp_path):
  venv = tmp_path / driver.VENV_NAME
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("")
  (venv / driver.STAMP_NAME).write_text(driver.requirements_hash() + "\n")
  assert driver.ensure_venv(tmp_path, base_python="/nonexistent/python") == venv / "bin" / "python"


def test_ensure_venv_rebuilds_stale_venv(tmp_path):
  venv = tmp_path / driver.VENV_NAME
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text("")
  (venv / driver.STAMP_NAME).write_text("stale\n")
  failing = tmp_path / "python3.11"
  failing.write_text("#!/bin/sh\necho no venv for you >&2\nexit 1\n")
  failing.chmod(0o755)
  with pytest.raises(RuntimeError, match="no venv for you"):
    driver.ensure_venv(tmp_path, base_python=str(failing))
  assert not venv.exists()  # the stale one went; nothing half-built is taken for good


def test_requirements_are_exact_pins():
  lines = [l.strip() for l in driver.REQUIREMENTS.read_text().splitlines()]
  pins = [l for l in lines if l and not l.startswith("#")]
  assert pins and all("==" in p and not any(c in p for c in "<>~;") for p in pins), pins
  names = {p.split("==")[0].lower() for p in pins}
  assert {"recbole", "torch", "numpy", "setuptools"} <= names
  assert os.path.basename(driver.RUNNER) == "recbole_runner.py" and driver.RUNNER.is_file()
