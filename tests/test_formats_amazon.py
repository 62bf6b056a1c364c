"""Amazon 2014 / 2018 raw readers on small hand-written dumps."""

import gzip
import json

import pytest

from recjax.data.formats import amazon
from recjax.data.formats.common import BadLines, FormatError

# 2014 dumps are Python literals: single quotes, u'' prefixes, \x / \u escapes.
REVIEWS_2014 = [
    "{'reviewerID': 'A1', 'asin': 'B001', 'reviewerName': u'Jos\\xe9', 'helpful': [0, 0], "
    "'reviewText': u'Caf\\xe9 cr\\xe8me \\u2764, it\\'s great', 'overall': 5.0, "
    "'summary': 'Love it', 'unixReviewTime': 1400000000, 'reviewTime': '05 13, 2014'}",
    "{'reviewerID': 'A2', 'asin': 'B002', 'overall': 3.0, 'unixReviewTime': 1300000000}",
    "",  # blank lines are ignored
    '{"reviewerID": "A1", "asin": "B002", "overall": 4, "unixReviewTime": 1500000000, '
    '"reviewText": "", "summary": "JSON line"}',
]
META_2014 = [
    "{'asin': 'B001', 'title': \"L'Or\\xe9al Paris Lipstick\", 'description': 'Red.', "
    "'price': 12.5, 'brand': \"L'Oreal\", 'salesRank': {'Beauty': 10}, "
    "'categories': [['Beauty', 'Makeup', 'Lips'], ['Beauty', 'Gifts']]}",
    "{'asin': 'B002', 'categories': [[]]}",
]
REVIEWS_2018 = [
    {"overall": 4.0, "verified": True, "reviewTime": "09 1, 2016", "reviewerID": "U1",
     "asin": "P1", "style": {"Size:": " 5 oz"}, "reviewText": "Works.", "summary": "Good",
     "unixReviewTime": 1472688000},
    {"overall": 1.0, "reviewerID": "U2", "asin": "P2", "unixReviewTime": 1472774400},
]
META_2018 = [
    {"asin": "P1", "title": "Soap &amp; Scrub", "description": ["First paragraph.", " ", "Second."],
     "brand": "Dove &amp; Co", "price": "$12.99",
     "category": ["Beauty &amp; Personal Care", "Skin Care", "Body"], "main_cat": "All Beauty"},
    {"asin": "P2", "title": "Brush", "description": [], "price": "$5.99 - $9.99", "category": []},
    {"asin": "P3", "title": "Free", "price": "", "category": ["Beauty &amp; Personal Care"]},
    {"asin": "P1", "title": "duplicate row", "category": []},
]


def write(path, lines, compress=True):
  text = "".join(line + "\n" for line in lines)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def jsonl(records):
  return [json.dumps(r) for r in records]


@pytest.mark.parametrize("compress", [True, False])
def test_2014_literal_reviews_and_meta(tmp_path, compress):
  reviews = write(tmp_path / "reviews_Beauty_5.json.gz", REVIEWS_2014, compress)
  meta = write(tmp_path / "meta_Beauty.json.gz", META_2014, compress)
  source = amazon.read_2014(reviews)
  assert source.format == "amazon2014"
  assert source.notes["item_text"] == str(meta) and source.notes["item_text_discovered"]

  inter = list(source.interactions())
  assert [(i.user, i.item, i.rating, i.timestamp) for i in inter] == [
      ("A1", "B001", 5.0, 1400000000), ("A2", "B002", 3.0, 1300000000),
      ("A1", "B002", 4.0, 1500000000)]
  assert inter[0].review == "Caf\xe9 cr\xe8me \u2764, it's great"
  assert inter[0].summary == "Love it"
  assert inter[1].review is None and inter[1].summary is None
  assert inter[2].review is None and inter[2].summary == "JSON line"  # empty text -> None
  assert [i.order for i in inter] == [1, 2, 4]  # file line numbers
  assert isinstance(inter[2].rating, float)

  items = list(source.items())
  assert items[0].item == "B001"
  assert items[0].title == "L'Or\xe9al Paris Lipstick"
  assert items[0].brand == "L'Oreal"
  assert items[0].description == "Red."
  assert items[0].price == 12.5
  assert items[0].categories == ("Beauty", "Makeup", "Lips")  # first path only
  assert (items[1].title, items[1].price, items[1].categories) == (None, None, ())


def test_2018_json_meta(tmp_path):
  reviews = write(tmp_path / "All_Beauty.json", jsonl(REVIEWS_2018), compress=False)
  write(tmp_path / "meta_All_Beauty.json.gz", jsonl(META_2018))
  source = amazon.read_2018(reviews)
  inter = list(source.interactions())
  assert [(i.user, i.item, i.rating, i.timestamp, i.review) for i in inter] == [
      ("U1", "P1", 4.0, 1472688000, "Works."), ("U2", "P2", 1.0, 1472774400, None)]

  items = {i.item: i for i in source.items()}
  assert list(items) == ["P1", "P2", "P3"]
  p1 = items["P1"]
  assert p1.title == "Soap & Scrub" and p1.brand == "Dove & Co"
  assert p1.description == "First paragraph. Second."
  assert p1.price == 12.99
  assert p1.categories == ("Beauty & Personal Care", "Skin Care", "Body")
  assert items["P2"].price == 5.99 and items["P2"].description is None
  assert items["P3"].price is None
  assert source.notes["duplicate_meta_rows"] == 1


def test_meta_discovery_variants(tmp_path):
  assert amazon.meta_candidates(tmp_path / "reviews_Toys_and_Games_5.json.gz")[0] == str(
      tmp_path / "meta_Toys_and_Games.json.gz")
  assert amazon.meta_candidates("Toys_and_Games.json")[0] == "meta_Toys_and_Games.json.gz"
  # Only a decompressed meta file present: the second candidate is found.
  reviews = write(tmp_path / "reviews_Toys.json.gz", REVIEWS_2014[:1])
  meta = write(tmp_path / "meta_Toys.json", META_2014[:1], compress=False)
  assert amazon.read_2014(reviews).notes["item_text"] == str(meta)


def test_explicit_or_missing_meta(tmp_path):
  reviews = write(tmp_path / "reviews_Beauty.json.gz", REVIEWS_2014)
  source = amazon.read_2014(reviews)
  assert source.notes["item_text"] is None and "meta_Beauty.json.gz" in source.notes["item_text_missing"]
  assert list(source.items()) == []
  other = write(tmp_path / "elsewhere.json.gz", META_2014)
  assert len(list(amazon.read_2014(reviews, item_text=other).items())) == 2
  with pytest.raises(FileNotFoundError):
    amazon.read_2014(reviews, item_text=tmp_path / "nope.json.gz")
  with pytest.raises(ValueError, match="datamaps"):
    amazon.read_2018(reviews, datamaps=tmp_path / "datamaps.json")


BAD_2018 = [
    json.dumps(REVIEWS_2018[0]),
    json.dumps({"reviewerID": "U3", "asin": "P1", "unixReviewTime": 1}),  # no overall
    json.dumps({"reviewerID": "U3", "asin": "P1", "overall": "five", "unixReviewTime": 1}),
    json.dumps({"reviewerID": "U3", "asin": "P1", "overall": 2.0, "unixReviewTime": "1"}),
    "{'reviewerID': 'U4'}",  # a literal in a strict-JSON file
    json.dumps(REVIEWS_2018[1]),
]


@pytest.mark.parametrize("line, field", [(2, "overall"), (3, "overall"), (4, "unixReviewTime")])
def test_bad_review_raises_with_location(tmp_path, line, field):
  reviews = write(tmp_path / "Bad.json.gz", [BAD_2018[0], BAD_2018[line - 1]])
  with pytest.raises(FormatError) as e:
    list(amazon.read_2018(reviews).interactions())
  assert "Bad.json.gz:2" in str(e.value) and field in str(e.value)
  assert (e.value.line, e.value.field) == (2, field)


def test_bad_lines_skipped_and_counted(tmp_path):
  reviews = write(tmp_path / "Bad.json.gz", BAD_2018)
  write(tmp_path / "meta_Bad.json.gz", jsonl([{"title": "no asin"}, META_2018[0]]))
  bad = BadLines(skip=True)
  source = amazon.read_2018(reviews, bad=bad)
  assert [i.user for i in source.interactions()] == ["U1", "U2"]
  assert [i.item for i in source.items()] == ["P1"]
  assert bad.count == 5 and source.bad_lines is bad
  assert any("Bad.json.gz:5" in x for x in bad.examples)
  assert any("meta_Bad.json.gz:1: field 'asin'" in x for x in bad.examples)
