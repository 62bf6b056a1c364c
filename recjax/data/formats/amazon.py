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
                                        require, require_id)

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
  user = require_id(record, "reviewerID", path, lineno)
  item = require_id(record, "asin", path, lineno)
  rating = require(record, "overall", path, lineno, (int, float))
  if not math.isfinite(rating):
    raise FormatError(path, lineno, "overall", f"expected a finite number, got {rating!r}",
                      reason="out_of_range")
  timestamp = require(record, "unixReviewTime", path, lineno, int)
  return Interaction(user=user, item=item, order=lineno, timestamp=timestamp, rating=float(rating),
                     review=_optional_text(record, "reviewText", path, lineno),
                     summary=_optional_text(record, "summary", path, lineno),
                     path=str(path), line=lineno)


def _optional_text(record: dict, key: str, path, lineno: int) -> str | None:
  """A free-text field that may be absent; empty text counts as absent."""
  value = record.get(key)
  if value is None:
    return None
  if not isinstance(value, str):
    raise FormatError(path, lineno, key, f"expected str, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  return value.strip() or None


def _item(record: dict, path, lineno: int, edition: int) -> Item:
  asin = require_id(record, "asin", path, lineno)
  # 2014: list of category paths; 2018: one path. Both scraped from HTML, so clean_text.
  key = "categories" if edition == 2014 else "category"
  raw = record.get(key)
  if raw is not None and not isinstance(raw, (str, list, tuple)):
    raise FormatError(path, lineno, key, f"expected a list, got {type(raw).__name__} {raw!r:.60}",
                      reason="wrong_type")
  categories = tuple(c for c in map(clean_text, map(str, category_levels(raw))) if c)
  description = record.get("description")
  if isinstance(description, (list, tuple)) and not all(isinstance(d, str) for d in description):
    raise FormatError(path, lineno, "description", f"expected text or a list of text, got {description!r:.60}",
                      reason="wrong_type")
  if description is not None and not isinstance(description, (str, list, tuple)):
    raise FormatError(path, lineno, "description", f"expected text, got {type(description).__name__}",
                      reason="wrong_type")
  return Item(item=asin,
              title=clean_text(_plain(record, "title", path, lineno)),
              description=clean_text(join_text(description)),
              brand=clean_text(_plain(record, "brand", path, lineno)),
              price=parse_price(record.get("price")),
              categories=categories, path=str(path), line=lineno)


def _plain(record: dict, key: str, path, lineno: int) -> str | None:
  """A meta scalar kept as text (numbers too: some brands are numeric). A list or object
  is refused: stored as text it would read "['Red', 'Shoe']"."""
  value = record.get(key)
  if value is None:
    return None
  if not isinstance(value, (str, int, float)) or isinstance(value, bool):
    raise FormatError(path, lineno, key, f"expected text, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  text = str(value).strip()
  return text or None
