"""REGEN (Kaggle `googleai/regen-reviews-enhanced-with-generative-narratives`) JSONL.

One user per line:
  reviewer_id: str
  purchase_history: [{item: {asin, title, category, description, price},
                      review: {summary, rating, text, unix_time}}, ...]   # chronological
  last_purchase: {reason, explanation}
  user: {profile, brief_summary, long_summary}
  metadata: {...}

Items and narratives are embedded, so all three streams re-read the same file and a
malformed line is skipped (or raised) as a whole in every stream, reported once.

Per-entry optional fields, whose names the public data does not confirm: `critique`
(str), `endorsement` (str) and `preferences` (list of str, a lone str taken as one;
our synthetic generator's ground-truth preference statements). REGEN writes a placeholder where no critique
exists (adjacent items too far apart in the category tree), so empty strings and
placeholders like "<no_critique>", "N/A", "None" become None for critiques and
endorsements. Every optional or unknown key is counted in
`notes["optional_fields"]` ({"user": {...}, "entry": {...}}; nested unknown keys appear
as "item.<key>" / "review.<key>"), filled in as the interactions stream is read.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any, Iterator, NoReturn

from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        UserInfo, category_levels, check_interaction, check_item,
                                        iter_records, join_text, parse_price)

USER_KEYS = frozenset({"reviewer_id", "purchase_history", "last_purchase", "user", "metadata"})
ENTRY_KEYS = frozenset({"item", "review"})
ITEM_KEYS = frozenset({"asin", "title", "category", "description", "price"})
REVIEW_KEYS = frozenset({"summary", "rating", "text", "unix_time"})
# Values REGEN (and hand-made dumps) use for "no critique / endorsement here".
PLACEHOLDERS = frozenset({"", "<no_critique>", "no_critique", "<no critique>", "no critique",
                          "<none>", "none", "n/a", "na", "null"})
# (source dict, key) -> NARRATIVE_FIELDS name.
NARRATIVES = (("last_purchase", "reason", "purchase_reason"),
              ("last_purchase", "explanation", "explanation"),
              ("user", "brief_summary", "brief_summary"),
              ("user", "long_summary", "long_summary"),
              ("user", "profile", "profile"))


def read(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads a REGEN JSONL file (gzip or plain); items and users come from the same file."""
  if item_text is not None:
    raise ValueError(f"regen reader takes no item_text (got {item_text!r}); items are embedded")
  if datamaps is not None:
    raise ValueError(f"regen reader takes no datamaps (got {datamaps!r})")
  if not os.path.isfile(input):
    raise FileNotFoundError(f"regen file not found: {input}")
  bad = bad or BadLines()
  once = _OncePerLine(bad)
  notes: dict[str, Any] = {}

  def records() -> Iterator["_Record"]:
    first_line: dict[str, int] = {}
    for lineno, record in iter_records(input, once, parse="json"):
      try:
        rec = _parse(record, input, lineno)
        # One line per user: a second line would silently merge two histories.
        user = rec.user.user
        if user in first_line:
          raise FormatError(input, lineno, "reviewer_id", f"user {user} already has a line "
                            f"(line {first_line[user]})", reason="duplicate_user")
        first_line[user] = lineno
        yield rec
      except FormatError as e:
        once.handle(e)

  def interactions() -> Iterator[Interaction]:
    user_keys: collections.Counter = collections.Counter()
    entry_keys: collections.Counter = collections.Counter()
    placeholders = 0
    order = 0
    for rec in records():
      user_keys.update(rec.user_keys)
      entry_keys.update(rec.entry_keys)
      placeholders += rec.placeholders
      for interaction in rec.interactions:
        interaction.order = order
        order += 1
        yield interaction
    notes["optional_fields"] = {"user": dict(sorted(user_keys.items())),
                                "entry": dict(sorted(entry_keys.items()))}
    notes["critique_placeholders"] = placeholders

  def items() -> Iterator[Item]:
    first: dict[str, Item] = {}
    conflicting: set[str] = set()
    for rec in records():
      for item in rec.items:
        kept = first.get(item.item)
        if kept is None:
          first[item.item] = item
          yield item
        elif kept != item:
          conflicting.add(item.item)
    notes["items_with_conflicting_metadata"] = len(conflicting)

  def users() -> Iterator[UserInfo]:
    for rec in records():
      yield rec.user

  return Source(format="regen", interactions=interactions, items=items, users=users,
                bad_lines=bad, notes=notes)


class _OncePerLine:
  """Reports each bad line to `bad` once, though three streams read the file."""

  def __init__(self, bad: BadLines):
    self.bad = bad
    self.reported: set[int | None] = set()

  def handle(self, error: FormatError) -> None:
    if self.bad.skip and error.line in self.reported:
      return
    self.reported.add(error.line)
    self.bad.handle(error)


class _Record:
  """One parsed line: everything each stream needs, validated up front."""

  __slots__ = ("interactions", "items", "user", "user_keys", "entry_keys", "placeholders")

  def __init__(self):
    self.interactions: list[Interaction] = []
    self.items: list[Item] = []
    self.user_keys: list[str] = []
    self.entry_keys: list[str] = []
    self.placeholders = 0


def _parse(record: dict, path, lineno: int) -> _Record:
  def fail(field: str, problem: str) -> NoReturn:
    reason = ("missing_field" if problem == "missing" else
              "out_of_range" if "finite" in problem else "wrong_type")
    raise FormatError(path, lineno, field, problem, reason=reason)

  out = _Record()
  user = record.get("reviewer_id")
  if user is None:
    fail("reviewer_id", "missing")
  if isinstance(user, str) and not user.strip():
    raise FormatError(path, lineno, "reviewer_id", "empty id", reason="empty_id")
  if not isinstance(user, (str, int)) or isinstance(user, bool):
    fail("reviewer_id", f"expected str, got {type(user).__name__} {user!r:.60}")
  user = str(user)
  history = record.get("purchase_history")
  if history is None:
    fail("purchase_history", "missing")
  if not isinstance(history, list):
    fail("purchase_history", f"expected a list, got {type(history).__name__}")
  out.user_keys = [k for k in record if k not in USER_KEYS]

  for i, entry in enumerate(history):
    where = f"purchase_history[{i}]"
    if not isinstance(entry, dict):
      fail(where, f"expected an object, got {type(entry).__name__}")
    out.entry_keys.extend(k for k in entry if k not in ENTRY_KEYS)
    item = _dict(entry, "item", where, fail, required=True)
    review = _dict(entry, "review", where, fail, required=False)
    out.entry_keys.extend(f"item.{k}" for k in item if k not in ITEM_KEYS)
    out.entry_keys.extend(f"review.{k}" for k in review if k not in REVIEW_KEYS)

    asin = item.get("asin")
    if asin is None:
      fail(f"{where}.item.asin", "missing")
    if isinstance(asin, str) and not asin.strip():
      raise FormatError(path, lineno, f"{where}.item.asin", "empty id", reason="empty_id")
    if not isinstance(asin, str):
      fail(f"{where}.item.asin", f"expected str, got {type(asin).__name__} {asin!r:.60}")
    out.items.append(Item(item=asin,
                          title=_text(item, "title", f"{where}.item", fail),
                          description=join_text(_text_or_list(item, "description", f"{where}.item", fail)),
                          price=parse_price(item.get("price")),
                          categories=_category(item.get("category"), f"{where}.item.category", fail),
                          path=str(path), line=lineno))

    critique = _text(entry, "critique", where, fail)
    if "critique" in entry and _placeholder(critique):
      out.placeholders += 1
    preferences = entry.get("preferences")
    if isinstance(preferences, str):
      preferences = [preferences]
    if preferences is not None:
      if not isinstance(preferences, list) or not all(isinstance(p, str) for p in preferences):
        fail(f"{where}.preferences", f"expected a list of str, got {preferences!r:.60}")
      preferences = tuple(p.strip() for p in preferences if p.strip())
    out.interactions.append(Interaction(
        user=user, item=asin, order=0,  # numbered in file order by the stream
        timestamp=_unix_time(review.get("unix_time"), f"{where}.review.unix_time", fail),
        rating=_rating(review.get("rating"), f"{where}.review.rating", fail),
        review=_text(review, "text", f"{where}.review", fail),
        summary=_text(review, "summary", f"{where}.review", fail),
        critique=None if _placeholder(critique) else critique,
        endorsement=_not_placeholder(_text(entry, "endorsement", where, fail)),
        preferences=preferences, path=str(path), line=lineno))

  # Values checked here, not per record downstream: a bad entry refuses its whole line
  # (the user), as a skipped line, rather than leaving a history with a hole in it.
  for entry_record in (*out.interactions, *out.items):
    (check_interaction if isinstance(entry_record, Interaction) else check_item)(entry_record)
  narratives = {}
  sections = {name: _dict(record, name, "", fail, required=False)
              for name in ("last_purchase", "user")}
  for section, key, field in NARRATIVES:
    text = _text(sections[section], key, section, fail)
    if text:
      narratives[field] = text
  out.user = UserInfo(user=user, narratives=narratives)
  return out


def _dict(parent: dict, key: str, where: str, fail, required: bool) -> dict:
  field = f"{where}.{key}" if where else key
  value = parent.get(key)
  if value is None:
    if required:
      fail(field, "missing")
    return {}
  if not isinstance(value, dict):
    fail(field, f"expected an object, got {type(value).__name__}")
  return value


def _text(parent: dict, key: str, where: str, fail) -> str | None:
  value = parent.get(key)
  if value is None:
    return None
  if not isinstance(value, str):
    fail(f"{where}.{key}", f"expected str, got {type(value).__name__} {value!r:.60}")
  return value.strip() or None


def _text_or_list(parent: dict, key: str, where: str, fail):
  value = parent.get(key)
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return value
  return _text(parent, key, where, fail)


def _category(value, field: str, fail) -> tuple[str, ...]:
  if value is not None and not isinstance(value, (str, list)):
    fail(field, f"expected text, got {type(value).__name__} {value!r:.60}")
  return category_levels(value, style="dash")


def _placeholder(text: str | None) -> bool:
  return text is None or text.strip().lower() in PLACEHOLDERS


def _not_placeholder(text: str | None) -> str | None:
  return None if _placeholder(text) else text


def _number(value: Any, field: str, fail) -> float | None:
  if value is None or value == "":
    return None
  if isinstance(value, bool):
    fail(field, f"expected a number, got {value!r}")
  try:
    number = float(value)  # numeric strings ("4.0") occur in re-dumps
  except (TypeError, ValueError):
    fail(field, f"expected a number, got {value!r:.60}")
  if not math.isfinite(number):
    fail(field, f"expected a finite number, got {value!r}")
  return number


def _rating(value: Any, field: str, fail) -> float | None:
  return _number(value, field, fail)


def _unix_time(value: Any, field: str, fail) -> int | None:
  number = _number(value, field, fail)
  return None if number is None else int(number)
