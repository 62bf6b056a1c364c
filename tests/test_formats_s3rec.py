"""S3-Rec / P5 sequence-text reader, with datamaps and a RecBole `.item` join."""

import gzip
import json

import pytest

from recjax.data.formats import s3rec
from recjax.data.formats.common import BadLines, FormatError

SEQUENCES = "1 1 2 3\n2 2 3\n\n3 3 1 2 4\n"
DATAMAPS = {
    "user2id": {"UA": "1", "UB": "2", "UC": "3"},
    "item2id": {"ASIN1": "1", "ASIN2": "2", "ASIN3": "3", "ASIN4": "4", "ASIN5": "5"},
    "id2user": {"1": "UA", "2": "UB", "3": "UC"},
    "id2item": {"1": "ASIN1", "2": "ASIN2", "3": "ASIN3", "4": "ASIN4", "5": "ASIN5"},
}
ITEM_HEADER = "item_id:token\ttitle:token\tcategories:token_seq\tprice:float\tbrand:token\n"


def write(path, text, gz=False):
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def write_datamaps(tmp_path, maps=None):
  return write(tmp_path / "datamaps.json", json.dumps(DATAMAPS if maps is None else maps))


@pytest.mark.parametrize("gz", [False, True])
def test_sequences_without_datamaps(tmp_path, gz):
  source = s3rec.read(write(tmp_path / "Toy.txt", SEQUENCES, gz))
  got = list(source.interactions())
  assert [(i.user, i.item, i.order) for i in got] == [
      ("1", "1", 0), ("1", "2", 1), ("1", "3", 2), ("2", "2", 3), ("2", "3", 4),
      ("3", "3", 5), ("3", "1", 6), ("3", "2", 7), ("3", "4", 8)]
  assert all(i.timestamp is None and i.rating is None for i in got)
  assert sorted(got, key=lambda i: (i.user, i.order)) == got
  assert list(source.items()) == [] and source.notes["item_text"] is None
  assert source.notes["sequence_lines"] == 3 and source.notes["sequence_items"] == 4
  assert list(source.interactions()) == got


@pytest.mark.parametrize("maps", [DATAMAPS, {"user2id": DATAMAPS["user2id"], "item2id": DATAMAPS["item2id"]}],
                         ids=["id2x", "inverted_x2id"])
def test_datamaps_give_original_ids(tmp_path, maps):
  source = s3rec.read(write(tmp_path / "Toy.txt", SEQUENCES), datamaps=write_datamaps(tmp_path, maps))
  got = list(source.interactions())
  assert [(i.user, i.item) for i in got[:4]] == [("UA", "ASIN1"), ("UA", "ASIN2"), ("UA", "ASIN3"), ("UB", "ASIN2")]
  assert {i.user for i in got} == {"UA", "UB", "UC"}
  assert source.notes["datamaps_items_not_in_sequences"] == 1  # ASIN5


def test_item_text_joined_through_datamaps(tmp_path):
  item = write(tmp_path / "Toy.item", ITEM_HEADER +
               "ASIN1\tLipstick\t'Beauty', 'Makeup', 'Lips'\t9.5\tAcme\n"
               "ASIN2\t\t'Beauty'\t\t\n"
               "ASIN3\tShampoo &amp; Co\t\"'Beauty', \"\"Men's\"\"\"\t\tB\n"
               "ASIN9\tUnused\t'Beauty'\t\t\n")
  source = s3rec.read(write(tmp_path / "Toy.txt", SEQUENCES), item_text=item, datamaps=write_datamaps(tmp_path))
  items = {i.item: i for i in source.items()}
  assert list(items) == ["ASIN1", "ASIN2", "ASIN3", "ASIN9"]  # unreferenced rows are not dropped
  assert (items["ASIN1"].title, items["ASIN1"].price, items["ASIN1"].brand) == ("Lipstick", 9.5, "Acme")
  assert items["ASIN1"].categories == ("Beauty", "Makeup", "Lips")
  assert (items["ASIN2"].title, items["ASIN2"].price, items["ASIN2"].brand) == (None, None, None)
  assert (items["ASIN3"].title, items["ASIN3"].categories) == ("Shampoo & Co", ("Beauty", "Men's"))
  notes = source.notes
  assert (notes["item_rows"], notes["item_rows_unreferenced"]) == (4, 1)
  assert notes["sequence_items_without_item_row"] == 1
  assert notes["sequence_items_without_item_row_examples"] == ["ASIN4"]


def test_item_text_keyed_by_txt_ids_without_datamaps(tmp_path):
  item = write(tmp_path / "Toy.item", ITEM_HEADER + "1\tOne\t'A'\t\t\n2\tTwo\t'A', 'B'\t\t\n"
               "3\tThree\t'A'\t\t\n4\tFour\t'A'\t\t\n")
  source = s3rec.read(write(tmp_path / "Toy.txt", SEQUENCES), item_text=item)
  assert [(i.item, i.title) for i in source.items()] == [("1", "One"), ("2", "Two"), ("3", "Three"), ("4", "Four")]
  assert source.notes["sequence_items_without_item_row"] == 0 and source.notes["item_rows_unreferenced"] == 0


def test_item_text_in_the_wrong_id_space_raises(tmp_path):
  item = write(tmp_path / "Toy.item", ITEM_HEADER + "ASIN1\tOne\t'A'\t\t\n")
  with pytest.raises(ValueError, match="no item_id in .* matches"):
    s3rec.read(write(tmp_path / "Toy.txt", SEQUENCES), item_text=item)  # ASINs, but no datamaps


@pytest.mark.parametrize("line,field", [
    ("2 2 x3\n", "item_id"),
    ("2 2 3.0\n", "item_id"),
    ("2\n", "item_id"),
    ("u2 2 3\n", "user_id"),
])
def test_bad_line_raises_then_skips(tmp_path, line, field):
  path = write(tmp_path / "Bad.txt", "1 1 2\n" + line + "3 3 1\n")
  with pytest.raises(FormatError) as info:
    list(s3rec.read(path).interactions())
  assert "Bad.txt:2:" in str(info.value) and f"field '{field}'" in str(info.value)
  assert (info.value.line, info.value.field) == (2, field)
  bad = BadLines(skip=True)
  got = list(s3rec.read(path, bad=bad).interactions())
  assert [(i.user, i.item, i.order) for i in got] == [("1", "1", 0), ("1", "2", 1), ("3", "3", 2), ("3", "1", 3)]
  assert bad.count == 1 and "Bad.txt:2:" in bad.examples[0]


def test_id_missing_from_datamaps(tmp_path):
  path = write(tmp_path / "Toy.txt", "1 1 2\n2 2 7\n3 3\n")
  datamaps = write_datamaps(tmp_path)
  with pytest.raises(FormatError, match=r"Toy\.txt:2: field 'id2item': id 7 has no entry"):
    list(s3rec.read(path, datamaps=datamaps).interactions())
  bad = BadLines(skip=True)
  assert [i.item for i in s3rec.read(path, datamaps=datamaps, bad=bad).interactions()] == ["ASIN1", "ASIN2", "ASIN3"]
  assert bad.count == 1
  maps = dict(DATAMAPS, id2user={"1": "UA"})
  with pytest.raises(FormatError, match=r"Toy\.txt:2: field 'id2user'"):
    list(s3rec.read(path, datamaps=write_datamaps(tmp_path, maps)).interactions())


def test_bad_datamaps(tmp_path):
  path = write(tmp_path / "Toy.txt", SEQUENCES)
  with pytest.raises(FormatError, match="not one-to-one"):
    s3rec.read(path, datamaps=write_datamaps(tmp_path, dict(DATAMAPS, id2item={"1": "A", "2": "A"})))
  with pytest.raises(FormatError, match="field 'id2item': missing"):
    s3rec.read(path, datamaps=write_datamaps(tmp_path, {"id2user": {}}))
  with pytest.raises(FormatError, match="cannot parse"):
    s3rec.read(path, datamaps=write(tmp_path / "broken.json", "{"))
  with pytest.raises(FileNotFoundError):
    s3rec.read(path, datamaps=tmp_path / "absent.json")


def test_duplicate_user_lines_are_refused_or_counted(tmp_path):
  # A second line for a user would merge two histories: an error, or a counted skip.
  path = write(tmp_path / "Toy.txt", "1 1 2\n1 3\n")
  source = s3rec.read(path)
  assert source.notes["duplicate_user_lines"] == 1
  with pytest.raises(FormatError, match=r"Toy.txt:2: field 'user_id': user 1 already has a line \(line 1\)"):
    list(source.interactions())
  bad = BadLines(skip=True)
  assert [(i.item, i.order) for i in s3rec.read(path, bad=bad).interactions()] == [("1", 0), ("2", 1)]
  assert bad.summary()["by_reason"] == {"duplicate_user": 1}


def test_real_beauty(beauty_dir):
  source = s3rec.read(beauty_dir / "Beauty.txt", item_text=beauty_dir / "Amazon_Beauty.item",
                      datamaps=beauty_dir / "datamaps.json")
  users, items, count, last_order = set(), set(), 0, -1
  for interaction in source.interactions():
    users.add(interaction.user)
    items.add(interaction.item)
    assert interaction.order > last_order
    last_order = interaction.order
    count += 1
  assert (len(users), len(items), count) == (22_363, 12_101, 198_502)
  assert all(u.startswith("A") for u in users)  # reviewer ids, not txt ids
  meta = {i.item: i for i in source.items()}
  assert meta.keys() == items
  # The brief expects a title for every item, but 7 rows of Amazon_Beauty.item are untitled.
  assert sum(i.title is not None for i in meta.values()) == 12_094
  assert all(len(i.categories) >= 2 and i.categories[0] == "Beauty" for i in meta.values())
  notes = source.notes
  assert (notes["item_rows"], notes["item_rows_unreferenced"], notes["sequence_items_without_item_row"]) == (12_101, 0, 0)
  assert notes["duplicate_user_lines"] == 0 and source.bad_lines.count == 0
