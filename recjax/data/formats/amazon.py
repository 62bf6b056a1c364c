"""Amazon Reviews 2014 and 2018 raw dumps (McAuley lab): reviews plus `meta_*` files.

Reviews (`reviews_<Cat>.json.gz`, `reviews_<Cat>_5.json.gz` for 2014; `<Cat>.json.gz`,
`<Cat>_5.json.gz` for 2018) hold one review per line: `reviewerID, asin, overall,
unixReviewTime, reviewText, summary, ...`. Meta files (`meta_<Cat>.json.gz`) hold one
product per line: `asin, title, description, brand, price, categories|category, ...`.

The 2014 files are Python-literal dicts (single quotes, u'' prefixes), though some
mirrors re-dumped them as strict JSON, so 2014 lines are parsed with "auto". The 2018
files are strict JSON. The 2018 meta was scraped from HTML: `description` is a list of
paragraphs, `price` is text ("$12.99", "$5.99 - $9.99", "" or page junk) and
`category`/`title`/`brand` carry HTML entities ("&amp;"); all editions' text goes
through `common.clean_text`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        category_levels, clean_text, iter_records,
                                        resolve_item_text, join_text, parse_price,
                                        require)

_EXTENSIONS = (".json.gz", ".jsonl.gz", ".json", ".jsonl", ".gz")


def read_2014(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads an Amazon 2014 reviews file and (optionally discovered) `meta_*` file."""
  return _read(input, item_text, datamaps, bad, edition=2014)


def read_2018(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads an Amazon 2018 reviews file and (optionally discovered) `meta_*` file."""
  return _read(input, item_text, datamaps, bad, edition=2018)


def meta_candidates(input) -> list[str]:
  """Sibling meta files for a reviews file, most likely first.

  `reviews_Beauty_5.json.gz` and `Beauty.json.gz` both map to `meta_Beauty.json.gz`
  (then `meta_Beauty.json`, in case the dump was decompressed).
  """
  directory, name = os.path.split(os.fspath(input))
  for ext in _EXTENSIONS:
    if name.endswith(ext):
      name = name[:-len(ext)]
      break
  name = name.removeprefix("reviews_").removesuffix("_5")
  return [os.path.join(directory, f"meta_{name}{ext}") for ext in (".json.gz", ".json")]


def _read(input, item_text, datamaps, bad, edition: int) -> Source:
  fmt = f"amazon{edition}"
  if datamaps is not None:
    raise ValueError(f"{fmt} reader takes no datamaps (got {datamaps!r}); ids are raw ASINs")
  if not os.path.isfile(input):
    raise FileNotFoundError(f"{fmt} reviews file not found: {input}")
  bad = bad or BadLines()
  notes: dict[str, Any] = {}
  item_text = resolve_item_text(item_text, meta_candidates(input), f"{fmt} meta file", notes)
  # Reviews: 2014 dumps circulate both as literals and as JSON; 2018 is always JSON.
  review_parse = "auto" if edition == 2014 else "json"
  meta_parse = "auto" if edition == 2014 else "json"

  def interactions() -> Iterator[Interaction]:
    for lineno, record in iter_records(input, bad, parse=review_parse):
      try:
        yield _interaction(record, input, lineno)
      except FormatError as e:
        bad.handle(e)

  def items() -> Iterator[Item]:
    if item_text is None:
      return
    seen: set[str] = set()
    duplicates = 0
    for lineno, record in iter_records(item_text, bad, parse=meta_parse):
      try:
        item = _item(record, item_text, lineno, edition)
      except FormatError as e:
        bad.handle(e)
        continue
      # The 2018 meta repeats some products verbatim; the first row wins.
      if item.item in seen:
        duplicates += 1
        continue
      seen.add(item.item)
      yield item
    notes["duplicate_meta_rows"] = duplicates

  return Source(format=fmt, interactions=interactions, items=items, bad_lines=bad, notes=notes)


def _interaction(record: dict, path, lineno: int) -> Interaction:
  user = require(record, "reviewerID", path, lineno, str)
  item = require(record, "asin", path, lineno, str)
  rating = require(record, "overall", path, lineno, (int, float))
  if isinstance(rating, bool) or not math.isfinite(rating):
    raise FormatError(path, lineno, "overall", f"expected a finite number, got {rating!r}")
  timestamp = require(record, "unixReviewTime", path, lineno, int)
  if isinstance(timestamp, bool):
    raise FormatError(path, lineno, "unixReviewTime", f"expected int, got {timestamp!r}")
  return Interaction(user=user, item=item, order=lineno, timestamp=timestamp, rating=float(rating),
                     review=_optional_text(record, "reviewText", path, lineno),
                     summary=_optional_text(record, "summary", path, lineno))


def _optional_text(record: dict, key: str, path, lineno: int) -> str | None:
  """A free-text field that may be absent; empty text counts as absent."""
  value = record.get(key)
  if value is None:
    return None
  if not isinstance(value, str):
    raise FormatError(path, lineno, key, f"expected str, got {type(value).__name__} {value!r:.60}")
  return value.strip() or None


def _item(record: dict, path, lineno: int, edition: int) -> Item:
  asin = require(record, "asin", path, lineno, str)
  # 2014: list of category paths; 2018: one path. Both scraped from HTML, so clean_text.
  raw = record.get("categories" if edition == 2014 else "category")
  categories = tuple(c for c in map(clean_text, map(str, category_levels(raw))) if c)
  return Item(item=asin,
              title=clean_text(_plain(record.get("title"))),
              description=clean_text(join_text(record.get("description"))),
              brand=clean_text(_plain(record.get("brand"))),
              price=parse_price(record.get("price")),
              categories=categories)


def _plain(value: Any) -> str | None:
  """Meta scalars are informational, so any non-empty scalar is kept as text."""
  if value is None:
    return None
  text = str(value).strip()
  return text or None
