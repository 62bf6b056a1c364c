"""Prepared datasets by name, in the spirit of TFDS `data_dir`.

A dataset is a directory written by `recjax prepare`. Names come from either
  * discovery: every subdirectory of the data root holding a manifest.json is a dataset
    named after the directory (the root is $RECJAX_DATA_DIR, else `runs/default/prepared`,
    where `make run` prepares the synthetic default), or
  * an explicit `register_dataset(name, data_dir)` (from Python, gin or
    `--dataset NAME=DIR` on the command line).
`recjax.tasks` registers every SeqIO task family for each dataset known here.
"""

from __future__ import annotations

import os
import pathlib
import re

from recjax.data import prepare
from recjax.data.prepared import PreparedDataset

DEFAULT_ROOT = "runs/default/prepared"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DATASETS: dict[str, pathlib.Path] = {}


def data_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("RECJAX_DATA_DIR", DEFAULT_ROOT))


def register_dataset(name: str, data_dir) -> pathlib.Path:
  """Adds (or re-points) a named dataset. Names are lowercase identifiers (task prefixes)."""
  if not _NAME.match(name):
    raise ValueError(f"dataset name {name!r} must match {_NAME.pattern} (it prefixes task names)")
  path = pathlib.Path(data_dir)
  if not (path / prepare.MANIFEST).is_file():
    raise FileNotFoundError(f"dataset {name!r}: {path} has no {prepare.MANIFEST}; "
                            "run `recjax prepare ... --output` there first")
  _DATASETS[name] = path
  return path


def discover(root=None) -> list[str]:
  """Registers every prepared dataset directly under `root`; returns their names."""
  root = pathlib.Path(root) if root is not None else data_root()
  found = []
  if root.is_dir():
    for d in sorted(root.iterdir()):
      name = d.name.lower().replace("-", "_")
      if (d / prepare.MANIFEST).is_file() and _NAME.match(name) and name not in _DATASETS:
        register_dataset(name, d)
        found.append(name)
  return found


def get(name: str) -> PreparedDataset:
  if name not in _DATASETS:
    known = ", ".join(sorted(_DATASETS)) or "none"
    raise KeyError(f"unknown dataset {name!r} (known: {known}); prepare it into "
                   f"{data_root()}/{name} or register it with --dataset {name}=DIR")
  return PreparedDataset(_DATASETS[name])


def names() -> list[str]:
  return sorted(_DATASETS)


def path(name: str) -> pathlib.Path:
  get(name)
  return _DATASETS[name]
