"""Fault injection past the readers: data identity, atomic prepare, checkpoint and export
integrity, gin overrides, output paths. Each case asserts the verdict: a clear one-sentence
error (exit 2, no traceback) or a counted / warned fallback, never a silent change.

Runs in-process (`recjax.main.main`), sharing one tiny training run, to stay fast.
"""

import json
import logging
import os
import pathlib
import shutil

import pytest

from recjax.data import prepare, prepared
from recjax.main import main

TINY = [
    "--gin_file=experiments/quickstart.gin",
    "--gin.MIXTURE_OR_TASK_NAME='fz_items'",
    "--gin.TASK_FEATURE_LENGTHS={'items': 20}",
    "--gin.BATCH_SIZE=8",
    "--gin.EVAL_BATCH_SIZE=64",
    "--gin.bert4rec.Bert4Rec.max_length=20",
    "--gin.bert4rec.Bert4Rec.dim=16",
    "--gin.bert4rec.Bert4Rec.mlp_dim=32",
    "--gin.loop.train.log_every=2",
    "--gin.loop.train.checkpoint_every=2",
    "--gin.loop.train.progress=False",
    "--gin.loop.make_optimizer.warmup_steps=0",
    "--gin.eval_lib.evaluate.splits=('test',)",
    "--gin.eval_lib.evaluate.popularity_baseline=False",
]


def run(capsys, *args):
  """(exit status, stderr) of one in-process `recjax` command."""
  capsys.readouterr()
  code = main([str(a) for a in args])
  err = capsys.readouterr().err
  return code, err


def one_sentence(err: str) -> bool:
  lines = [l for l in err.splitlines() if l.startswith("recjax ")]
  return "Traceback" not in err and len(lines) == 1


@pytest.fixture(scope="module")
def raw(synthetic_raw):
  return synthetic_raw / "amazon2018" / "Synthetic.json.gz"


@pytest.fixture(scope="module")
def trained(raw, tmp_path_factory):
  """A dataset `fz` and a model trained 4 steps on it (checkpoints at 2 and 4)."""
  root = tmp_path_factory.mktemp("faults")
  data = root / "fz"
  prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5))
  model = root / "model"
  code = main(["train", *TINY, f"--gin.MODEL_DIR={model}", "--gin.TRAIN_STEPS=4",
               "--dataset", f"fz={data}"])
  assert code == 0
  return data, model


def copy_run(trained, tmp_path):
  data, model = trained
  shutil.copytree(data, tmp_path / "fz")
  shutil.copytree(model, tmp_path / "model")
  return tmp_path / "fz", tmp_path / "model"


def test_checkpoint_records_the_dataset_hash(trained):
  data, model = trained
  config = json.loads((model / "checkpoints" / "4" / "config" / "metadata").read_text())
  assert config["dataset"]["content_hash"] == prepared.PreparedDataset(data).content_hash
  assert sorted(p.name for p in (model / "checkpoint_checksums").iterdir()) == ["2.json", "4.json"]


def test_reprepared_dataset_refuses_resume_and_evaluate(trained, raw, tmp_path, capsys):
  data, model = copy_run(trained, tmp_path)
  old = prepared.PreparedDataset(data).content_hash
  # Re-prepared in place with other options: same users' ids, other sequences.
  prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5, max_seq_len=6))
  new = prepared.PreparedDataset(data).content_hash
  assert new != old
  common = [*TINY, f"--gin.MODEL_DIR={model}", "--dataset", f"fz={data}"]
  code, err = run(capsys, "train", *common, "--gin.TRAIN_STEPS=6")
  assert code == 2 and one_sentence(err), err[-2000:]
  assert old[:23] in err and new[:23] in err and "fresh MODEL_DIR" in err
  assert "allow_dataset_change=True" in err
  code, err = run(capsys, "evaluate", *common)
  assert code == 2 and one_sentence(err) and old[:23] in err and new[:23] in err, err[-2000:]
  code, err = run(capsys, "export", *common, f"--gin.EXPORT_DIR={tmp_path / 'export'}")
  assert code == 2 and "re-prepared or replaced" in err, err[-2000:]
  assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.partial-*"))
  # A deliberate fine-tune on the new data is allowed, and its checkpoints record it.
  code, err = run(capsys, "train", *common, "--gin.TRAIN_STEPS=6",
                  "--gin.loop.train.allow_dataset_change=True")
  assert code == 0, err[-2000:]
  config = json.loads((model / "checkpoints" / "6" / "config" / "metadata").read_text())
  assert config["dataset"]["content_hash"] == new


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x55
  path.write_bytes(bytes(data))


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fault", ["flipped_bytes", "truncated"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(trained, tmp_path, capsys, caplog, fault):
  data, model = copy_run(trained, tmp_path)
  target = _largest_file(model / "checkpoints" / "4")
  if fault == "flipped_bytes":
    _flip(target)
  else:
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  with caplog.at_level(logging.WARNING, logger="recjax.train"):
    if fault == "truncated":  # the same path as flipped bytes; the checkpointer alone is enough
      from recjax.train import checkpoint as ckpt_lib
      assert ckpt_lib.Checkpointer(model).latest_step() == 2
    else:
      code, err = run(capsys, "evaluate", *TINY, f"--gin.MODEL_DIR={model}", "--dataset", f"fz={data}")
      assert code == 0, err[-2000:]
      assert (model / "eval_step_2.json").is_file() and not (model / "eval_step_4.json").exists()
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert "checkpoint step 4 is corrupt" in warning and "falling back to step 2" in warning
  assert target.name in warning


def test_training_falls_back_past_a_corrupt_step_and_saves_it_again(trained, tmp_path, capsys, caplog):
  data, model = copy_run(trained, tmp_path)
  _flip(_largest_file(model / "checkpoints" / "4"))
  with caplog.at_level(logging.WARNING, logger="recjax.train"):
    code, err = run(capsys, "train", *TINY, f"--gin.MODEL_DIR={model}", "--gin.TRAIN_STEPS=6",
                    "--dataset", f"fz={data}")
  assert code == 0, err[-2000:]
  warning = " ".join(r.getMessage() for r in caplog.records)
  assert "falling back to step 2" in warning and "moved corrupt checkpoint step 4" in warning
  assert (model / "corrupt_checkpoints" / "4").is_dir()
  from recjax.train import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(model)
  assert checkpointer.all_steps() == [2, 4, 6] and checkpointer.latest_step() == 6
  assert all(checkpointer.corruption(s) is None for s in (2, 4, 6))
  checkpointer.close()


def test_checkpoint_without_checksums_that_orbax_cannot_read_is_one_sentence(trained, tmp_path, capsys):
  data, model = copy_run(trained, tmp_path)
  (model / "checkpoint_checksums" / "4.json").unlink()  # e.g. a run killed before it sealed step 4
  target = _largest_file(model / "checkpoints" / "4")
  target.write_bytes(b"")
  code, err = run(capsys, "evaluate", *TINY, f"--gin.MODEL_DIR={model}", "--dataset", f"fz={data}")
  assert code == 2 and one_sentence(err), err[-2000:]
  assert "cannot restore checkpoint" in err and str(model / "checkpoints" / "4") in err
  assert "delete it to use an earlier step" in err


def test_a_save_killed_before_its_commit_leaves_the_previous_step(trained, tmp_path):
  """Orbax writes a step under a temporary name and renames it when complete; a kill
  before the rename leaves that directory behind, and the previous step is the latest."""
  from recjax.train import checkpoint as ckpt_lib
  _, model = copy_run(trained, tmp_path)
  (model / "checkpoints" / "4").rename(model / "checkpoints" / "4.orbax-checkpoint-tmp-1234567")
  checkpointer = ckpt_lib.Checkpointer(model)
  assert checkpointer.latest_step() == 2
  checkpointer.close()


def test_model_dir_that_is_a_file_is_one_sentence(trained, tmp_path, capsys):
  data, _ = trained
  (tmp_path / "model").write_text("a file")
  code, err = run(capsys, "train", *TINY, f"--gin.MODEL_DIR={tmp_path / 'model'}", "--gin.TRAIN_STEPS=2",
                  "--dataset", f"fz={data}")
  assert code == 2 and one_sentence(err) and str(tmp_path / "model") in err, err[-2000:]


def test_tampered_export_is_refused_naming_the_file(trained, tmp_path, capsys):
  data, model = trained
  export = tmp_path / "export"
  common = [*TINY, f"--gin.MODEL_DIR={model}", "--dataset", f"fz={data}"]
  code, err = run(capsys, "export", *common, f"--gin.EXPORT_DIR={export}")
  assert code == 0, err[-2000:]
  assert json.loads((export / "metadata.json").read_text())["dataset"]["content_hash"].startswith("sha256:")
  assert not list(tmp_path.glob(".export.partial-*"))  # the staging directory is gone
  code, err = run(capsys, "evaluate", *common, f"--exported={export}")
  assert code == 0, err[-2000:]
  # The case: a user filter in metadata.json changed the metrics silently.
  meta = json.loads((export / "metadata.json").read_text())
  meta["vocab_size"] = meta["vocab_size"] // 2
  (export / "metadata.json").write_text(json.dumps(meta))
  code, err = run(capsys, "evaluate", *common, f"--exported={export}")
  assert code == 2 and one_sentence(err) and "metadata.json" in err, err[-2000:]
  (export / "metadata.json").unlink()
  code, err = run(capsys, "evaluate", *common, f"--exported={export}")
  assert code == 2 and one_sentence(err) and "missing metadata.json" in err, err[-2000:]


def test_interrupted_prepare_is_refused_and_the_old_manifest_is_gone(trained, raw, tmp_path, capsys,
                                                                     monkeypatch):
  data = tmp_path / "fz"
  shutil.copytree(trained[0], data)
  from recjax import integrity
  real_replace, calls = os.replace, []

  def dying_replace(src, dst):  # the process dies after moving both data files
    calls.append(dst)
    if len(calls) == 3:
      raise KeyboardInterrupt
    real_replace(src, dst)

  monkeypatch.setattr(integrity.os, "replace", dying_replace)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5, max_seq_len=6))
  monkeypatch.undo()
  assert not (data / "manifest.json").exists()  # never the old manifest beside new files
  with pytest.raises(prepared.IncompleteDataset, match="half-written"):
    prepared.PreparedDataset(data)
  code, err = run(capsys, "tasks", "show", "fz_items", "--dataset", f"fz={data}")
  assert code == 2 and one_sentence(err) and "manifest.json" in err, err[-2000:]
  # An old manifest copied back beside the new file: refused on open when the sizes
  # differ, and always by the content hash.
  shutil.copy(trained[0] / "manifest.json", data / "manifest.json")
  with pytest.raises(ValueError, match="changed or half-written|content hash"):
    prepared.PreparedDataset(data, verify=True)
  # Preparing again repairs it.
  prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5))
  assert prepared.PreparedDataset(data, verify=True).content_hash == prepared.PreparedDataset(trained[0]).content_hash


@pytest.mark.parametrize("kind", ["file", "readonly", "disk_full"])
def test_unwritable_outputs_name_the_path_and_cause(raw, tmp_path, capsys, monkeypatch, kind):
  out = tmp_path / "out"
  if kind == "file":
    out.write_text("not a directory")
    cause = "it is a file"
  elif kind == "readonly":
    tmp_path.chmod(0o500)
    cause = "permission denied"
  else:
    import errno

    def full(table, where, **kw):
      raise OSError(errno.ENOSPC, "No space left on device", str(where))
    monkeypatch.setattr(prepare.pq, "write_table", full)
    cause = "the disk is full"
  try:
    if kind == "readonly" and os.access(tmp_path, os.W_OK):
      pytest.skip("running as a user who can write anywhere (root)")
    code, err = run(capsys, "prepare", "--format", "amazon2018", "--input", raw, "--output", out)
  finally:
    tmp_path.chmod(0o700)
  assert code == 2 and one_sentence(err) and str(out) in err and cause in err, err[-2000:]
  assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("override, expected", [
    ("--gin.TRAIN_STEP=5", "--gin.TRAIN_STEP=5: no gin file reads the macro TRAIN_STEP, so it would be "
                           "ignored; did you mean TRAIN_STEPS?"),
    ("--gin.TRAIN_STEPS='abc'", "--gin.TRAIN_STEPS='abc': loop.train.train_steps expects int, got str 'abc'"),
    ("--gin.loop.make_optimizer.learning_rate=fast",
     "loop.make_optimizer.learning_rate expects float, got str 'fast'"),
    ("--gin.bert4rec.Bert4Rec.dimm=8", "doesn't have a parameter named 'dimm' (did you mean dim?)"),
    ("--gin.lop.train.train_steps=5", "No configurable matching 'lop.train' (did you mean loop.train?)"),
])
def test_gin_overrides_that_would_be_ignored_or_crash_are_refused(capsys, tmp_path, override, expected):
  code, err = run(capsys, "train", "--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
                  override)
  assert code == 2 and one_sentence(err) and expected in err, err[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_reprepare_in_place_keeps_other_files_and_leaves_no_staging(raw, tmp_path):
  data = tmp_path / "fz"
  prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5))
  (data / "artifacts").mkdir()
  (data / "artifacts" / "note.txt").write_text("derived")
  m = prepare.prepare("amazon2018", raw, data, options=prepare.PrepareOptions(kcore=5, max_seq_len=6))
  assert (data / "artifacts" / "note.txt").read_text() == "derived"
  assert prepared.PreparedDataset(data, verify=True).content_hash == m["content_hash"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fz"]
