"""Where a user's data lands: atomic directory writes, file checksums, one-sentence I/O errors.

Every writer of a directory a later command reads (prepare, export) writes into a hidden
sibling `.NAME.partial-PID` and moves the files into place when complete, its index file
(manifest / checksums) last; a reader finding data files without that index knows the
write was interrupted and refuses the directory. Checksums (sha256 per file) are written
beside the files and verified on load, so a corrupt or edited file is named, not read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import shutil
from typing import Iterable, Iterator

CHECKSUMS = "checksums.json"


class OutputError(ValueError):
  """An output path that cannot be written; the message names the path and the cause."""


class IntegrityError(ValueError):
  """A file whose checksum or size no longer matches what was written."""


def sha256_file(path, block: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(block), b""):
      h.update(chunk)
  return "sha256:" + h.hexdigest()


def output_error(path, e: OSError, what: str = "output") -> OutputError:
  cause = {errno.ENOSPC: "the disk is full", errno.EROFS: "the filesystem is read-only",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ENOTDIR: "a path component is a file, not a directory",
           errno.EEXIST: "a file is in the way", errno.EISDIR: "it is a directory",
           errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
  where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
  return OutputError(f"cannot write {what} {path}: {cause}{where}")


def check_output_dir(path, what: str = "output") -> pathlib.Path:
  """Refuses an output path that is a file, or whose parent cannot be created or written."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise OutputError(f"cannot write {what} {path}: it is a file, not a directory")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise output_error(path, e, what) from None
  if not os.access(path.parent, os.W_OK | os.X_OK):
    raise OutputError(f"cannot write {what} {path}: permission denied in {path.parent}")
  if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
    raise OutputError(f"cannot write {what} {path}: permission denied")
  return path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def staged_dir(final, what: str = "output") -> Iterator[pathlib.Path]:
  """A fresh hidden sibling of `final` to write into; removed afterwards in any case.

  Leftovers of killed writers (their PID gone) are removed first.
  """
  final = check_output_dir(final, what)
  prefix = f".{final.name}.partial-"
  for old in final.parent.glob(prefix + "*"):
    pid = old.name[len(prefix):]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(old, ignore_errors=True)
  stage = final.parent / f"{prefix}{os.getpid()}"
  shutil.rmtree(stage, ignore_errors=True)
  try:
    stage.mkdir()
    yield stage
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR):
      raise output_error(final, e, what) from None
    raise
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def commit_dir(stage, final, files: Iterable[str], index: str, what: str = "output") -> None:
  """Moves `files` then `index` from `stage` into `final`.

  The old index goes first, so from then until the new one lands `final` is visibly
  incomplete (data files without an index) rather than a mix of old and new. Other
  files in `final` (a dataset's artifacts) are left alone.
  """
  stage, final = pathlib.Path(stage), pathlib.Path(final)
  try:
    final.mkdir(parents=True, exist_ok=True)
    (final / index).unlink(missing_ok=True)
    for name in files:
      os.replace(stage / name, final / name)
    os.replace(stage / index, final / index)
  except OSError as e:
    raise output_error(final, e, what) from None


def begin_staged(final, what: str = "output") -> pathlib.Path:
  """`staged_dir` for writers that cannot wrap their body in a `with`: returns the stage;
  `finish_staged` commits it. A stage left by a failure is removed by the next writer."""
  final = check_output_dir(final, what)
  prefix = f".{final.name}.partial-"
  for old in final.parent.glob(prefix + "*"):
    pid = old.name[len(prefix):]
    if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
      shutil.rmtree(old, ignore_errors=True)
  stage = final.parent / f"{prefix}{os.getpid()}"
  try:
    stage.mkdir()
  except OSError as e:
    raise output_error(final, e, what) from None
  return stage


def finish_staged(stage, final, what: str = "output") -> None:
  """Checksums every file of `stage`, moves them into `final` (checksums.json last)."""
  stage = pathlib.Path(stage)
  files = [str(p.relative_to(stage)) for p in sorted(stage.rglob("*")) if p.is_file()]
  try:
    write_checksums(stage, files)
    commit_dir(stage, final, files, CHECKSUMS, what)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def verify_export(directory) -> None:
  try:
    verify_checksums(directory, "export")
  except IntegrityError as e:
    raise IntegrityError(f"{e}; refusing to load it: export the checkpoint again (recjax export)") from None


def write_checksums(directory, files: Iterable[str], name: str = CHECKSUMS) -> dict[str, dict]:
  directory = pathlib.Path(directory)
  sums = {f: {"sha256": sha256_file(directory / f), "bytes": (directory / f).stat().st_size}
          for f in sorted(files)}
  (directory / name).write_text(json.dumps({"files": sums}, indent=2) + "\n")
  return sums


def verify_checksums(directory, what: str, name: str = CHECKSUMS, required: bool = True) -> None:
  """Raises IntegrityError naming the first missing, resized or changed file."""
  directory = pathlib.Path(directory)
  index = directory / name
  if not index.is_file():
    if required:
      raise IntegrityError(f"{what} {directory} has no {name}: it is incomplete (an interrupted write?) "
                           "or predates checksums")
    return
  try:
    sums = json.loads(index.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise IntegrityError(f"{what} {directory}: {name} is unreadable ({e})") from None
  for f, expected in sums.items():
    path = directory / f
    if not path.is_file():
      raise IntegrityError(f"{what} {directory} is missing {f}")
    size = path.stat().st_size
    if size != expected["bytes"]:
      raise IntegrityError(f"{what} file {path} has {size} bytes, not the {expected['bytes']} written: "
                           "it is truncated or was changed")
    if sha256_file(path) != expected["sha256"]:
      raise IntegrityError(f"{what} file {path} does not match its checksum: it is corrupt or was edited")
