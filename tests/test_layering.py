"""The layering contract (.importlinter, checked with import-linter): data flows forward and
model files import none of the stages around them. A violating import must fail it."""

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
  # PYTHONPATH first: the checked `recjax` is the one under `root`.
  return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=300,
                        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_repository_keeps_the_contracts():
  out = _lint(REPO)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") == 2


def test_a_model_importing_the_trainer_breaks_the_contract(tmp_path):
  shutil.copytree(REPO / "recjax", tmp_path / "recjax", ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
  tiger = tmp_path / "recjax" / "models" / "tiger.py"
  tiger.write_text(tiger.read_text() + "\n\ndef _violation():\n  from recjax.train import loop  # noqa\n")
  out = _lint(tmp_path)
  assert out.returncode != 0
  assert "recjax.models.tiger -> recjax.train.loop" in out.stdout, out.stdout[-3000:]
