"""RecBole atomic `.inter` / `.item` reader."""

import gzip

import pytest

from recjax.data.formats import recbole
from recjax.data.formats.common import BadLines, FormatError

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\treview:token_seq\n"
ITEM_HEADER = ("item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\t"
               "categories:token_seq\tprice:float\tbrand:token\n")
# Quoting as in the real Amazon_Beauty.item: a category list holding a double quote is
# itself quoted with doubled quotes; one title spans two physical lines.
ITEM_ROWS = (
    "A1\tWAWO Palette &amp; Brush\tBeauty\t10486.0\t'Beauty', 'Makeup', 'Face'\t5.04\tCOKA\n"
    "A2\tPrada Candy\tBeauty\t78916.0\t\"'Beauty', 'Fragrance', \"\"Women's\"\", 'Eau de Parfum'\"\t65.86\tPrada\n"
    "A3\t\"TheraNeem Cream 2 oz \nVanilla\"\t\t\t'Beauty', 'Skin Care'\t\t\n"
    "A4\t\tBeauty\t15944.0\t'Beauty'\t\t\n"
)


def write(path, text, gz=False):
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


@pytest.mark.parametrize("gz", [False, True])
def test_inter_fields(tmp_path, gz):
  inter = write(tmp_path / "toy.inter", INTER_HEADER +
                "u1\ti1\t5.0\t1365811200.0\tgreat  stuff\n"
                "u1\ti2\t\t1365811300\t\n"
                "u2\ti1\t3\t\tok\n", gz)
  source = recbole.read(inter)
  got = list(source.interactions())
  assert [(i.user, i.item, i.order) for i in got] == [("u1", "i1", 0), ("u1", "i2", 1), ("u2", "i1", 2)]
  assert [i.rating for i in got] == [5.0, None, 3.0]
  assert [i.timestamp for i in got] == [1365811200, 1365811300, None]
  assert [i.review for i in got] == ["great stuff", None, "ok"]
  assert source.format == "recbole" and source.notes["item_text"] is None
  assert list(source.items()) == []
  assert list(source.interactions()) == got  # streams are re-iterable


@pytest.mark.parametrize("gz", [False, True])
def test_item_fields(tmp_path, gz):
  path = write(tmp_path / "toy.item", ITEM_HEADER + ITEM_ROWS, gz)
  notes = {}
  items = {i.item: i for i in recbole.read_items(path, BadLines(), notes)}
  assert list(items) == ["A1", "A2", "A3", "A4"]
  a1, a2, a3, a4 = items.values()
  assert a1.title == "WAWO Palette & Brush"  # HTML unescaped
  assert a1.categories == ("Beauty", "Makeup", "Face")
  assert (a1.price, a1.brand, a1.description) == (5.04, "COKA", None)
  assert a2.categories == ("Beauty", "Fragrance", "Women's", "Eau de Parfum")
  assert a3.title == "TheraNeem Cream 2 oz Vanilla"  # embedded newline collapsed
  assert (a3.price, a3.brand, a3.categories) == (None, None, ("Beauty", "Skin Care"))
  assert (a4.title, a4.categories) == (None, ("Beauty",))
  assert notes["ignored_columns"]["toy.item"] == ["sales_type", "sales_rank"]
  assert notes["duplicate_item_rows"] == 0


def test_item_aliases_and_description(tmp_path):
  path = write(tmp_path / "ml.item", "item_id:token\tmovie_title:token_seq\tdescription:token_seq\t"
               "category:token_seq\n7\tToy Story (1995)\tA  cowboy doll\tAnimation, Comedy\n")
  (item,) = recbole.read_items(path, BadLines())
  assert (item.item, item.title, item.description) == ("7", "Toy Story (1995)", "A cowboy doll")
  assert item.categories == ("Animation", "Comedy")


@pytest.mark.parametrize("gz", [False, True])
def test_sibling_item_discovery(tmp_path, gz):
  suffix = ".gz" if gz else ""
  inter = write(tmp_path / f"toy.inter{suffix}", INTER_HEADER + "u1\tA1\t5\t1\t\n", gz)
  write(tmp_path / f"toy.item{suffix}", ITEM_HEADER + ITEM_ROWS, gz)
  source = recbole.read(inter)
  assert source.notes["item_text_discovered"] is True
  assert source.notes["item_text"] == str(tmp_path / f"toy.item{suffix}")
  assert [i.item for i in source.items()] == ["A1", "A2", "A3", "A4"]


def test_explicit_item_text_and_errors(tmp_path):
  inter = write(tmp_path / "toy.inter", INTER_HEADER + "u1\tA1\t5\t1\t\n")
  other = write(tmp_path / "meta.item", ITEM_HEADER + ITEM_ROWS)
  source = recbole.read(inter, item_text=other)
  assert source.notes["item_text"] == str(other) and "item_text_discovered" not in source.notes
  assert len(list(source.items())) == 4
  with pytest.raises(FileNotFoundError):
    recbole.read(inter, item_text=tmp_path / "absent.item")
  with pytest.raises(ValueError, match="datamaps"):
    recbole.read(inter, datamaps=tmp_path / "datamaps.json")


def test_duplicate_item_rows_keep_first(tmp_path):
  path = write(tmp_path / "dup.item", ITEM_HEADER + ITEM_ROWS + "A1\tOther\t\t\t'X'\t\t\n")
  notes = {}
  items = list(recbole.read_items(path, BadLines(), notes))
  assert [i.item for i in items] == ["A1", "A2", "A3", "A4"]
  assert items[0].title == "WAWO Palette & Brush"
  assert notes["duplicate_item_rows"] == 1


@pytest.mark.parametrize("name,row,line,field", [
    ("rating", "u2\ti2\tfive\t1\t\n", 3, "rating"),
    ("timestamp", "u2\ti2\t4\t2013-01-01\t\n", 3, "timestamp"),
    ("empty_user", "\ti2\t4\t1\t\n", 3, "user_id"),
])
def test_inter_bad_field_raises_then_skips(tmp_path, name, row, line, field):
  inter = write(tmp_path / f"{name}.inter", INTER_HEADER + "u1\ti1\t5\t1\t\n" + row + "u3\ti3\t1\t2\t\n")
  with pytest.raises(FormatError) as info:
    list(recbole.read(inter).interactions())
  message = str(info.value)
  assert f"{name}.inter:{line}:" in message and f"'{field}'" in message
  assert (info.value.line, info.value.field) == (line, field)
  bad = BadLines(skip=True)
  got = list(recbole.read(inter, bad=bad).interactions())
  assert [(i.user, i.order) for i in got] == [("u1", 0), ("u3", 1)]
  assert bad.count == 1 and f"{name}.inter:{line}" in bad.examples[0]


def test_wrong_column_count(tmp_path):
  inter = write(tmp_path / "cols.inter", INTER_HEADER + "u1\ti1\t5\t1\t\n" + "u2\ti2\t5\n")
  with pytest.raises(FormatError, match=r"cols\.inter:3: expected 5 tab-separated columns, got 3"):
    list(recbole.read(inter).interactions())
  bad = BadLines(skip=True)
  assert len(list(recbole.read(inter, bad=bad).interactions())) == 1 and bad.count == 1


def test_unbalanced_quote_swallows_rows_and_names_the_span(tmp_path):
  path = write(tmp_path / "q.item", ITEM_HEADER + "B1\t\"Broken title\t\t\t'X'\t\t\nB2\tok\t\t\t'Y'\t\t\n")
  with pytest.raises(FormatError, match=r"q\.item:2: .*lines 2-3"):
    list(recbole.read_items(path, BadLines()))


def test_item_bad_fields(tmp_path):
  path = write(tmp_path / "bad.item", ITEM_HEADER +
               "B1\tt\t\tnot-a-rank\t'X'\t\t\n"  # unused float column is still checked
               "B2\tt\t\t\t'Beauty', 'Makeup\t\t\n"  # broken quoted list
               "B3\tt\t\t\t'Beauty'\t$5\t\n"
               "B4\tt\t\t\t'Beauty'\t4.5\t\n")
  with pytest.raises(FormatError) as info:
    list(recbole.read_items(path, BadLines()))
  assert "bad.item:2:" in str(info.value) and "'sales_rank'" in str(info.value)
  bad = BadLines(skip=True)
  assert [i.item for i in recbole.read_items(path, bad)] == ["B4"]
  assert bad.count == 3
  assert ["'sales_rank'" in bad.examples[0], "'categories'" in bad.examples[1],
          "'price'" in bad.examples[2]] == [True] * 3
  assert "bad.item:3:" in bad.examples[1]


@pytest.mark.parametrize("header,field", [
    ("user_id:token\trating:float\n", "item_id"),
    ("item_id:token\trating:float\n", "user_id"),
    ("user_id:token\titem_id:token\trating:number\n", "rating"),
    ("user_id\titem_id:token\n", "user_id"),
    ("user_id:token\titem_id:token\tuser_id:token\n", "user_id"),
])
def test_bad_header_fails_at_read_time_on_line_1(tmp_path, header, field):
  inter = write(tmp_path / "h.inter", header + "u1\ti1\t1\n")
  with pytest.raises(FormatError) as info:
    recbole.read(inter, bad=BadLines(skip=True))  # a bad header is never skippable
  assert "h.inter:1:" in str(info.value) and f"'{field}'" in str(info.value)


def test_missing_item_id_column_in_item_file(tmp_path):
  inter = write(tmp_path / "toy.inter", INTER_HEADER)
  write(tmp_path / "toy.item", "title:token\nT\n")
  with pytest.raises(FormatError, match=r"toy\.item:1: field 'item_id'"):
    recbole.read(inter)


def test_empty_file_is_an_error(tmp_path):
  with pytest.raises(FormatError, match="no header"):
    recbole.read(write(tmp_path / "e.inter", ""))


def test_item_candidates():
  assert recbole.item_candidates("/d/Amazon_Beauty.inter") == ["/d/Amazon_Beauty.item", "/d/Amazon_Beauty.item.gz"]
  assert recbole.item_candidates("/d/x.inter.gz")[0] == "/d/x.item"


def test_real_beauty_item_file(beauty_dir):
  bad = BadLines()
  notes = {}
  items = list(recbole.read_items(beauty_dir / "Amazon_Beauty.item", bad, notes))
  # 12,103 physical lines = header + 12,101 rows, one of whose titles spans two lines.
  assert len(items) == len({i.item for i in items}) == 12_101
  assert notes["duplicate_item_rows"] == 0 and bad.count == 0
  assert sum(i.title is not None for i in items) == 12_094  # 7 rows have an empty title
  assert all(len(i.categories) >= 2 and i.categories[0] == "Beauty" for i in items)
  by_id = {i.item: i for i in items}
  assert by_id["B0001ZYL3Q"].title == "TheraNeem Cream - Original Organix South 2 oz Cream Vanilla"
  assert by_id["9788072216"].categories == ("Beauty", "Fragrance", "Women's", "Eau de Parfum")
  assert not any("&amp;" in (i.title or "") for i in items)
