"""Records every reader yields, the line-level error type, and shared parsing helpers.

Every reader in `recjax.data.formats` turns one public format into three streams of
plain records (`Interaction`, `Item`, `UserInfo`), so `recjax.data.prepare` never
knows which format it is reading. Readers stream: they hold one line at a time.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gzip
import html
import io
import json
import math
import os
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


@dataclasses.dataclass
class Item:
  item: str  # original id (ASIN, game id, file id)
  title: str | None = None
  description: str | None = None
  brand: str | None = None
  price: float | None = None
  categories: tuple[str, ...] = ()  # category path, top level first


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


class FormatError(ValueError):
  """A malformed record. The message names file, line (1-based) and field."""

  def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str):
    self.path, self.line, self.field, self.problem = str(path), line, field, problem
    where = self.path if line is None else f"{self.path}:{line}"
    what = f" field '{field}':" if field else ""
    super().__init__(f"{where}:{what} {problem}")


class BadLines:
  """Policy for malformed records: raise (default) or skip, count and remember a few."""

  def __init__(self, skip: bool = False, keep: int = 20):
    self.skip = skip
    self.count = 0
    self.examples: list[str] = []
    self._keep = keep

  def handle(self, error: FormatError) -> None:
    if not self.skip:
      raise error
    self.count += 1
    if len(self.examples) < self._keep:
      self.examples.append(str(error))

  def summary(self) -> dict[str, Any]:
    return {"skipped": self.count, "examples": list(self.examples)}


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


@contextlib.contextmanager
def open_text(path: str | os.PathLike) -> Iterator[io.TextIOBase]:
  """Opens plain or gzip text by content (magic bytes), not by file name."""
  path = os.fspath(path)
  with open(path, "rb") as probe:
    gz = probe.read(2) == b"\x1f\x8b"
  f = gzip.open(path, "rt", encoding="utf-8") if gz else open(path, "r", encoding="utf-8")
  try:
    yield f
  finally:
    f.close()


def iter_records(path: str | os.PathLike, bad: BadLines, parse: str = "json") -> Iterator[tuple[int, dict]]:
  """Yields (line_number, dict) from a JSON-lines file (gzip or plain).

  parse: "json" for strict JSON lines (Amazon 2018, REGEN), "literal" for
  Python-literal lines (Amazon 2014, Steam), "auto" to try JSON then literal.
  Blank lines are ignored; lines that fail to parse go through `bad`.
  """
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = _parse_line(line, parse)
      except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        bad.handle(FormatError(path, lineno, None, f"cannot parse line as {parse}: {e}"))
        continue
      if not isinstance(record, dict):
        bad.handle(FormatError(path, lineno, None, f"expected an object, got {type(record).__name__}"))
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
    raise FormatError(path, lineno, key, "missing")
  value = record[key]
  if not isinstance(value, kind):
    raise FormatError(path, lineno, key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r:.60}")
  return value


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
  if style == "quoted" or (style == "auto" and text[0] in "'\"["):
    try:
      parsed = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
      return category_levels(list(parsed))
    except (ValueError, SyntaxError):
      pass
  if style == "dash" or (style == "auto" and " - " in text):
    parts: Sequence[str] = text.split(" - ")
  elif style in ("comma", "auto"):
    parts = text.split(",")
  else:
    parts = [text]
  return tuple(p.strip() for p in parts if p.strip())


