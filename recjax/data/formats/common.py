"""Records every reader yields, the line-level error type, and shared parsing helpers.

Every reader in `recjax.data.formats` turns one public format into three streams of
plain records (`Interaction`, `Item`, `UserInfo`), so `recjax.data.prepare` never
knows which format it is reading. Readers stream: they hold one line at a time.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import gzip
import html
import io
import json
import math
import os
import zlib
from typing import Any, Callable, Iterator, Sequence

# The narrative fields a user may carry (REGEN and the synthetic generator).
NARRATIVE_FIELDS = ("purchase_reason", "explanation", "brief_summary", "long_summary", "profile")


@dataclasses.dataclass
class Interaction:
  """One user-item event. `order` breaks timestamp ties stably (file order)."""

  user: str
  item: str
  order: int
  timestamp: int | None = None  # unix seconds
  rating: float | None = None
  review: str | None = None  # review text
  summary: str | None = None  # review title / summary
  critique: str | None = None  # REGEN-style critique of this item vs the previous one
  endorsement: str | None = None
  preferences: tuple[str, ...] | None = None  # ground-truth preference statements at this step
  # Where the record came from, so checks made after the reader (prepare's) can name it.
  path: str | None = dataclasses.field(default=None, compare=False)
  line: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Item:
  item: str  # original id (ASIN, game id, file id)
  title: str | None = None
  description: str | None = None
  brand: str | None = None
  price: float | None = None
  categories: tuple[str, ...] = ()  # category path, top level first
  path: str | None = dataclasses.field(default=None, compare=False)
  line: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class UserInfo:
  user: str
  narratives: dict[str, str] = dataclasses.field(default_factory=dict)  # keys in NARRATIVE_FIELDS


@dataclasses.dataclass
class Source:
  """What a reader returns: three re-iterable streams plus what it noticed.

  Each stream is a zero-argument callable returning a fresh iterator, so prepare can
  read the (small) item stream after the interactions without holding both in memory.
  `notes` collects reader findings worth recording in the manifest (e.g. which optional
  REGEN fields were present).
  """

  format: str
  interactions: Callable[[], Iterator[Interaction]]
  items: Callable[[], Iterator[Item]] = lambda: iter(())
  users: Callable[[], Iterator[UserInfo]] = lambda: iter(())
  bad_lines: "BadLines | None" = None
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)


# Limits on single values. Real dumps stay far below them; a value past one is a broken
# or hostile record (a 1 MB "category" exhausted memory in the category parser).
MAX_ID_CHARS = 1024
MAX_SHORT_TEXT = 1 << 16  # title, brand, summary, critique, one category level
MAX_LONG_TEXT = 1 << 22  # review, description (some real descriptions exceed 128 KiB)
MAX_CATEGORY_DEPTH = 64
MAX_LINE_BYTES = 1 << 26
# Unix seconds (or milliseconds: some conversions use them) from 1970 to ~2109; a
# timestamp outside it is a corrupt value, and would overflow int64 further out.
MAX_TIMESTAMP = 1 << 42
MAX_ABS_RATING = 1e6

# Why a record was refused; the manifest counts skipped records by these names.
REASONS = ("unparsable", "undecodable", "truncated", "missing_field", "wrong_type", "out_of_range",
           "oversized", "empty_id", "duplicate_user", "duplicate_key", "unbalanced_quote",
           "column_count", "unknown_id", "duplicate_interaction", "malformed")


class FormatError(ValueError):
  """A malformed record. The message names file, line (1-based) and field; `reason` is
  one of REASONS (the key it is counted under when skipped)."""

  def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str,
               reason: str = "malformed"):
    self.path, self.line, self.field, self.problem = str(path), line, field, problem
    self.reason = reason if reason in REASONS else "malformed"
    where = self.path if line is None else f"{self.path}:{line}"
    what = f" field '{field}':" if field else ""
    super().__init__(f"{where}:{what} {problem}")


class FileCorrupt(FormatError):
  """A fault of the whole file (a corrupt or truncated gzip stream): what follows the
  fault cannot be read or counted, so it is raised even under --skip_bad_lines."""


class BadLines:
  """Policy for malformed records: raise (default) or skip, counting them by reason."""

  def __init__(self, skip: bool = False, keep: int = 20):
    self.skip = skip
    self.count = 0
    self.by_reason: collections.Counter = collections.Counter()
    self.examples: list[str] = []
    self._keep = keep

  def handle(self, error: FormatError) -> None:
    if not self.skip or isinstance(error, FileCorrupt):
      raise error
    self.count += 1
    self.by_reason[error.reason] += 1
    if len(self.examples) < self._keep:
      self.examples.append(str(error))

  def summary(self) -> dict[str, Any]:
    return {"skipped": self.count, "by_reason": dict(sorted(self.by_reason.items())),
            "examples": list(self.examples)}


def resolve_item_text(item_text, candidates: Sequence[str], what: str, notes: dict) -> str | None:
  """The item-metadata file: `item_text` if given (it must exist), else the first existing
  candidate next to the input, else None. Records the outcome in `notes`."""
  if item_text is not None:
    if not os.path.isfile(item_text):
      raise FileNotFoundError(f"{what} not found: {item_text}")
    notes["item_text"] = os.fspath(item_text)
    return os.fspath(item_text)
  found = [p for p in candidates if os.path.isfile(p)]
  if found:
    notes["item_text"] = found[0]
    notes["item_text_discovered"] = True
    return found[0]
  notes["item_text"] = None
  notes["item_text_missing"] = f"no {what} given and none of {list(candidates)} exists"
  return None


def _is_gzip(path) -> bool:
  with open(path, "rb") as probe:
    return probe.read(2) == b"\x1f\x8b"


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _gzip_fault(path, line: int | None, e: Exception) -> FileCorrupt:
  kind = "truncated" if isinstance(e, EOFError) else "corrupt"
  return FileCorrupt(path, line, None, f"{kind} gzip stream ({e}); nothing after this point can be "
                     "read: download or decompress the file again", reason="truncated")


@contextlib.contextmanager
def open_text(path: str | os.PathLike) -> Iterator[io.TextIOBase]:
  """Opens plain or gzip text by content (magic bytes), not by file name.

  For whole-document readers; line-oriented readers use `iter_lines`, which reports
  undecodable bytes and gzip faults with their line."""
  path = os.fspath(path)
  gz = _is_gzip(path)
  f = gzip.open(path, "rt", encoding="utf-8") if gz else open(path, "r", encoding="utf-8")
  try:
    yield f
  except UnicodeDecodeError as e:
    raise FormatError(path, None, None, f"not UTF-8 text: {e}", reason="undecodable") from None
  except _GZIP_ERRORS as e:
    raise _gzip_fault(path, None, e) from None
  finally:
    f.close()


def read_document(path: str | os.PathLike) -> str:
  """A whole (gzip or plain) UTF-8 file as text; a bad byte is reported with its line."""
  path = os.fspath(path)
  try:
    with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as f:
      data = f.read()
  except _GZIP_ERRORS as e:
    raise _gzip_fault(path, None, e) from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise FormatError(path, line, None, f"not UTF-8: byte {data[e.start:e.start + 1]!r} at offset "
                      f"{e.start}", reason="undecodable") from None


def iter_lines(path: str | os.PathLike, bad: BadLines, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
  """Yields (line number, text) of a (gzip or plain) UTF-8 file, one physical line at a time.

  A line with bytes that are not UTF-8 goes to `bad` as undecodable; so does a line past
  MAX_LINE_BYTES (oversized) and a last line without a line terminator (truncated: a
  record cut short may still parse, e.g. item id 2795 cut to 2, so it is never read).
  A corrupt or truncated gzip stream raises FileCorrupt naming the line it reached.
  """
  path = os.fspath(path)
  lineno = 0
  try:
    with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as f:
      while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
          return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
          while raw and not raw.endswith(b"\n"):  # skip the rest of the line
            raw = f.readline(MAX_LINE_BYTES)
          bad.handle(FormatError(path, lineno, None, f"line longer than {MAX_LINE_BYTES} bytes",
                                 reason="oversized"))
          continue
        if not raw.endswith(b"\n"):
          if raw.strip():
            bad.handle(FormatError(path, lineno, None, "last line has no line terminator: the file "
                                   "looks truncated (append a newline if it is complete)",
                                   reason="truncated"))
          return
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          bad.handle(FormatError(path, lineno, None, f"not UTF-8: byte {raw[e.start:e.start + 1]!r} at "
                                 f"column {e.start + 1}", reason="undecodable"))
          continue
        yield lineno, (text if keep_ends else text.rstrip("\r\n"))
  except _GZIP_ERRORS as e:
    raise _gzip_fault(path, lineno + 1, e) from None


def iter_records(path: str | os.PathLike, bad: BadLines, parse: str = "json") -> Iterator[tuple[int, dict]]:
  """Yields (line_number, dict) from a JSON-lines file (gzip or plain).

  parse: "json" for strict JSON lines (Amazon 2018, REGEN), "literal" for
  Python-literal lines (Amazon 2014, Steam), "auto" to try JSON then literal.
  Blank lines are ignored; lines that fail to parse go through `bad`.
  """
  for lineno, line in iter_lines(path, bad):
    if not line.strip():
      continue
    try:
      record = _parse_line(line, parse)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
      bad.handle(FormatError(path, lineno, None, f"cannot parse line as {parse}: {str(e)[:200]}",
                             reason="unparsable"))
      continue
    if not isinstance(record, dict):
      bad.handle(FormatError(path, lineno, None, f"expected an object, got {type(record).__name__}",
                             reason="wrong_type"))
      continue
    yield lineno, record


def _parse_line(line: str, parse: str) -> Any:
  if parse == "json":
    return json.loads(line)
  if parse == "literal":
    return ast.literal_eval(line.strip())
  try:
    return json.loads(line)
  except ValueError:
    return ast.literal_eval(line.strip())


def require(record: dict, key: str, path, lineno: int, kind: type | tuple[type, ...] = str) -> Any:
  """Returns record[key] or raises a FormatError naming the field."""
  if key not in record or record[key] is None:
    raise FormatError(path, lineno, key, "missing", reason="missing_field")
  value = record[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
    raise FormatError(path, lineno, key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  return value


def _kinds(kind) -> tuple:
  return kind if isinstance(kind, tuple) else (kind,)


def require_id(record: dict, key: str, path, lineno: int) -> str:
  """A required id: a non-empty string (or an integer, as some re-dumps write them)."""
  value = require(record, key, path, lineno, (str, int))
  return check_id(str(value), path, lineno, key)


def check_id(value: str, path, lineno: int | None, field: str) -> str:
  text = value.strip()
  if not text:
    raise FormatError(path, lineno, field, "empty id", reason="empty_id")
  if len(text) > MAX_ID_CHARS:
    raise FormatError(path, lineno, field, f"id of {len(text)} characters (limit {MAX_ID_CHARS})",
                      reason="oversized")
  return text


def _kind_name(kind) -> str:
  if isinstance(kind, tuple):
    return " or ".join(k.__name__ for k in kind)
  return kind.__name__


def parse_price(value: Any) -> float | None:
  """Prices circulate as numbers, '$12.99', '12.99', '' or 'Free to Play'; None if absent."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value) if math.isfinite(value) else None
  text = str(value).strip().replace("$", "").replace(",", "")
  if not text:
    return None
  if text.lower() in ("free", "free to play", "free to use"):
    return 0.0
  try:
    price = float(text.split("-")[0].strip())
  except ValueError:
    return None
  return price if math.isfinite(price) else None


def clean_text(value: str | None) -> str | None:
  """HTML-unescapes and collapses whitespace (scraped Amazon text is full of &amp; and
  &nbsp;); every reader applies it so the same item reads the same in every format."""
  if value is None:
    return None
  if "&" in value:
    value = html.unescape(value)
  return " ".join(value.split()) or None


def join_text(value: Any) -> str | None:
  """Amazon 2018 descriptions are lists of paragraphs; others are strings."""
  if value is None:
    return None
  if isinstance(value, (list, tuple)):
    value = " ".join(str(v).strip() for v in value if str(v).strip())
  text = str(value).strip()
  return text or None


def category_levels(value: Any, style: str = "auto") -> tuple[str, ...]:
  """Parses a category path into levels, top level first.

  Accepted forms:
    ["A", "B", "C"]                     a list (Amazon 2018 `category`, Steam genres)
    [["A", "B"], ["A", "D"]]            Amazon 2014 `categories`: list of paths; the first
                                        (Amazon's primary path) is used
    "A - B - C"                         REGEN `item.category`
    "A, B, C"                           LC-Rec `categories` (names may contain commas, so
                                        depth from this form is approximate)
    "'A', 'B', 'C'"                     RecBole atomic `categories:token_seq` quoted list
  style: "auto", "dash", "comma", "quoted" for strings.
  """
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    if value and all(isinstance(v, (list, tuple)) for v in value):
      value = value[0]
    return tuple(s for s in (str(v).strip() for v in value) if s)
  text = str(value).strip()
  if not text:
    return ()
  # Past the size of a real path, literal_eval could exhaust memory; the split below
  # then yields levels that `check_item` refuses as oversized.
  if len(text) <= MAX_SHORT_TEXT and (style == "quoted" or (style == "auto" and text[0] in "'\"[")):
    try:
      parsed = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
      return category_levels(list(parsed))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      pass
  if style == "dash" or (style == "auto" and " - " in text):
    parts: Sequence[str] = text.split(" - ")
  elif style in ("comma", "auto"):
    parts = text.split(",")
  else:
    parts = [text]
  return tuple(p.strip() for p in parts if p.strip())




# --- checks every reader's records pass (applied by `formats.read`) ---------------------

_INTERACTION_TEXT = {"review": MAX_LONG_TEXT, "summary": MAX_SHORT_TEXT, "critique": MAX_SHORT_TEXT,
                     "endorsement": MAX_LONG_TEXT}
_ITEM_TEXT = {"title": MAX_SHORT_TEXT, "brand": MAX_SHORT_TEXT, "description": MAX_LONG_TEXT}


def _plain_id(value) -> bool:
  return (type(value) is str and 0 < len(value) <= MAX_ID_CHARS and value[0] > " " and value[-1] > " ")


def check_interaction(x: Interaction) -> Interaction:
  """Raises a FormatError (at the record's file:line) for a value no real dump holds."""
  # Fast path for the usual record (this runs once per interaction); anything unusual
  # takes the full checks below, which name the problem.
  if (_plain_id(x.user) and _plain_id(x.item) and x.rating is None and x.timestamp is None
      and x.review is None and x.summary is None and x.critique is None and x.endorsement is None
      and x.preferences is None):
    return x
  path, line = x.path or "<input>", x.line
  x.user = check_id(_string(x.user, path, line, "user"), path, line, "user")
  x.item = check_id(_string(x.item, path, line, "item"), path, line, "item")
  if x.timestamp is not None:
    if isinstance(x.timestamp, bool) or not isinstance(x.timestamp, int):
      raise FormatError(path, line, "timestamp", f"expected an integer, got {x.timestamp!r:.40}",
                        reason="wrong_type")
    if not 0 <= x.timestamp <= MAX_TIMESTAMP:
      raise FormatError(path, line, "timestamp", f"{x.timestamp} is outside 0..{MAX_TIMESTAMP} "
                        "(unix seconds or milliseconds)", reason="out_of_range")
  if x.rating is not None and not (math.isfinite(x.rating) and abs(x.rating) <= MAX_ABS_RATING):
    raise FormatError(path, line, "rating", f"{x.rating!r} is not a finite number within "
                      f"+-{MAX_ABS_RATING:g}", reason="out_of_range")
  for field, limit in _INTERACTION_TEXT.items():
    _check_text(getattr(x, field), limit, path, line, field)
  for p in x.preferences or ():
    _check_text(p, MAX_SHORT_TEXT, path, line, "preferences")
  return x


def check_item(it: Item) -> Item:
  path, line = it.path or "<item file>", it.line
  it.item = check_id(_string(it.item, path, line, "item"), path, line, "item")
  for field, limit in _ITEM_TEXT.items():
    _check_text(getattr(it, field), limit, path, line, field)
  if it.price is not None and not math.isfinite(it.price):
    it.price = None
  if len(it.categories) > MAX_CATEGORY_DEPTH:
    raise FormatError(path, line, "categories", f"{len(it.categories)} levels (limit {MAX_CATEGORY_DEPTH})",
                      reason="oversized")
  for level in it.categories:
    _check_text(level, MAX_SHORT_TEXT, path, line, "categories")
  return it


def check_user(info: UserInfo) -> UserInfo:
  for field, text in info.narratives.items():
    _check_text(text, MAX_LONG_TEXT, "<input>", None, field)
  return info


def _string(value: Any, path, line, field: str) -> str:
  if not isinstance(value, str):
    raise FormatError(path, line, field, f"expected a string id, got {type(value).__name__}", reason="wrong_type")
  return value


def _check_text(value: Any, limit: int, path, line, field: str) -> None:
  if value is None:
    return
  if not isinstance(value, str):
    raise FormatError(path, line, field, f"expected text, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  if len(value) > limit:
    raise FormatError(path, line, field, f"{len(value):,} characters (limit {limit:,})", reason="oversized")


def checked(stream: Callable[[], Iterator], check: Callable, bad: BadLines) -> Callable[[], Iterator]:
  """`stream` with `check` applied to each record; failures go through `bad`."""
  def run():
    for record in stream():
      try:
        yield check(record)
      except FormatError as e:
        bad.handle(e)
  return run
