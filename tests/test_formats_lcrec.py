"""LC-Rec `X.inter.json` / `X.item.json` reader."""

import gzip
import json

import pytest

from recjax.data.formats import lcrec
from recjax.data.formats.common import BadLines, FormatError

INTER = {"0": [0, 1, 2], "1": [2, 0], "2": [1, 3]}
ITEMS = {
    "0": {"title": "VTECH Phone", "description": "", "brand": "VTech",
          "categories": "Office Electronics, Telephones & Accessories, Cordless Telephones"},
    "1": {"title": "AT&amp;T 210  Corded", "description": "A basic\nphone", "brand": "",
          "categories": "Office Products"},
    "2": {"title": "", "description": "", "brand": "", "categories": ""},
    "3": {"title": "Pens", "description": "Blue", "brand": "Bic",
          "categories": "Office Products, Office & School Supplies, Writing & Correction Supplies, Pens"},
    "4": {"title": "Unused", "description": "", "brand": "", "categories": "Office Products"},
}


def write(path, obj, gz=False):
  text = obj if isinstance(obj, str) else json.dumps(obj, indent=4)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


@pytest.mark.parametrize("gz", [False, True])
def test_parse_with_sibling_discovery(tmp_path, gz):
  suffix = ".gz" if gz else ""
  inter = write(tmp_path / f"Toy.inter.json{suffix}", INTER, gz)
  write(tmp_path / f"Toy.item.json{suffix}", ITEMS, gz)
  source = lcrec.read(inter)
  assert source.format == "lcrec"
  assert source.notes["item_text_discovered"] is True
  assert source.notes["item_text"] == str(tmp_path / f"Toy.item.json{suffix}")
  got = list(source.interactions())
  assert [(i.user, i.item, i.order) for i in got] == [
      ("0", "0", 0), ("0", "1", 1), ("0", "2", 2), ("1", "2", 3), ("1", "0", 4), ("2", "1", 5), ("2", "3", 6)]
  assert all(i.timestamp is None and i.rating is None for i in got)
  items = {i.item: i for i in source.items()}
  assert list(items) == ["0", "1", "2", "3", "4"]
  zero, one, two, three, _ = items.values()
  assert (zero.title, zero.description, zero.brand) == ("VTECH Phone", None, "VTech")
  assert zero.categories == ("Office Electronics", "Telephones & Accessories", "Cordless Telephones")
  assert (one.title, one.description, one.brand) == ("AT&T 210 Corded", "A basic phone", None)
  assert one.categories == ("Office Products",)
  assert (two.title, two.description, two.brand, two.categories) == (None, None, None, ())
  assert len(three.categories) == 4 and three.price is None
  notes = source.notes
  assert (notes["item_rows"], notes["item_rows_unreferenced"], notes["sequence_items_without_item_row"]) == (5, 1, 0)
  assert (notes["users"], notes["interactions"]) == (3, 7)


def test_no_sibling_and_explicit_item_text(tmp_path):
  inter = write(tmp_path / "Toy.inter.json", INTER)
  source = lcrec.read(inter)
  assert source.notes["item_text"] is None and "item_text_missing" in source.notes
  assert list(source.items()) == []
  other = write(tmp_path / "meta.json", {"0": ITEMS["0"]})
  source = lcrec.read(inter, item_text=other)
  assert "item_text_discovered" not in source.notes
  assert [i.item for i in source.items()] == ["0"]
  assert source.notes["sequence_items_without_item_row"] == 3
  assert source.notes["sequence_items_without_item_row_examples"] == ["1", "2", "3"]
  with pytest.raises(FileNotFoundError):
    lcrec.read(inter, item_text=tmp_path / "absent.json")
  with pytest.raises(ValueError, match="datamaps"):
    lcrec.read(inter, datamaps=other)


def test_item_candidates():
  assert lcrec.item_candidates("/d/Office.inter.json") == ["/d/Office.item.json", "/d/Office.item.json.gz"]
  assert lcrec.item_candidates("/d/Office.inter.json.gz")[0] == "/d/Office.item.json"


@pytest.mark.parametrize("sequence,field", [
    ("[3, \"4\"]", "inter[u1][1]"),
    ("[3, 4.0]", "inter[u1][1]"),
    ("[3, true]", "inter[u1][1]"),
    ("[-1]", "inter[u1][0]"),
    ("{\"a\": 1}", "inter[u1]"),
    ("7", "inter[u1]"),
    ("[]", "inter[u1]"),
])
def test_bad_sequence_raises_then_skips(tmp_path, sequence, field):
  inter = write(tmp_path / "Bad.inter.json", f'{{"u0": [0, 1], "u1": {sequence}, "u2": [2]}}')
  with pytest.raises(FormatError) as info:
    list(lcrec.read(inter).interactions())
  assert "Bad.inter.json:" in str(info.value) and f"field '{field}'" in str(info.value)
  assert (info.value.line, info.value.field) == (None, field)
  bad = BadLines(skip=True)
  got = list(lcrec.read(inter, bad=bad).interactions())
  assert [(i.user, i.item, i.order) for i in got] == [("u0", "0", 0), ("u0", "1", 1), ("u2", "2", 2)]
  assert bad.count == 1 and field in bad.examples[0]


def test_duplicate_user_key_is_not_collapsed_silently(tmp_path):
  inter = write(tmp_path / "Dup.inter.json", '{"u0": [0, 1], "u0": [2]}')
  with pytest.raises(FormatError, match=r"field 'inter\[u0\]': key repeated"):
    list(lcrec.read(inter).interactions())
  bad = BadLines(skip=True)
  assert [i.item for i in lcrec.read(inter, bad=bad).interactions()] == ["0", "1"]  # first kept
  assert bad.count == 1


@pytest.mark.parametrize("record,field", [
    ('"just a title"', "item[1]"),
    ('{"title": 5}', "item[1].title"),
    ('{"title": "a", "categories": 3}', "item[1].categories"),
    ('{"title": "a", "categories": {"a": "b"}}', "item[1].categories"),
    ('{"title": "a", "title": "b"}', "item[1].title"),
])
def test_bad_item_raises_then_skips(tmp_path, record, field):
  inter = write(tmp_path / "Toy.inter.json", {"u": [0, 1]})
  write(tmp_path / "Toy.item.json", f'{{"0": {{"title": "ok"}}, "1": {record}}}')
  with pytest.raises(FormatError) as info:
    list(lcrec.read(inter).items())
  assert "Toy.item.json:" in str(info.value) and f"field '{field}'" in str(info.value)
  bad = BadLines(skip=True)
  assert [i.title for i in lcrec.read(inter, bad=bad).items()] == ["ok"]
  assert bad.count == 1


def test_broken_documents(tmp_path):
  with pytest.raises(FormatError, match="cannot parse JSON"):
    list(lcrec.read(write(tmp_path / "A.inter.json", '{"u": [1,')).interactions())
  with pytest.raises(FormatError, match="top level"):
    list(lcrec.read(write(tmp_path / "B.inter.json", "[[1, 2]]")).interactions())


def test_real_office(office_dir):
  source = lcrec.read(office_dir / "Office.inter.json")
  assert source.notes["item_text_discovered"] is True
  users, items, count, last_order = set(), set(), 0, -1
  for interaction in source.interactions():
    users.add(interaction.user)
    items.add(interaction.item)
    assert interaction.order > last_order
    last_order = interaction.order
    count += 1
  assert (len(users), len(items), count) == (4_905, 2_420, 53_258)
  meta = {i.item: i for i in source.items()}
  assert meta.keys() == items
  assert all(len(i.categories) >= 1 for i in meta.values())
  assert len({i.categories for i in meta.values()}) == 286
  # The brief expects text for every item; 3 have no title and item 1786 has neither
  # title nor description (only its category path).
  assert sum(i.title is not None for i in meta.values()) == 2_417
  assert [k for k, i in meta.items() if i.title is None and i.description is None] == ["1786"]
  assert sum(i.description is None for i in meta.values()) == 639
  assert sum(i.brand is None for i in meta.values()) == 485
  assert source.notes["sequence_items_without_item_row"] == 0 and source.bad_lines.count == 0
