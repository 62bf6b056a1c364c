"""S3-Rec / P5 sequence text: `Beauty.txt`, one user per line, `user_id item_id item_id ...`.

Items are in chronological order but carry no timestamps, so `timestamp` is None and
`order` is a counter running through the whole file: sorting by (user, order) restores
the file order. Ids are non-negative integers written as text (S3-Rec starts at 1).

With `datamaps` (P5's `datamaps.json`), txt ids are translated to the original ids:
`id2item` gives the ASIN and `id2user` the reviewer id (`item2id`/`user2id` are inverted
when only those are present). `item_text` is a RecBole atomic `.item` file keyed by the
ids the interactions carry: ASINs with datamaps, txt ids without. The join is checked at
read() time and its coverage recorded in `notes`; a join that matches nothing raises.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from recjax.data.formats import recbole
from recjax.data.formats.common import (MAX_ID_CHARS, BadLines, FormatError, Interaction, Item,
                                        Source, iter_lines, read_document)

_EXAMPLES = 5  # ids listed in notes next to a count


def read(input, *, item_text=None, datamaps=None, bad: BadLines | None = None) -> Source:
  """Reads an S3-Rec sequence file, optionally with P5 datamaps and a RecBole `.item` file."""
  if not os.path.isfile(input):
    raise FileNotFoundError(f"s3rec sequence file not found: {input}")
  bad = bad or BadLines()
  notes: dict[str, Any] = {"timestamps": "none in this format; order is the position in the file"}
  id2item = id2user = None
  if datamaps is not None:
    if not os.path.isfile(datamaps):
      raise FileNotFoundError(f"s3rec datamaps file not found: {datamaps}")
    maps = _load_datamaps(datamaps)
    id2item = _id_map(maps, "id2item", "item2id", datamaps)
    id2user = _id_map(maps, "id2user", "user2id", datamaps)
    notes["datamaps"] = os.fspath(datamaps)
    notes["ids"] = "original ids via datamaps id2user / id2item"
  else:
    notes["datamaps"] = None
    notes["ids"] = "S3-Rec txt ids (no datamaps given)"
  if item_text is not None:
    if not os.path.isfile(item_text):
      raise FileNotFoundError(f"s3rec item text (.item) file not found: {item_text}")
    recbole.check_header(item_text, recbole.ITEM_COLUMNS, ("item_id",))
    notes["item_text"] = os.fspath(item_text)
  else:
    notes["item_text"] = None
  _note_join(input, item_text, id2item, datamaps, notes)

  def interactions() -> Iterator[Interaction]:
    order = 0
    first_line: dict[str, int] = {}
    for lineno, line in iter_lines(input, bad):
      if not line.strip():
        continue
      try:
        user, items = _parse(line, input, lineno)
        # One line per user: a second line would silently merge two histories.
        if user in first_line:
          raise FormatError(input, lineno, "user_id", f"user {user} already has a line "
                            f"(line {first_line[user]})", reason="duplicate_user")
        first_line[user] = lineno
        if id2user is not None:
          user = _lookup(id2user, user, "id2user", input, lineno, datamaps)
        if id2item is not None:
          items = [_lookup(id2item, i, "id2item", input, lineno, datamaps) for i in items]
      except FormatError as e:
        bad.handle(e)
        continue
      for item in items:
        yield Interaction(user=user, item=item, order=order, path=str(input), line=lineno)
        order += 1

  def items() -> Iterator[Item]:
    if item_text is not None:
      yield from recbole.read_items(item_text, bad, notes)

  return Source(format="s3rec", interactions=interactions, items=items, bad_lines=bad, notes=notes)


def _parse(line: str, path, lineno: int) -> tuple[str, list[str]]:
  tokens = line.split()
  if not _is_id(tokens[0]):
    raise FormatError(path, lineno, "user_id", f"expected a non-negative integer, got {tokens[0]!r:.40}",
                      reason="wrong_type")
  if len(tokens) < 2:
    raise FormatError(path, lineno, "item_id", f"user {tokens[0]} has no items", reason="missing_field")
  for position, token in enumerate(tokens[1:], 1):
    if not _is_id(token):
      raise FormatError(path, lineno, "item_id",
                        f"item {position} of user {tokens[0]}: expected a non-negative integer, "
                        f"got {token!r:.40}", reason="wrong_type")
  _check_lengths(tokens, path, lineno)  # the whole line, not one interaction of it
  return tokens[0], tokens[1:]


def _is_id(token: str) -> bool:
  return token.isascii() and token.isdigit()


def _check_lengths(tokens: list[str], path, lineno: int) -> None:
  for token in tokens:
    if len(token) > MAX_ID_CHARS:
      raise FormatError(path, lineno, "item_id", f"id of {len(token)} digits (limit {MAX_ID_CHARS})",
                        reason="oversized")


def _lookup(mapping: dict[str, str], key: str, field: str, path, lineno: int, datamaps) -> str:
  try:
    return mapping[key]
  except KeyError:
    raise FormatError(path, lineno, field, f"id {key} has no entry in {datamaps}", reason="unknown_id") from None


def _load_datamaps(path) -> dict:
  try:
    maps = json.loads(read_document(path))
  except FormatError:
    raise
  except ValueError as e:
    raise FormatError(path, getattr(e, "lineno", None), None, f"cannot parse datamaps JSON: {e}",
                      reason="unparsable") from None
  if not isinstance(maps, dict):
    raise FormatError(path, None, None, f"expected a JSON object, got {type(maps).__name__}")
  return maps


def _id_map(maps: dict, forward: str, inverse: str, path) -> dict[str, str]:
  """maps[forward] (txt id -> original id), else maps[inverse] inverted; must be one-to-one."""
  if isinstance(maps.get(forward), dict):
    pairs = [(str(k), str(v)) for k, v in maps[forward].items()]
    field = forward
  elif isinstance(maps.get(inverse), dict):
    pairs = [(str(v), str(k)) for k, v in maps[inverse].items()]
    field = inverse
  else:
    raise FormatError(path, None, forward, f"missing (and no {inverse!r} to invert); keys: {sorted(maps)}")
  mapping: dict[str, str] = {}
  originals: dict[str, str] = {}
  for txt_id, original in pairs:
    # Two txt ids for one original id would silently merge two items (or users).
    if original in originals or txt_id in mapping:
      raise FormatError(path, None, field, f"not one-to-one: {txt_id} -> {original} clashes with "
                        f"{originals.get(original, txt_id)} -> {mapping.get(txt_id, original)}")
    mapping[txt_id] = original
    originals[original] = txt_id
  return mapping


def _note_join(input, item_text, id2item, datamaps, notes: dict[str, Any]) -> None:
  """Records sequence/datamaps/.item coverage; malformed lines are left to the streams."""
  users: set[str] = set()
  duplicate_users = lines = 0
  seq_items: set[str] = set()
  for lineno, line in iter_lines(input, BadLines(skip=True, keep=0)):
    if not line.strip():
      continue
    try:
      user, items = _parse(line, input, lineno)
    except FormatError:
      continue
    lines += 1
    duplicate_users += user in users
    users.add(user)
    seq_items.update(items)
  notes["sequence_lines"] = lines
  notes["duplicate_user_lines"] = duplicate_users
  notes["sequence_items"] = len(seq_items)
  if id2item is not None:
    notes["datamaps_items_not_in_sequences"] = len(id2item.keys() - seq_items)
    seq_items = {id2item[i] for i in seq_items if i in id2item}
  if item_text is None:
    return
  rows = recbole.item_ids(item_text)
  unreferenced = rows - seq_items
  without_row = seq_items - rows
  notes["item_rows"] = len(rows)
  notes["item_rows_unreferenced"] = len(unreferenced)
  notes["sequence_items_without_item_row"] = len(without_row)
  if without_row:
    notes["sequence_items_without_item_row_examples"] = sorted(without_row)[:_EXAMPLES]
  if rows and seq_items and not rows & seq_items:
    space = "ASINs from datamaps id2item" if datamaps is not None else "S3-Rec txt ids (no datamaps given)"
    raise ValueError(f"no item_id in {item_text} matches a sequence item; the sequences use {space}, "
                     f"e.g. {sorted(seq_items)[:3]}, the .item file has e.g. {sorted(rows)[:3]}")
