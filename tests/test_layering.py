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


# `recjax.tasks` is installed from tasks/ (outside recjax/), so import-linter's graph does
# not hold it: the same rule for it is checked on the source.
TASKS_IMPORT_ALLOWED: set[str] = set()


def _imports_tasks(path: pathlib.Path) -> list[int]:
  import ast
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import) and any(a.name.startswith("recjax.tasks") for a in node.names):
      lines.append(node.lineno)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recjax.tasks"):
      lines.append(node.lineno)
  return lines


def test_models_do_not_import_tasks():
  offenders = {str(p.relative_to(REPO)): _imports_tasks(p) for p in (REPO / "recjax" / "models").rglob("*.py")
               if p.name not in TASKS_IMPORT_ALLOWED}
  assert not {k: v for k, v in offenders.items() if v}


def test_the_tasks_check_sees_a_violation(tmp_path):
  bad = tmp_path / "m.py"
  bad.write_text("def f():\n  import recjax.tasks as tasks\n  from recjax.tasks import text\n")
  assert _imports_tasks(bad) == [2, 3]
