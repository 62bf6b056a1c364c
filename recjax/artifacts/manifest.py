"""Derived artifacts of a prepared dataset: where they live, their manifest, and the checks.

An artifact is a directory <dataset>/artifacts/<kind>/<name>/ whose manifest.json says what
produced it (kind, name, the fit entrypoint, its operative gin config, the command that
rebuilds it), the content hash of the dataset it came from, when, and the sha256 of every
file. A fit builds into the sibling <kind>/.build-<name>/ (its checkpoints live there too, so
an interrupted fit resumes), writes the manifest last and renames the directory into place:
a reader sees a complete artifact or none. A lock beside the build dir keeps a second fit of
the same artifact out while one runs.

  with manifest.build(data_dir, "wals", "wals", fit="recjax.artifacts.wals.fit") as b:
    np.save(b.dir / "item_factors.npy", ...)
    b.manifest["metrics"] = {...}              # extra JSON-able fields
  path = manifest.require(data_dir, "wals", "wals")   # missing / stale: one sentence

This module imports no JAX (tasks read artifacts at registration).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shlex
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
# The --gin.K=V overrides of the running `recjax fit` (set by recjax.artifacts.fit): recorded
# in the manifest, and repeated in the rebuild command a stale artifact's error names.
CLI_BINDINGS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("cli_bindings", default=())
_NOT_REPEATED = ("NAME", "DATASET", "fit.fit.stop_after_steps")  # named separately, or one-off


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


def fit_command(data_dir, kind: str, name: str, gin_file: str | None = None, bindings=()) -> str:
  """The command that (re)builds artifact kind/name of data_dir: its gin file(s) (comma-
  separated), the dataset, and the `K = V` gin bindings it was built with."""
  default_file, default_name = FITS[kind]
  args = [f"--gin_file={f}" for f in (gin_file or default_file).split(",")]
  args += ["--dataset", f"{dataset_label(data_dir)}={data_dir}"]
  args += [] if name == default_name else [f"--gin.NAME={name}"]
  for binding in bindings:
    key, _, value = (part.strip() for part in binding.partition("="))
    if key not in _NOT_REPEATED:
      args.append(f"--gin.{key}={_bare(value)}")
  return " ".join(["recjax", "fit", *(shlex.quote(a) for a in args)])


def _bare(value: str) -> str:
  """'rand16' -> rand16: `--gin.K=V` quotes bare words again (recjax.gin_cli), so the command
  reads as typed; anything else stays as it is."""
  if re.fullmatch(r"'[A-Za-z_][A-Za-z0-9_./-]*'", value) and value[1:-1] not in ("True", "False", "None"):
    return value[1:-1]
  return value


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
        f"{current}; rebuild it with "
        f"`{fit_command(data_dir, kind, name, meta.get('gin_file'), meta.get('gin_bindings', ()))}`")
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
    self.bindings = list(CLI_BINDINGS.get()) if gin_file else []
    self.checkpoint_dir = self.dir / "checkpoints"
    self._lock()
    self._claim(config or {})

  def _lock(self) -> None:
    """One fit per artifact at a time: an OS lock (released when the process dies, so an
    interrupted fit never blocks its own resume) on a hidden file beside the build dir."""
    self.dir.parent.mkdir(parents=True, exist_ok=True)
    self._lock_file = open(self.dir.parent / f".lock-{self.name}", "w")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock_file.close()
      raise RuntimeError(f"another process is building the {self.kind} artifact {self.name!r} of "
                         f"{self.data_dir} right now; wait for it to finish") from None

  def release(self) -> None:
    self._lock_file.close()  # closing drops the flock

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
    if self.gin_file:  # run through `recjax fit`: gin holds this fit's operative config
      import gin
      gin_config = gin.operative_config_str() or None
    meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "name": self.name, "fit": self.fit,
            "gin_file": self.gin_file, "gin_bindings": self.bindings,
            "command": fit_command(self.data_dir, self.kind, self.name, self.gin_file, self.bindings),
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
  try:
    yield b
    b.commit()
  finally:
    b.release()


def verify(path) -> None:
  """Raises ValueError if a file of the artifact no longer matches its manifest's sha256."""
  path = pathlib.Path(path)
  for rel, info in read(path)["files"].items():
    if sha256_file(path / rel) != info["sha256"]:
      raise ValueError(f"{path / rel} does not match the sha256 in {path / MANIFEST}; rebuild the artifact")
