"""RecBole atomic files: `X.inter` (interactions) and `X.item` (item features).

Both are tab-separated with a typed header row, `name:type` per column, where type is
one of token, token_seq, float, float_seq. Fields are quoted with `"` when they hold a
tab, quote or newline (the RecSysDatasets Amazon conversions quote `categories` and
some titles, and one Beauty title spans two physical lines), so rows are parsed with
`csv`, never by splitting lines. Line numbers in errors are physical lines (1-based)
where the record starts.

Columns used (others are listed in `notes`):
  .inter: user_id, item_id (required), rating, timestamp, review|text|review_text, summary
  .item:  item_id (required), title|movie_title, description, brand, price,
          categories|category (`'Beauty', 'Makeup', 'Nails'` quoted lists)
Every declared float column is validated, used or not, because a value that does not
parse usually means the row is misaligned. Text fields are HTML-unescaped (the Amazon
conversions keep `&amp;`, `&quot;`, ...) and whitespace-collapsed; empty fields are None.
"""

from __future__ import annotations

import ast
import collections
import csv
import math
import os
from typing import Any, Iterator

from recjax.data.formats.common import (MAX_SHORT_TEXT, MAX_TIMESTAMP, BadLines, FormatError,
                                        Interaction, Item, Source,
                                        category_levels, clean_text, iter_lines,
                                        resolve_item_text)

TYPES = ("token", "token_seq", "float", "float_seq")
_FIELD_LIMIT = 2**31 - 1  # descriptions can exceed csv's 128 KiB default

INTER_COLUMNS = {
    "user_id": ("user_id",),
    "item_id": ("item_id",),
    "rating": ("rating",),
    "timestamp": ("timestamp",),
    "review": ("review", "text", "review_text"),
    "summary": ("summary",),
}
ITEM_COLUMNS = {
    "item_id": ("item_id",),
    "title": ("title", "movie_title"),
    "description": ("description",),
    "brand": ("brand",),
    "price": ("price",),
    "categories": ("categories", "category"),
}


def read(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads a RecBole `.inter` file and its `.item` file (given, or the sibling `X.item`)."""
  if datamaps is not None:
    raise ValueError(f"recbole reader takes no datamaps (got {datamaps!r})")
  if not os.path.isfile(input):
    raise FileNotFoundError(f"recbole .inter file not found: {input}")
  bad = bad or BadLines()
  notes: dict[str, Any] = {}
  item_text = resolve_item_text(item_text, item_candidates(input), "recbole .item file", notes)
  # Fail at read() time, not mid-pipeline, when a header lacks the join columns.
  check_header(input, INTER_COLUMNS, ("user_id", "item_id"))
  if item_text is not None:
    check_header(item_text, ITEM_COLUMNS, ("item_id",))

  def interactions() -> Iterator[Interaction]:
    yield from read_interactions(input, bad, notes)

  def items() -> Iterator[Item]:
    if item_text is not None:
      yield from read_items(item_text, bad, notes)

  return Source(format="recbole", interactions=interactions, items=items, bad_lines=bad, notes=notes)


def item_candidates(input) -> list[str]:
  """`X.inter[.gz]` -> [`X.item`, `X.item.gz`] (RecBole names both files after the dataset)."""
  path = os.fspath(input)
  base = path.removesuffix(".gz")
  base = base.removesuffix(".inter") if base.endswith(".inter") else os.path.splitext(base)[0]
  return [base + ".item", base + ".item.gz"]


def read_interactions(path, bad: BadLines, notes: dict[str, Any] | None = None) -> Iterator[Interaction]:
  """Yields one `Interaction` per `.inter` row; `order` is the row's position in the file."""
  order = 0
  for line, cols, values in _rows(path, bad, INTER_COLUMNS, ("user_id", "item_id"), notes):
    try:
      user = _token(values, cols, "user_id", path, line)
      item = _token(values, cols, "item_id", path, line)
      timestamp = _float(values, cols, "timestamp")
      # (An empty timestamp is None here; prepare refuses a file that mixes both.)
      if timestamp is not None and not 0 <= timestamp <= MAX_TIMESTAMP:
        raise FormatError(path, line, "timestamp", f"{values[cols['timestamp']].strip()!r:.40} is outside "
                          f"0..{MAX_TIMESTAMP}", reason="out_of_range")
    except FormatError as e:
      bad.handle(e)
      continue
    yield Interaction(user=user, item=item, order=order,
                      timestamp=None if timestamp is None else int(timestamp),
                      rating=_float(values, cols, "rating"),
                      review=_text(values, cols, "review"),
                      summary=_text(values, cols, "summary"), path=str(path), line=line)
    order += 1


def read_items(path, bad: BadLines, notes: dict[str, Any] | None = None) -> Iterator[Item]:
  """Yields one `Item` per `.item` row; a repeated item_id keeps its first row.

  Repeats are counted in `notes["duplicate_item_rows"]` once the stream is exhausted.
  """
  seen: set[str] = set()
  duplicates = 0
  for line, cols, values in _rows(path, bad, ITEM_COLUMNS, ("item_id",), notes):
    try:
      item = Item(item=_token(values, cols, "item_id", path, line),
                  title=_text(values, cols, "title"),
                  description=_text(values, cols, "description"),
                  brand=_text(values, cols, "brand"),
                  price=_float(values, cols, "price"),
                  categories=_categories(values, cols, path, line), path=str(path), line=line)
    except FormatError as e:
      bad.handle(e)
      continue
    if item.item in seen:
      duplicates += 1
      continue
    seen.add(item.item)
    yield item
  if notes is not None:
    notes["duplicate_item_rows"] = duplicates


def item_ids(path) -> set[str]:
  """The item_id column of a `.item` file, for join checks.

  Malformed rows are ignored here; the items stream reports them under the bad-line policy.
  """
  quiet = BadLines(skip=True, keep=0)
  ids = set()
  for _, cols, values in _rows(path, quiet, {"item_id": ("item_id",)}, ("item_id",), None):
    ids.add(values[cols["item_id"]].strip())
  ids.discard("")
  return ids


def parse_header(row: list[str], path) -> list[tuple[str, str]]:
  """`["item_id:token", ...]` -> [("item_id", "token"), ...]; errors name line 1."""
  header = []
  for i, cell in enumerate(row):
    cell = cell.strip()
    if i == 0:
      cell = cell.lstrip("\ufeff")  # a BOM left by Windows editors
    name, sep, kind = cell.partition(":")
    if not sep or not name:
      raise FormatError(path, 1, cell or f"column {i + 1}", "header cell is not 'name:type'", reason="unparsable")
    if kind not in TYPES:
      raise FormatError(path, 1, name, f"unknown type {kind!r}; expected one of {TYPES}", reason="unparsable")
    if any(name == n for n, _ in header):
      raise FormatError(path, 1, name, "column declared twice", reason="unparsable")
    header.append((name, kind))
  return header


def check_header(path, wanted: dict[str, tuple[str, ...]], required: tuple[str, ...]) -> dict[str, int]:
  """Reads and validates the header row alone; returns {our field: column index}."""
  csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
  for lineno, text in iter_lines(path, BadLines()):
    try:
      row = next(csv.reader([text], delimiter="\t", quotechar='"'), None)
    except csv.Error as e:
      raise FormatError(path, lineno, None, f"unreadable header: {e}", reason="unparsable") from e
    if row:
      return _columns(parse_header(row, path), wanted, required, path)
    break
  raise FormatError(path, 1, None, f"{os.path.basename(os.fspath(path))} has no header row",
                    reason="missing_field")


def _columns(header: list[tuple[str, str]], wanted: dict[str, tuple[str, ...]],
             required: tuple[str, ...], path) -> dict[str, int]:
  names = [n for n, _ in header]
  cols = {}
  for field, aliases in wanted.items():
    index = next((names.index(a) for a in aliases if a in names), None)
    if index is not None:
      cols[field] = index
  for field in required:
    if field not in cols:
      raise FormatError(path, 1, field, f"required column missing from header {names}", reason="missing_field")
  return cols


class _Lines:
  """The physical lines csv reads, with the ones of the current record remembered so a
  record that ran past an unbalanced quote can be given back and read again."""

  def __init__(self, path, bad: BadLines):
    self._source = iter_lines(path, bad, keep_ends=True)
    self._pending: collections.deque = collections.deque()
    self.record: list[tuple[int, str]] = []

  def __iter__(self):
    return self

  def __next__(self) -> str:
    item = self._pending.popleft() if self._pending else next(self._source)
    self.record.append(item)
    return item[1]

  def give_back(self, lines) -> None:
    self._pending.extendleft(reversed(lines))


def _rows(path, bad: BadLines, wanted: dict[str, tuple[str, ...]], required: tuple[str, ...],
          notes: dict[str, Any] | None) -> Iterator[tuple[int, dict[str, int], list[str]]]:
  """Yields (start line, {our field: column index}, values) for each well-formed row.

  Raises on a bad header (nothing after it can be read); malformed rows go to `bad`. A
  record spanning several physical lines is kept only when it has the right number of
  columns and its line breaks sit inside text columns (one real Beauty title spans two
  lines). Otherwise an unbalanced quote on its first line swallowed the lines after it:
  that one line is bad and the rest are read again, so one stray quote costs one line.
  """
  csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
  kind = os.path.basename(os.fspath(path))
  lines = _Lines(path, bad)
  reader = csv.reader(lines, delimiter="\t", quotechar='"')
  header = None
  cols: dict[str, int] = {}
  floats: list[tuple[int, str, bool]] = []
  no_breaks: set[int] = set()
  while True:
    lines.record = []
    try:
      row = next(reader)
      error = None
    except StopIteration:
      if not lines.record:
        break
      row, error = None, "unexpected end of file inside a quoted field"
    except csv.Error as e:
      row, error = None, f"unreadable row: {e}"
    record = lines.record
    start = record[0][0] if record else 0
    if header is None:
      if error or not row:
        raise FormatError(path, start or 1, None, error or f"{kind} has no header row",
                          reason="unparsable" if error else "missing_field")
      header = parse_header(row, path)
      cols = _columns(header, wanted, required, path)
      floats = [(i, n, k == "float_seq") for i, (n, k) in enumerate(header) if k.startswith("float")]
      no_breaks = {i for i, (n, k) in enumerate(header) if k != "token" or n in ("user_id", "item_id")}
      if notes is not None:
        used = set(cols.values())
        notes.setdefault("ignored_columns", {})[kind] = [
            n for i, (n, _) in enumerate(header) if i not in used]
      continue
    if row is not None and not row and len(record) <= 1:
      continue  # blank line
    if row is not None and len(record) > 1 and (
        len(row) != len(header) or any("\n" in row[i] or "\r" in row[i] for i in no_breaks)):
      error = "unbalanced quote: the record does not end on this line"
    if error and len(record) > 1:
      lines.give_back(record[1:])
      bad.handle(FormatError(path, start, None, f"{error} (the record spans lines {start}-{record[-1][0]}; "
                             f"line {start} is bad, the lines after it are read again)",
                             reason="unbalanced_quote"))
      continue
    if error:
      bad.handle(FormatError(path, start, None, error, reason="unparsable"))
      continue
    if len(row) != len(header):
      bad.handle(FormatError(path, start, None,
                             f"expected {len(header)} tab-separated columns, got {len(row)}",
                             reason="column_count"))
      continue
    try:
      for i, name, seq in floats:
        _check_float(row[i], seq, path, start, name)
    except FormatError as e:
      bad.handle(e)
      continue
    yield start, cols, row
  if header is None:
    raise FormatError(path, 1, None, f"{kind} is empty: no header row", reason="missing_field")


def _check_float(value: str, seq: bool, path, line: int, name: str) -> None:
  for part in (value.split() if seq else [value.strip()]):
    if not part:
      continue
    try:
      number = float(part)
    except ValueError:
      raise FormatError(path, line, name, f"expected a float, got {part!r:.60}", reason="wrong_type") from None
    if math.isinf(number):
      raise FormatError(path, line, name, f"expected a finite float, got {part!r}", reason="out_of_range")


def _token(values: list[str], cols: dict[str, int], field: str, path, line: int) -> str:
  value = values[cols[field]].strip()
  if not value:
    raise FormatError(path, line, field, "empty id", reason="empty_id")
  return value


def _float(values: list[str], cols: dict[str, int], field: str) -> float | None:
  """Already validated by `_rows`; empty and NaN (RecBole's fill value) mean absent."""
  if field not in cols or not values[cols[field]].strip():
    return None
  number = float(values[cols[field]])
  return None if math.isnan(number) else number


def _text(values: list[str], cols: dict[str, int], field: str) -> str | None:
  return clean_text(values[cols[field]]) if field in cols else None


def _categories(values: list[str], cols: dict[str, int], path, line: int) -> tuple[str, ...]:
  """`'Beauty', "Women's", 'Eau de Parfum'` -> levels; a broken quoted list is an error."""
  if "categories" not in cols:
    return ()
  text = values[cols["categories"]].strip()
  if not text:
    return ()
  if len(text) > MAX_SHORT_TEXT:
    raise FormatError(path, line, "categories", f"{len(text):,} characters (limit {MAX_SHORT_TEXT:,})",
                      reason="oversized")
  if text[0] in "'\"[":
    try:
      parsed = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      raise FormatError(path, line, "categories", f"unparsable quoted list {text!r:.80}",
                        reason="unparsable") from None
    if not isinstance(parsed, (list, tuple)):
      raise FormatError(path, line, "categories", f"expected a list, got {text!r:.80}", reason="wrong_type")
    levels = category_levels(list(parsed))
  else:
    levels = category_levels(text, "auto")
  return tuple(t for t in (clean_text(level) for level in levels) if t)
