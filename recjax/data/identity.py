"""Which prepared dataset a checkpoint or export was built from, and refusing another.

A model's item ids mean something only against the dataset that numbered them: a
dataset re-prepared in place (even 100 -> 120 items, which pads to the same table size)
would silently give every id a new meaning. Checkpoints (the `config` item) and exports
(`metadata.json`) record `of_task(task)`; whoever restores them compares it with the
dataset the task reads now, from the manifest (no hashing at load time).
"""

from __future__ import annotations

from typing import Any


class DatasetChanged(ValueError):
  """The dataset under a task is not the one a checkpoint or export was built from."""


def of_task(task_name: str) -> dict[str, Any] | None:
  """{"dir", "content_hash", "vocab_size", "num_users"} of the prepared dataset behind a
  task or mixture; None for a task registered outside `recjax.tasks`."""
  import recjax.tasks as tasks
  from recjax.data.prepared import PreparedDataset
  data_dir = tasks.data_dir_of(task_name)
  if data_dir is None:
    return None
  ds = PreparedDataset(data_dir)
  return {"dir": str(data_dir.resolve()), "content_hash": ds.content_hash, "vocab_size": ds.vocab_size,
          "num_users": ds.num_users}


def short(content_hash: str) -> str:
  return content_hash[:len("sha256:") + 16]


def check(saved: dict | None, task_name: str, what: str, way_out: str) -> dict | None:
  """Raises DatasetChanged when `saved` (an `of_task` record) differs from the dataset the
  task reads now. Records written before identities existed (None) pass unchecked."""
  current = of_task(task_name)
  if not saved or not current or saved.get("content_hash") == current["content_hash"]:
    return current
  raise DatasetChanged(
      f"{what} was built from dataset {saved.get('dir')} with content hash "
      f"{short(saved.get('content_hash', '?'))}, but task {task_name} now reads {current['dir']} with "
      f"content hash {short(current['content_hash'])} (re-prepared or replaced): {way_out}")


def check_export(export_dir, task_name: str) -> None:
  """Refuses an export (its metadata.json `dataset`) evaluated on another dataset."""
  import json
  import pathlib
  metadata = json.loads((pathlib.Path(export_dir) / "metadata.json").read_text())
  check(metadata.get("dataset"), task_name, f"export {export_dir}",
        "evaluate it on the dataset it was trained on, or export a model trained on this one")
