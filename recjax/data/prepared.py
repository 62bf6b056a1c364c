"""Read side of a prepared dataset directory (written by `recjax.data.prepare`)."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from recjax.data import prepare as _prepare


class IncompleteDataset(ValueError):
  """A dataset directory that must not be read (interrupted prepare, changed files)."""


class PreparedDataset:
  """A prepared dataset: `items()` and `sequences()` tables plus the manifest."""

  def __init__(self, data_dir, *, verify: bool = False):
    self.data_dir = pathlib.Path(data_dir)
    path = self.data_dir / _prepare.MANIFEST
    data_files = (_prepare.ITEMS_FILE, _prepare.SEQUENCES_FILE)
    if not path.is_file():
      if any((self.data_dir / f).exists() for f in data_files):
        raise IncompleteDataset(f"{self.data_dir} is a half-written prepared dataset (data files but no "
                                f"{_prepare.MANIFEST}: an interrupted `recjax prepare`?); prepare it again")
      raise FileNotFoundError(f"{self.data_dir} is not a prepared dataset (no {_prepare.MANIFEST}); "
                              "create it with `recjax prepare`")
    try:
      self.manifest: dict[str, Any] = json.loads(path.read_text())
      self.manifest["content_hash"]
    except (ValueError, KeyError, TypeError) as e:
      raise IncompleteDataset(f"{path} is unreadable or incomplete ({e!r:.80}); prepare the dataset "
                              "again") from None
    # Sizes are cheap to check on every open and catch the usual accidents: a data file
    # from another prepare beside this manifest, a truncated copy. `verify` hashes them.
    for name, size in self.manifest.get("file_bytes", {}).items():
      f = self.data_dir / name
      actual = f.stat().st_size if f.is_file() else None
      if actual != size:
        state = "is missing" if actual is None else f"has {actual} bytes, not the {size} the manifest records"
        raise IncompleteDataset(f"{f} {state}: the dataset was changed or half-written after it was "
                                "prepared; prepare it again")
    if verify:
      self.verify()

  @property
  def num_users(self) -> int:
    return self.manifest["num_users"]

  @property
  def num_items(self) -> int:
    return self.manifest["num_items"]

  @property
  def vocab_size(self) -> int:
    return self.manifest["item_ids"]["vocab_size"]

  @property
  def content_hash(self) -> str:
    return self.manifest["content_hash"]

  def has_field(self, name: str) -> bool:
    return name in self.manifest["fields"]

  def verify(self) -> None:
    """Raises if the data files no longer match the manifest's content hash."""
    actual = _prepare.content_hash(self.data_dir)
    if actual != self.content_hash:
      raise ValueError(f"{self.data_dir}: content hash {actual} does not match the manifest's "
                       f"{self.content_hash}; the dataset changed after it was prepared")

  def items(self, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(self.data_dir / _prepare.ITEMS_FILE, columns=columns)

  def item_titles(self) -> dict[int, str]:
    """{item id: title} ("" where an item has none)."""
    table = self.items(["item_id", "title"]).to_pydict()
    return {int(i): t or "" for i, t in zip(table["item_id"], table["title"])}

  def sequences(self, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(self.data_dir / _prepare.SEQUENCES_FILE, columns=columns)

  def iter_sequences(self, columns: Sequence[str] | None = None,
                     batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Streams user rows in order without loading the whole table."""
    f = pq.ParquetFile(self.data_dir / _prepare.SEQUENCES_FILE)
    yield from f.iter_batches(batch_size=batch_size, columns=columns)


def summary_rows(manifest: dict[str, Any]) -> list[tuple[str, str]]:
  """Human-readable (name, value) rows describing a prepared dataset."""
  seq = manifest["sequence_length"]
  filters = manifest["filters"]
  return [
      ("source format", manifest["source_format"]),
      ("users", f"{manifest['num_users']:,}"),
      ("items", f"{manifest['num_items']:,}"),
      ("interactions", f"{manifest['num_interactions']:,}"),
      ("sequence length min/mean/max", f"{seq['min']} / {seq['mean']} / {seq['max']}"),
      ("items with text", f"{manifest['num_items_with_text']:,}"),
      ("max category depth", str(manifest["max_category_depth"])),
      ("per-interaction fields", ", ".join(manifest["fields"][2:])),
      ("raw users / items / interactions",
       f"{filters['raw_users']:,} / {filters['raw_items']:,} / {filters['raw_interactions']:,}"),
      ("bad lines skipped", _skipped(manifest["bad_lines"])),
      ("content hash", manifest["content_hash"][:23] + "..."),
  ]


def _skipped(bad: dict) -> str:
  reasons = ", ".join(f"{k} {v}" for k, v in bad.get("by_reason", {}).items())
  return f"{bad['skipped']} ({reasons})" if reasons else str(bad["skipped"])


def format_table(rows: list[tuple[str, str]], title: str | None = None) -> str:
  width = max(len(k) for k, _ in rows)
  lines = [title] if title else []
  lines += [f"  {k:<{width}}  {v}" for k, v in rows]
  return "\n".join(lines)
