"""recjax's side of the RecBole peer: builds its virtualenv and runs `recbole_runner.py` in it.

RecBole needs torch and numpy<2, recjax needs numpy>=2 and JAX, so the peer lives in a virtualenv
of its own, `<root>/recbole-venv`, pinned by recbole-requirements.txt beside this file. The runner
is a subprocess; its stdout is JSON lines, which `run_recbole` yields as dicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Iterator

HERE = pathlib.Path(__file__).resolve().parent
REQUIREMENTS = HERE / "recbole-requirements.txt"
RUNNER = HERE / "recbole_runner.py"
DEFAULT_ROOT = pathlib.Path("runs/bench")  # git-ignored
VENV_NAME = "recbole-venv"
STAMP_NAME = ".recjax-requirements-sha256"  # inside the venv: hash of the requirements it holds
BASE_PYTHON = "python3.11"


def _log(msg: str) -> None:
  print(f"recjax bench (recbole peer): {msg}", file=sys.stderr, flush=True)


def _tail(path: pathlib.Path, lines: int = 20) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
  except OSError:
    return "(no log)"


def requirements_hash() -> str:
  return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def ensure_venv(root: pathlib.Path, *, base_python: str = BASE_PYTHON) -> pathlib.Path:
  """Returns the python of `<root>/recbole-venv`, (re)building the venv first when it is missing
  or was installed from a different recbole-requirements.txt.

  A stale venv is deleted and built afresh rather than upgraded in place, so what it holds is
  exactly the pinned set. pip's output goes to `<root>/recbole-venv-install.log`. Takes about a
  minute and 1.6 GB (torch's CPU build, ray) when it builds.
  """
  root = pathlib.Path(root)
  venv = root / VENV_NAME
  python = venv / "bin" / "python"
  stamp = venv / STAMP_NAME
  digest = requirements_hash()
  if python.exists() and stamp.is_file() and stamp.read_text().strip() == digest:
    return python
  if venv.exists():
    _log(f"{venv} was built from other requirements (or its install did not finish): rebuilding")
    shutil.rmtree(venv)
  root.mkdir(parents=True, exist_ok=True)
  log = root / f"{VENV_NAME}-install.log"
  _log(f"creating {venv} from {REQUIREMENTS.name} (about a minute; pip's output in {log})")
  with open(log, "w") as out:
    for cmd in ([base_python, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)]):
      out.write(f"$ {' '.join(cmd)}\n")
      out.flush()
      if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
        raise RuntimeError(f"building the RecBole venv failed: {' '.join(cmd)}; see {log}:\n{_tail(log)}")
  stamp.write_text(digest + "\n")  # written last: a venv without it is rebuilt next time
  return python


def runner_env() -> dict[str, str]:
  """The runner's environment: ours, minus what would leak recjax's Python into the venv's."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  # torch >= 2.6 loads with weights_only=True by default, which RecBole's checkpoints fail.
  env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run_recbole(model: str, data_dir: pathlib.Path, budget_s: float, work_dir: pathlib.Path, *,
                python: pathlib.Path | str | None = None, eval_every_epoch: bool = True,
                epochs_max: int | None = None, threads: int = 0, seed: int | None = None) -> Iterator[dict]:
  """Trains RecBole's `model` (sasrec | bert4rec) on `data_dir/Beauty.txt` for `budget_s` training
  seconds and yields the runner's JSON rows: first {"event": "dataset", ...}, then one per epoch.

  `python` defaults to the venv under runs/bench (built if needed). With eval_every_epoch=False
  only the last epoch is evaluated (the others' rows carry no "test"). The runner's stderr
  (RecBole's log) goes to `work_dir/recbole_<model>.log`; a non-zero exit raises RuntimeError
  with that file's last lines. Stopping the iteration early stops the runner.
  """
  if python is None:
    python = ensure_venv(DEFAULT_ROOT)
  work_dir = pathlib.Path(work_dir).resolve()
  work_dir.mkdir(parents=True, exist_ok=True)
  cmd = [str(python), str(RUNNER), "--model", model, "--data", str(pathlib.Path(data_dir).resolve()),
         "--budget_s", str(budget_s), "--work_dir", str(work_dir), "--threads", str(threads)]
  if epochs_max is not None:
    cmd += ["--epochs_max", str(epochs_max)]
  if seed is not None:
    cmd += ["--seed", str(seed)]
  if not eval_every_epoch:
    cmd += ["--eval", "last"]
  log = work_dir / f"recbole_{model}.log"
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=work_dir, env=runner_env())
    try:
      for line in proc.stdout:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue  # not a result line
        if isinstance(row, dict):
          yield row
      returncode = proc.wait()
    finally:
      if proc.poll() is None:  # the caller stopped iterating (or raised): stop the runner too
        proc.terminate()
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      proc.stdout.close()
  if returncode != 0:
    raise RuntimeError(f"RecBole runner ({model}) exited with {returncode}; log {log}:\n{_tail(log)}")
