"""Derived artifacts of a prepared dataset: where they live, their manifest, and the checks.

An artifact is a directory <dataset>/artifacts/<kind>/<name>/ whose manifest.json says what
produced it (kind, name, the fit entrypoint, its operative gin config, the command that
rebuilds it), the content hash of the dataset it came from, when, and the sha256 of every
file. A fit builds into the sibling <kind>/.build-<name>/ (its checkpoints live there too, so
an interrupted fit resumes), writes the manifest last and renames the directory into place:
a reader sees a complete artifact or none.

  with manifest.build(data_dir, "wals", "wals", fit="recjax.artifacts.wals.fit") as b:
    np.save(b.dir / "item_factors.npy", ...)
    b.manifest["metrics"] = {...}              # extra JSON-able fields
  path = manifest.require(data_dir, "wals", "wals")   # missing / stale: one sentence

This module imports no JAX (tasks read artifacts at registration).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any, Iterator

ARTIFACTS_DIR = "artifacts"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# kind -> (gin file of its fit, default name): the command a missing artifact's error names.
FITS = {
    "semantic_ids": ("fits/rqvae.gin", "rqvae"),
    "wals": ("fits/wals.gin", "wals"),
    "text_embeddings": ("fits/text_embeddings.gin", "minilm"),
    "preference_benchmark": ("fits/preference_benchmark.gin", "ground_truth"),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class MissingArtifactError(FileNotFoundError):
  """No (complete) artifact of that kind and name; the message names the command that builds it."""


class StaleArtifactError(ValueError):
  """The artifact was built from other dataset content than the directory holds now."""


def check_name(kind: str, name: str) -> None:
  if kind not in FITS:
    raise ValueError(f"unknown artifact kind {kind!r}; choose from {', '.join(FITS)}")
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"{kind} artifact name {name!r} must be letters, digits, '_', '.' or '-'")


def artifact_dir(data_dir, kind: str, name: str) -> pathlib.Path:
  check_name(kind, name)
  return pathlib.Path(data_dir) / ARTIFACTS_DIR / kind / name


def build_dir(data_dir, kind: str, name: str) -> pathlib.Path:
  """Where a fit of this artifact builds (and keeps its checkpoints) until it is complete."""
  check_name(kind, name)
  return pathlib.Path(data_dir) / ARTIFACTS_DIR / kind / f".build-{name}"


def dataset_hash(data_dir) -> str:
  """The prepared dataset's content hash (from its manifest; the files are not re-read)."""
  from recjax.data.prepared import PreparedDataset
  return PreparedDataset(data_dir).content_hash


def dataset_label(data_dir) -> str:
  """A registrable dataset name for commands: the directory name, lower-cased."""
  label = re.sub(r"[^a-z0-9_]", "_", pathlib.Path(data_dir).resolve().name.lower())
  return label if re.fullmatch(r"[a-z][a-z0-9_]*", label) else "data"


def fit_command(data_dir, kind: str, name: str, gin_file: str | None = None) -> str:
  """The command that (re)builds artifact kind/name of data_dir."""
  default_file, default_name = FITS[kind]
  cmd = f"recjax fit --gin_file={gin_file or default_file} --dataset {dataset_label(data_dir)}={data_dir}"
  return cmd if name == default_name else f"{cmd} --gin.NAME={name}"


def sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return "sha256:" + h.hexdigest()


def read(path) -> dict[str, Any]:
  """The manifest of the artifact directory `path`."""
  return json.loads((pathlib.Path(path) / MANIFEST).read_text())


def require(data_dir, kind: str, name: str) -> pathlib.Path:
  """The directory of a complete artifact built from the dataset's current content.

  Raises MissingArtifactError (naming the command that builds it) or StaleArtifactError
  (naming the artifact, both content hashes and the rebuild command), one sentence each.
  """
  path = artifact_dir(data_dir, kind, name)
  if not (path / MANIFEST).is_file():
    raise MissingArtifactError(f"{data_dir} has no {kind} artifact {name!r}; build it with "
                               f"`{fit_command(data_dir, kind, name)}`")
  meta = read(path)
  built, current = meta["dataset"]["content_hash"], dataset_hash(data_dir)
  if built != current:
    raise StaleArtifactError(
        f"{kind} artifact {name!r} at {path} was built from dataset content {built} but {data_dir} now has "
        f"{current}; rebuild it with `{fit_command(data_dir, kind, name, meta.get('gin_file'))}`")
  return path


def find(data_dir, kind: str) -> list[str]:
  """Names of the complete artifacts of `kind` (stale ones included: `require` refuses them)."""
  root = pathlib.Path(data_dir) / ARTIFACTS_DIR / kind
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


class Build:
  """An artifact under construction: write files into `dir`, add fields to `manifest`."""

  def __init__(self, data_dir, kind: str, name: str, fit: str, config: dict | None, gin_file: str | None):
    self.data_dir = pathlib.Path(data_dir)
    self.kind, self.name = kind, name
    self.dir = build_dir(data_dir, kind, name)
    self.content_hash = dataset_hash(data_dir)
    self.manifest: dict[str, Any] = {"config": config or {}}
    self.fit, self.gin_file = fit, gin_file
    self.checkpoint_dir = self.dir / "checkpoints"
    self._claim(config or {})

  def _claim(self, config: dict) -> None:
    """Keeps a build dir left by an interrupted fit of the same inputs (to resume from its
    checkpoints); starts afresh when the dataset or the fit's configuration differ."""
    key = {"content_hash": self.content_hash, "fit": self.fit, "config": config}
    stamp = self.dir / "build.json"
    if self.dir.is_dir():
      try:
        same = json.loads(stamp.read_text()) == json.loads(json.dumps(key, default=str))
      except (OSError, ValueError):
        same = False
      if not same:
        shutil.rmtree(self.dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(key, default=str, indent=1))

  def commit(self) -> pathlib.Path:
    """Hashes the files, writes the manifest (last, atomically) and moves the directory into place."""
    shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
    (self.dir / "build.json").unlink(missing_ok=True)
    files = sorted(p for p in self.dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    gin_config = None
    try:
      import gin
      gin_config = gin.operative_config_str() or None
    except ImportError:
      pass
    meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "name": self.name, "fit": self.fit,
            "gin_file": self.gin_file, "command": fit_command(self.data_dir, self.kind, self.name, self.gin_file),
            "dataset": {"dir": str(self.data_dir), "content_hash": self.content_hash},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.manifest, "gin_config": gin_config,
            "files": {str(p.relative_to(self.dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                      for p in files}}
    tmp = self.dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.replace(tmp, self.dir / MANIFEST)
    final = artifact_dir(self.data_dir, self.kind, self.name)
    old = final.parent / f".old-{self.name}-{os.getpid()}"
    if final.exists():  # a rebuild: the old one goes aside first, so `final` is never half-written
      os.replace(final, old)
    os.replace(self.dir, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def build(data_dir, kind: str, name: str, *, fit: str, config: dict | None = None,
          gin_file: str | None = None) -> Iterator[Build]:
  """Builds artifact kind/name of data_dir; committed when the block ends without an error.
  An error leaves the build dir (and its checkpoints) for the next attempt to resume."""
  b = Build(data_dir, kind, name, fit, config, gin_file)
  yield b
  b.commit()


def verify(path) -> None:
  """Raises ValueError if a file of the artifact no longer matches its manifest's sha256."""
  path = pathlib.Path(path)
  for rel, info in read(path)["files"].items():
    if sha256_file(path / rel) != info["sha256"]:
      raise ValueError(f"{path / rel} does not match the sha256 in {path / MANIFEST}; rebuild the artifact")
