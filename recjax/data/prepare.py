"""Raw records -> a prepared dataset on disk.

Pipeline (each step columnar over numpy arrays, so a Clothing-size source fits in memory):
  collect    stream a reader's interactions into flat columns (no per-record objects kept)
  order      chronological per user; ties keep file order (stable)
  dedupe     optional: drop an item repeated immediately after itself
  trim       optional: keep each user's most recent N interactions
  k-core     drop users with < max(k, min_seq_len) and items with < k interactions,
             repeated until nothing changes (a true fixed point)
  remap      dense ids: users 0..U-1, items NUM_RESERVED..NUM_RESERVED+I-1 (PAD=0, MASK=1),
             both in natural order of the original ids, so the output does not depend on
             file order
  split      leave-one-out: last item = test target, second to last = valid target
  write      items.parquet, sequences.parquet, manifest.json (counts, options, content hash),
             into a hidden sibling directory first, moved into place when complete with
             the manifest last (recjax.integrity), so an interrupted prepare leaves no
             dataset that can be read

Before ordering, records that cannot be placed are refused (an error naming file:line)
or, with skip_bad_lines, dropped and counted by reason: an exact duplicate of an earlier
interaction (same user, item, timestamp and every other field; only where the source has
timestamps), and an interaction without a timestamp in a source whose others have one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recjax import integrity
from recjax.data import formats
from recjax.data.formats.common import NARRATIVE_FIELDS, BadLines, FormatError, Source

PAD_ID = 0
MASK_ID = 1
NUM_RESERVED = 2  # item ids below this are PAD / MASK

# Optional per-interaction fields, written only when the source has them.
_TEXT_FIELDS = ("review", "summary", "critique", "endorsement")
_COLUMN_OF = {"review": "reviews", "summary": "summaries", "critique": "critiques",
              "endorsement": "endorsements"}
MANIFEST = "manifest.json"
ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
_ROW_GROUP_USERS = 65536


@dataclasses.dataclass
class PrepareOptions:
  kcore: int = 0  # min interactions per user and per item (0 = off)
  min_seq_len: int = 3  # users need train >= 1, valid and test items
  dedupe_consecutive: bool = False
  max_seq_len: int = 0  # keep the most recent N per user (0 = all)
  short_ids: bool = False  # random "I123" ids for text tasks (else I<item_id>)
  seed: int = 0
  skip_bad_lines: bool = False
  # The catalogue's top-level category, put first in every item's category path that does
  # not start with it: some sources drop it (LC-Rec's Office files start below "Office
  # Products"), and FLARE's critique levels count from it (paper section 4.5 example).
  category_root: str = ""

  def validate(self) -> None:
    for name in ("kcore", "max_seq_len"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if self.min_seq_len < 3:
      raise ValueError(f"--min_seq_len must be >= 3 for a leave-one-out split, got {self.min_seq_len}")
    if 0 < self.max_seq_len < self.min_seq_len:
      raise ValueError(f"--max_seq_len {self.max_seq_len} is below --min_seq_len {self.min_seq_len}")
    if self.category_root != self.category_root.strip():
      raise ValueError(f"--category_root {self.category_root!r} has leading or trailing spaces")


class _Columns:
  """Interaction fields accumulated as flat columns while a reader streams."""

  def __init__(self):
    self.user_index: dict[str, int] = {}
    self.item_index: dict[str, int] = {}
    self.user, self.item, self.order = [], [], []
    self.timestamp: list[int | None] = []
    self.rating: list[float | None] = []
    self.text: dict[str, list[str | None]] = {f: [] for f in _TEXT_FIELDS}
    self.preferences: list[tuple[str, ...] | None] = []
    self.present: set[str] = set()
    self.line: list[int] = []  # where each row came from, for errors raised after collection
    self.path: list[str | None] = []

  def add(self, x) -> None:
    self.user.append(self.user_index.setdefault(x.user, len(self.user_index)))
    self.item.append(self.item_index.setdefault(x.item, len(self.item_index)))
    self.order.append(x.order)
    self.timestamp.append(x.timestamp)
    self.rating.append(x.rating)
    for f in _TEXT_FIELDS:
      value = getattr(x, f)
      self.text[f].append(value)
      if value is not None:
        self.present.add(f)
    self.preferences.append(x.preferences)
    self.line.append(-1 if x.line is None else x.line)
    self.path.append(x.path)
    if x.timestamp is not None:
      self.present.add("timestamp")
    if x.rating is not None:
      self.present.add("rating")
    if x.preferences is not None:
      self.present.add("preferences")


def _natural_key(s: str):
  # "2" < "10" for numeric ids (Beauty.txt keeps its numbering), string order otherwise.
  return (0, int(s), "") if s.isdigit() else (1, 0, s)


def _dense_rank(index: dict[str, int], used: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """Maps collection codes of the used ids to dense ranks in natural id order."""
  names = list(index)
  kept = [names[c] for c in np.flatnonzero(used)]
  kept.sort(key=_natural_key)
  remap = np.full(len(names), -1, np.int64)
  remap[[index[n] for n in kept]] = np.arange(len(kept))
  return remap, kept


def kcore_mask(user: np.ndarray, item: np.ndarray, user_min: int, item_min: int) -> tuple[np.ndarray, int]:
  """Keep-mask of the largest subset where every user has >= user_min and every item
  >= item_min interactions (iterated to the fixed point). Returns (mask, iterations)."""
  keep = np.ones(len(user), bool)
  if user_min <= 1 and item_min <= 1:
    return keep, 0
  iterations = 0
  while True:
    iterations += 1
    ucount = np.bincount(user[keep], minlength=user.max(initial=0) + 1)
    icount = np.bincount(item[keep], minlength=item.max(initial=0) + 1)
    new = keep & (ucount[user] >= user_min) & (icount[item] >= item_min)
    if (new == keep).all():
      return keep, iterations
    keep = new


def prepare(format: str, input: str | os.PathLike, output: str | os.PathLike, *,
            item_text: str | None = None, datamaps: str | None = None,
            options: PrepareOptions | None = None) -> dict[str, Any]:
  """Reads `input` in `format`, writes the prepared dataset to `output`, returns the manifest."""
  options = options or PrepareOptions()
  options.validate()
  start = time.time()
  bad = BadLines(skip=options.skip_bad_lines)
  integrity.check_output_dir(output, "prepared dataset")
  source = formats.read(format, input, item_text=item_text, datamaps=datamaps, bad=bad)
  with integrity.staged_dir(output, "prepared dataset") as stage:
    manifest = build(source, stage, options, bad)
    manifest["inputs"] = {k: os.fspath(v) for k, v in
                          (("input", input), ("item_text", item_text), ("datamaps", datamaps)) if v}
    manifest["seconds"] = round(time.time() - start, 2)
    _write_manifest(stage, manifest)
    integrity.commit_dir(stage, output, manifest["files"], MANIFEST, "prepared dataset")
  return manifest


def build(source: Source, output, options: PrepareOptions, bad: BadLines) -> dict[str, Any]:
  """The format-independent part of `prepare`."""
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  cols = _Columns()
  for x in source.interactions():
    cols.add(x)
  if not cols.user:
    raise ValueError(f"{source.format}: the input has no interactions")
  stats: dict[str, Any] = {"raw_interactions": len(cols.user), "raw_users": len(cols.user_index),
                           "raw_items": len(cols.item_index)}

  user = np.asarray(cols.user, np.int64)
  item = np.asarray(cols.item, np.int64)
  order = np.asarray(cols.order, np.int64)
  has_ts = "timestamp" in cols.present
  valid = np.ones(len(user), bool)
  if has_ts:
    missing = np.fromiter((t is None for t in cols.timestamp), bool, len(user))
    _refuse(cols, np.flatnonzero(missing), bad, "timestamp", "missing (records that lack a timestamp "
            "cannot be placed in a history whose other records have one)", "missing_field")
    valid &= ~missing
    ts = np.asarray([0 if t is None else t for t in cols.timestamp], np.int64)
    idx = np.lexsort((order, ts, user))
    idx = idx[valid[idx]]
    dup = _exact_duplicates(cols, idx, user, item, ts)
    stats["exact_duplicate_interactions"] = len(dup)
    _refuse(cols, dup[:, 1], bad, None, dup[:, 0], "duplicate_interaction")
    valid[dup[:, 1]] = False
    idx = idx[valid[idx]]
  else:
    ts = None
    idx = np.lexsort((order, user))
  user, item = user[idx], item[idx]

  # Dedupe and trim act on the chronological order; k-core last, so the result is a fixed point.
  keep = np.ones(len(idx), bool)
  if options.dedupe_consecutive:
    same = np.zeros(len(idx), bool)
    same[1:] = (user[1:] == user[:-1]) & (item[1:] == item[:-1])
    keep &= ~same
    stats["consecutive_duplicates_removed"] = int(same.sum())
  if options.max_seq_len:
    stats["trimmed_interactions"] = int(keep.sum())
    keep &= _keep_most_recent(user, keep, options.max_seq_len)
    stats["trimmed_interactions"] -= int(keep.sum())
  kept = np.flatnonzero(keep)
  core, stats["kcore_iterations"] = kcore_mask(user[kept], item[kept],
                                               max(options.kcore, options.min_seq_len), options.kcore)
  stats["filtered_interactions"] = int(len(kept) - core.sum())
  kept = kept[core]
  if not len(kept):
    raise ValueError(f"{source.format}: no interactions left after filtering "
                     f"(kcore={options.kcore}, min_seq_len={options.min_seq_len})")
  idx = idx[kept]
  user, item = user[kept], item[kept]

  user_remap, user_names = _dense_rank(cols.user_index, np.bincount(user, minlength=len(cols.user_index)) > 0)
  item_remap, item_names = _dense_rank(cols.item_index, np.bincount(item, minlength=len(cols.item_index)) > 0)
  dense_user = user_remap[user]
  regroup = np.argsort(dense_user, kind="stable")  # stable: keeps chronological order per user
  idx, dense_user = idx[regroup], dense_user[regroup]
  dense_item = (item_remap[item[regroup]] + NUM_RESERVED).astype(np.int32)
  offsets = np.zeros(len(user_names) + 1, np.int32)
  np.cumsum(np.bincount(dense_user, minlength=len(user_names)), out=offsets[1:])
  stats["users_removed"] = stats["raw_users"] - len(user_names)
  stats["items_removed"] = stats["raw_items"] - len(item_names)

  # Item counts overall and in the training portion (all but each user's last two).
  lengths = np.diff(offsets)
  pos_from_end = np.repeat(offsets[1:], lengths) - np.arange(len(dense_item))
  count = np.bincount(dense_item, minlength=len(item_names) + NUM_RESERVED)[NUM_RESERVED:]
  train_count = np.bincount(dense_item[pos_from_end > 2], minlength=len(item_names) + NUM_RESERVED)[NUM_RESERVED:]

  items_info = _write_items(out, source, item_names, count, train_count, options, stats)
  field_names = _write_sequences(out, source, cols, idx, ts, offsets, dense_item, user_names, stats)

  manifest = {
      "format_version": 1,
      "source_format": source.format,
      "num_users": len(user_names),
      "num_items": len(item_names),
      "num_interactions": int(len(dense_item)),
      **items_info,
      "item_ids": {"pad": PAD_ID, "mask": MASK_ID, "first": NUM_RESERVED,
                   "vocab_size": len(item_names) + NUM_RESERVED},
      "split": {"scheme": "leave_one_out", "train": "items[:-2]", "valid_target": "items[-2]",
                "test_target": "items[-1]"},
      "sequence_length": {"min": int(lengths.min()), "max": int(lengths.max()),
                          "mean": round(float(lengths.mean()), 3)},
      "fields": field_names,
      "options": dataclasses.asdict(options),
      "filters": stats,
      "bad_lines": bad.summary(),
      "reader_notes": source.notes,
      "files": [ITEMS_FILE, SEQUENCES_FILE],
      # Checked on every open (cheap); the content hash is checked by `verify()`.
      "file_bytes": {f: (out / f).stat().st_size for f in (ITEMS_FILE, SEQUENCES_FILE)},
  }
  manifest["content_hash"] = content_hash(out)
  return manifest


def _where(cols: _Columns, row: int) -> tuple[str, int | None]:
  return cols.path[row] or "<input>", None if cols.line[row] < 0 else cols.line[row]


def _refuse(cols: _Columns, rows, bad: BadLines, field, problem, reason: str) -> None:
  """Each row in `rows` goes through the bad-line policy (an error at its file:line, or a
  counted skip); `problem` is a sentence or, per row, the row it duplicates."""
  for i, row in enumerate(rows):
    path, line = _where(cols, int(row))
    if isinstance(problem, str):
      text = problem
    else:
      first_path, first_line = _where(cols, int(problem[i]))
      text = (f"exact duplicate of the interaction at {first_path}:{first_line} (same user, item, "
              "timestamp and fields)")
    bad.handle(FormatError(path, line, field, text, reason=reason))


def _exact_duplicates(cols: _Columns, idx: np.ndarray, user, item, ts) -> np.ndarray:
  """[[first row, repeated row], ...]: rows equal in user, item, timestamp and every field.

  `idx` is ordered by (user, timestamp, file order), so equal rows sit in one run of
  equal (user, timestamp); only runs with a repeated item are compared field by field.
  """
  u, t, it = user[idx], ts[idx], item[idx]
  same = np.flatnonzero((u[1:] == u[:-1]) & (t[1:] == t[:-1]))
  if not len(same):
    return np.zeros((0, 2), np.int64)
  # Candidate pairs: rows of one (user, timestamp) run with the same item.
  starts = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1])])
  run_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(idx)]))
  sizes = np.bincount(run_of)
  out = []
  for r in np.flatnonzero(sizes > 1):
    members = idx[starts[r]:starts[r] + sizes[r]]
    first: dict = {}
    for row in members:
      row = int(row)
      key = (int(item[row]), cols.rating[row], cols.preferences[row],
             *(cols.text[f][row] for f in _TEXT_FIELDS))
      if key in first:
        out.append((first[key], row))
      else:
        first[key] = row
  return np.asarray(out, np.int64).reshape(-1, 2)


def _keep_most_recent(user: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
  """Mask of the last n kept rows of each user (rows are grouped by user)."""
  rows = np.flatnonzero(keep)
  u = user[rows]
  ends = np.flatnonzero(np.r_[u[1:] != u[:-1], True])
  group_end = np.repeat(ends, np.diff(np.r_[-1, ends]))
  out = np.zeros(len(user), bool)
  out[rows[group_end - np.arange(len(rows)) < n]] = True
  return out


def _write_items(out: pathlib.Path, source: Source, item_names: list[str], count, train_count,
                 options: PrepareOptions, stats: dict) -> dict[str, Any]:
  position = {name: i for i, name in enumerate(item_names)}
  meta: list = [None] * len(item_names)
  unused = duplicates = 0
  for it in source.items():
    i = position.get(it.item)
    if i is None:
      unused += 1
    elif meta[i] is not None:
      duplicates += 1
    else:
      meta[i] = it
  stats["item_rows_without_interactions"] = unused
  stats["duplicate_item_rows_ignored"] = duplicates

  n = len(item_names)
  if options.short_ids:
    numbers = np.random.default_rng(options.seed).permutation(n) + 1
  else:
    numbers = np.arange(n) + NUM_RESERVED
  get = lambda attr: [getattr(m, attr) if m is not None else None for m in meta]
  categories = [list(m.categories) if m is not None else [] for m in meta]
  if options.category_root:  # items without a path stay without one
    root = options.category_root
    categories = [c if not c or c[0] == root else [root, *c] for c in categories]
  # Any text an encoder can read counts: some real items have only a category path.
  has_text = [m is not None and bool(m.title or m.description or m.brand or m.categories) for m in meta]
  table = pa.table({
      "item_id": pa.array(np.arange(n) + NUM_RESERVED, pa.int32()),
      "original_id": pa.array(item_names, pa.string()),
      "short_id": pa.array([f"I{k}" for k in numbers], pa.string()),
      "title": pa.array(get("title"), pa.string()),
      "description": pa.array(get("description"), pa.string()),
      "brand": pa.array(get("brand"), pa.string()),
      "price": pa.array(get("price"), pa.float64()),
      "categories": pa.array(categories, pa.list_(pa.string())),
      "count": pa.array(count, pa.int32()),
      "train_count": pa.array(train_count, pa.int32()),
  })
  pq.write_table(table, out / ITEMS_FILE)
  return {"num_items_with_text": int(sum(has_text)),
          "num_items_with_title": int(sum(m is not None and bool(m.title) for m in meta)),
          "num_items_with_metadata": int(sum(m is not None for m in meta)),
          "max_category_depth": max((len(c) for c in categories), default=0)}


def _write_sequences(out: pathlib.Path, source: Source, cols: _Columns, idx: np.ndarray, ts,
                     offsets: np.ndarray, dense_item: np.ndarray, user_names: list[str],
                     stats: dict) -> list[str]:
  """Writes one row per user; `idx` maps output rows (grouped by user) to collected rows."""
  per_step: dict[str, pa.Array] = {"items": pa.array(dense_item, pa.int32())}
  if ts is not None:
    per_step["timestamps"] = pa.array(ts[idx], pa.int64())
  if "rating" in cols.present:
    per_step["ratings"] = pa.array(cols.rating, pa.float32()).take(idx)
  for f in _TEXT_FIELDS:
    if f in cols.present:
      per_step[_COLUMN_OF[f]] = pa.array(cols.text[f], pa.string()).take(idx)
  if "preferences" in cols.present:
    per_step["preferences"] = pa.array(cols.preferences, pa.list_(pa.string())).take(idx)

  narratives = _collect_narratives(source, user_names, stats)
  names = ["user_id", "original_id", *per_step, *narratives]
  schema = pa.schema([("user_id", pa.int32()), ("original_id", pa.string())]
                     + [(k, pa.list_(v.type)) for k, v in per_step.items()]
                     + [(k, pa.string()) for k in narratives])
  with pq.ParquetWriter(out / SEQUENCES_FILE, schema) as writer:
    for lo in range(0, len(user_names), _ROW_GROUP_USERS):
      hi = min(lo + _ROW_GROUP_USERS, len(user_names))
      a, b = int(offsets[lo]), int(offsets[hi])
      off = pa.array(offsets[lo:hi + 1] - a, pa.int32())
      columns = [pa.array(np.arange(lo, hi), pa.int32()), pa.array(user_names[lo:hi], pa.string())]
      columns += [pa.ListArray.from_arrays(off, v.slice(a, b - a)) for v in per_step.values()]
      columns += [pa.array(v[lo:hi], pa.string()) for v in narratives.values()]
      writer.write_table(pa.Table.from_arrays(columns, schema=schema))
  return names


def _collect_narratives(source: Source, user_names: list[str], stats: dict) -> dict[str, list]:
  position = {name: i for i, name in enumerate(user_names)}
  found: dict[str, list] = {}
  unmatched = 0
  for info in source.users():
    i = position.get(info.user)
    if i is None:
      unmatched += 1
      continue
    for key, text in info.narratives.items():
      if key not in NARRATIVE_FIELDS:
        raise ValueError(f"{source.format}: unknown narrative field {key!r}")
      found.setdefault(key, [None] * len(user_names))[i] = text
  if unmatched:
    stats["narratives_of_filtered_users"] = unmatched
  return {k: found[k] for k in NARRATIVE_FIELDS if k in found}


def content_hash(directory) -> str:
  """sha256 over the data files (not the manifest), in a fixed order."""
  h = hashlib.sha256()
  for name in (ITEMS_FILE, SEQUENCES_FILE):
    h.update(name.encode())
    with open(pathlib.Path(directory) / name, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return "sha256:" + h.hexdigest()


def _write_manifest(output, manifest: dict) -> None:
  path = pathlib.Path(output) / MANIFEST
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
  os.replace(tmp, path)

