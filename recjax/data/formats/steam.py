"""Steam (Kang & McAuley, ICDM 2018): `steam_reviews.json.gz` and `steam_games.json.gz`.

Both files are Python-literal dicts, one per line. Reviews carry `username, product_id,
date ("2017-12-17"), text, hours, ...` and sometimes `user_id` (a numeric Steam id),
which is preferred over `username` when present. A user who appears both with and
without `user_id` therefore gets two ids; the dump gives no way to join them.

Steam has no star rating: `rating` is None, except that a boolean `recommended` (present
in some re-dumps) becomes 1.0 (recommended) / 0.0 (not recommended). Dates have day
resolution and become the unix seconds of that day's midnight UTC, so same-day reviews
tie and `order` (file line) breaks the tie.

Games carry `id, app_name/title, genres, tags, specs, price, publisher, developer,
sentiment`. Genres are a flat set on Steam, but we keep their listed order as the
category path (first genre = top level) so the usual "category prefix" features still
work; games without genres fall back to their tags. Steam has no description text, so
the description is composed from tags, specs, developer and sentiment. A few rows of
the real file lack `id`; they cannot be joined to reviews, so they are counted in
`notes["games_without_id"]` rather than treated as bad lines.
"""

from __future__ import annotations

import calendar
import datetime
import os
from typing import Any, Iterator

from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        category_levels, iter_records, parse_price,
                                        resolve_item_text)

GAMES_FILE = "steam_games.json.gz"


def read(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads Steam reviews and (optionally discovered) games metadata."""
  if datamaps is not None:
    raise ValueError(f"steam reader takes no datamaps (got {datamaps!r})")
  if not os.path.isfile(input):
    raise FileNotFoundError(f"steam reviews file not found: {input}")
  bad = bad or BadLines()
  notes: dict[str, Any] = {
      "rating": "Steam has no star rating: rating is None unless a boolean "
                "'recommended' field exists (1.0 recommended, 0.0 not)",
  }
  sibling = os.path.join(os.path.dirname(os.fspath(input)), GAMES_FILE)
  item_text = resolve_item_text(item_text, [sibling], "steam games file", notes)

  def interactions() -> Iterator[Interaction]:
    with_recommended = 0
    for lineno, record in iter_records(input, bad, parse="literal"):
      try:
        interaction = _interaction(record, input, lineno)
      except FormatError as e:
        bad.handle(e)
        continue
      with_recommended += interaction.rating is not None
      yield interaction
    notes["reviews_with_recommended"] = with_recommended

  def items() -> Iterator[Item]:
    if item_text is None:
      return
    seen: set[str] = set()
    without_id = duplicates = 0
    for lineno, record in iter_records(item_text, bad, parse="literal"):
      if record.get("id") in (None, ""):
        without_id += 1
        continue
      try:
        item = _item(record, item_text, lineno)
      except FormatError as e:
        bad.handle(e)
        continue
      if item.item in seen:
        duplicates += 1
        continue
      seen.add(item.item)
      yield item
    notes["games_without_id"] = without_id
    notes["duplicate_game_ids"] = duplicates

  return Source(format="steam", interactions=interactions, items=items, bad_lines=bad, notes=notes)


def parse_date(value: Any, path, lineno: int, field: str = "date") -> int:
  """ISO date ("2017-12-17") or datetime -> unix seconds, naive values taken as UTC."""
  if not isinstance(value, str):
    raise FormatError(path, lineno, field, f"expected an ISO date string, got {value!r:.60}",
                      reason="wrong_type")
  try:
    moment = datetime.datetime.fromisoformat(value.strip())
  except ValueError:
    raise FormatError(path, lineno, field, f"not an ISO date: {value!r:.60}", reason="unparsable") from None
  if moment.tzinfo is not None:
    return int(moment.timestamp())
  return calendar.timegm(moment.timetuple())


def _identifier(record: dict, key: str, path, lineno: int) -> str | None:
  """Ids are strings in the dump ('725280'); integers from re-dumps are accepted too."""
  value = record.get(key)
  if value is None:
    return None
  if isinstance(value, str) and not value.strip():
    raise FormatError(path, lineno, key, "empty id", reason="empty_id")
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise FormatError(path, lineno, key, f"expected str or int, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  return str(value).strip() or None


def _interaction(record: dict, path, lineno: int) -> Interaction:
  user = _identifier(record, "user_id", path, lineno) or _identifier(record, "username", path, lineno)
  if user is None:
    raise FormatError(path, lineno, "username", "missing (and no user_id)", reason="missing_field")
  item = _identifier(record, "product_id", path, lineno)
  if item is None:
    raise FormatError(path, lineno, "product_id", "missing", reason="missing_field")
  if record.get("date") is None:
    raise FormatError(path, lineno, "date", "missing", reason="missing_field")
  timestamp = parse_date(record["date"], path, lineno)
  recommended = record.get("recommended")
  if recommended is not None and not isinstance(recommended, bool):
    raise FormatError(path, lineno, "recommended", f"expected bool, got {recommended!r:.60}",
                      reason="wrong_type")
  text = record.get("text")
  if text is not None and not isinstance(text, str):
    raise FormatError(path, lineno, "text", f"expected str, got {type(text).__name__}", reason="wrong_type")
  return Interaction(user=user, item=item, order=lineno, timestamp=timestamp,
                     rating=None if recommended is None else float(recommended),
                     review=(text or "").strip() or None, path=str(path), line=lineno)


def _item(record: dict, path, lineno: int) -> Item:
  game_id = _identifier(record, "id", path, lineno)
  genres = _names(record, "genres", path, lineno)
  tags = _names(record, "tags", path, lineno)
  specs = _names(record, "specs", path, lineno)
  for key in ("app_name", "title", "publisher", "developer", "sentiment"):
    value = record.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
      raise FormatError(path, lineno, key, f"expected text, got {type(value).__name__} {value!r:.60}",
                        reason="wrong_type")
  title = _text(record.get("app_name")) or _text(record.get("title"))
  parts = []
  if tags:
    parts.append("Tags: " + ", ".join(tags) + ".")
  if specs:
    parts.append("Features: " + ", ".join(specs) + ".")
  developer = _text(record.get("developer"))
  if developer:
    parts.append(f"Developer: {developer}.")
  sentiment = _text(record.get("sentiment"))
  if sentiment:
    parts.append(f"Reviews: {sentiment}.")
  return Item(item=game_id, title=title,
              description=" ".join(parts) or None,
              brand=_text(record.get("publisher")) or developer,
              price=parse_price(record.get("price")),
              categories=category_levels(genres or tags), path=str(path), line=lineno)


def _names(record: dict, key: str, path, lineno: int) -> list[str]:
  value = record.get(key)
  if value is None:
    return []
  if not isinstance(value, (list, tuple)):
    raise FormatError(path, lineno, key, f"expected a list, got {type(value).__name__} {value!r:.60}",
                      reason="wrong_type")
  if not all(isinstance(v, str) for v in value):
    raise FormatError(path, lineno, key, f"expected a list of text, got {value!r:.60}", reason="wrong_type")
  return [s for s in (v.strip() for v in value) if s]


def _text(value: Any) -> str | None:
  if value is None:
    return None
  text = str(value).strip()
  return text or None
