"""LC-Rec JSON: `X.inter.json` and `X.item.json`, each a single JSON document.

`X.inter.json` is `{"user_index": [item_index, ...]}` (0-based, chronological) and
`X.item.json` is `{"item_index": {"title", "description", "brand", "categories"}}` with
`categories` a comma-joined path from the top level (names may contain commas, so the
depth is approximate). There are no timestamps, ratings or reviews: `timestamp` is None
and `order` counts interactions through the document in its key order.

The documents are not line-oriented, so errors carry line=None and name the JSON path
in the field, e.g. "inter[123][4]". Each stream loads its document when iterated and
drops it when done, so memory is one document at a time. Duplicate keys, which `json`
would silently collapse to the last, are reported as bad records (the first wins).
Text is HTML-unescaped and whitespace-collapsed as for RecBole; empty strings are None.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        category_levels, clean_text, read_document,
                                        resolve_item_text)

TEXT_FIELDS = ("title", "description", "brand")
_EXAMPLES = 5


def read(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads `X.inter.json` and its `X.item.json` (given, or the sibling of `input`)."""
  if datamaps is not None:
    raise ValueError(f"lcrec reader takes no datamaps (got {datamaps!r}); ids are LC-Rec indices")
  if not os.path.isfile(input):
    raise FileNotFoundError(f"lcrec .inter.json file not found: {input}")
  bad = bad or BadLines()
  notes: dict[str, Any] = {"timestamps": "none in this format; order is the position in the file"}
  item_text = resolve_item_text(item_text, item_candidates(input), "lcrec .item.json file", notes)

  def interactions() -> Iterator[Interaction]:
    order = 0
    users = items_seen = 0
    for user, sequence in _entries(input, "inter", bad):
      try:
        items = _sequence(user, sequence, input)
      except FormatError as e:
        bad.handle(e)
        continue
      users += 1
      for item in items:
        yield Interaction(user=user, item=item, order=order, path=f"{input} inter[{user}]")
        order += 1
      items_seen += len(items)
    notes["users"], notes["interactions"] = users, items_seen

  def items() -> Iterator[Item]:
    if item_text is None:
      return
    extra: set[str] = set()
    for key, record in _entries(item_text, "item", bad):
      try:
        item = _item(key, record, item_text)
      except FormatError as e:
        bad.handle(e)
        continue
      extra.update(k for k, _ in record if k not in TEXT_FIELDS and k != "categories")
      yield item
    notes["item_fields_ignored"] = sorted(extra)

  if item_text is not None:
    _note_join(input, item_text, notes)
  return Source(format="lcrec", interactions=interactions, items=items, bad_lines=bad, notes=notes)


def item_candidates(input) -> list[str]:
  """`X.inter.json[.gz]` -> [`X.item.json`, `X.item.json.gz`]."""
  path = os.fspath(input).removesuffix(".gz").removesuffix(".json").removesuffix(".inter")
  return [path + ".item.json", path + ".item.json.gz"]


class _Pairs(list):
  """A JSON object kept as its (key, value) pairs, so duplicate keys stay visible."""


def _load(path) -> _Pairs:
  text = read_document(path)
  try:
    document = json.loads(text, object_pairs_hook=_Pairs)
  except (ValueError, RecursionError) as e:
    # A document cut short (an interrupted copy) ends in "Expecting ... char N" at its end.
    line = getattr(e, "lineno", None)
    reason = "truncated" if getattr(e, "pos", -1) >= len(text.rstrip()) else "unparsable"
    raise FormatError(path, line, None, f"cannot parse JSON document: {e}", reason=reason) from None
  if not isinstance(document, _Pairs):
    raise FormatError(path, None, None,
                      f"expected a JSON object at the top level, got {type(document).__name__}",
                      reason="wrong_type")
  return document


def _entries(path, name: str, bad: BadLines) -> Iterator[tuple[str, Any]]:
  """Top-level (key, value) pairs in document order; a repeated key is a bad record."""
  seen: set[str] = set()
  for key, value in _load(path):
    if key in seen:
      bad.handle(FormatError(path, None, f"{name}[{key}]", "key repeated in the document; the first is kept",
                             reason="duplicate_user" if name == "inter" else "duplicate_key"))
      continue
    seen.add(key)
    yield key, value


def _is_array(value: Any) -> bool:
  """A JSON array; `_Pairs` (a JSON object) is a list too, so exclude it."""
  return isinstance(value, list) and not isinstance(value, _Pairs)


def _sequence(user: str, sequence: Any, path) -> list[str]:
  if not user.strip():
    raise FormatError(path, None, f"inter[{user}]", "empty user id", reason="empty_id")
  if not _is_array(sequence):
    raise FormatError(path, None, f"inter[{user}]",
                      f"expected a list of item indices, got {type(sequence).__name__}", reason="wrong_type")
  if not sequence:
    raise FormatError(path, None, f"inter[{user}]", "empty sequence", reason="missing_field")
  items = []
  for position, index in enumerate(sequence):
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
      raise FormatError(path, None, f"inter[{user}][{position}]",
                        f"expected a non-negative integer item index, got {index!r:.40}", reason="wrong_type")
    items.append(str(index))
  return items


def _item(key: str, record: Any, path) -> Item:
  if not isinstance(record, _Pairs):
    raise FormatError(path, None, f"item[{key}]", f"expected an object, got {type(record).__name__}",
                      reason="wrong_type")
  fields: dict[str, Any] = {}
  for name, value in record:
    if name in fields:
      raise FormatError(path, None, f"item[{key}].{name}", "field repeated", reason="duplicate_key")
    fields[name] = value
  texts = {}
  for name in TEXT_FIELDS:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
      raise FormatError(path, None, f"item[{key}].{name}", f"expected a string, got {type(value).__name__}",
                        reason="wrong_type")
    texts[name] = clean_text(value)
  categories = fields.get("categories")
  if categories is not None and not (isinstance(categories, str) or _is_array(categories)):
    raise FormatError(path, None, f"item[{key}].categories",
                      f"expected a string or list, got {type(categories).__name__}", reason="wrong_type")
  levels = category_levels(categories, "comma") if categories is not None else ()
  return Item(item=key, categories=tuple(t for t in map(clean_text, levels) if t), **texts,
              path=f"{path} item[{key}]")


def _note_join(input, item_text, notes: dict[str, Any]) -> None:
  """Records how the sequences and the item file cover each other (malformed parts skipped)."""
  try:
    seq_items = {str(i) for _, seq in _load(input) if _is_array(seq)
                 for i in seq if isinstance(i, int) and not isinstance(i, bool)}
    keys = {k for k, _ in _load(item_text)}
  except FormatError:
    return  # the streams raise it with the bad-line policy applied
  without_row = seq_items - keys
  notes["item_rows"] = len(keys)
  notes["item_rows_unreferenced"] = len(keys - seq_items)
  notes["sequence_items_without_item_row"] = len(without_row)
  if without_row:
    notes["sequence_items_without_item_row_examples"] = sorted(without_row, key=_index_key)[:_EXAMPLES]


def _index_key(key: str) -> tuple[int, str]:
  return (int(key), "") if key.isdigit() else (1 << 62, key)
