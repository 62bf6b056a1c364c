"""REGEN JSONL reader on small hand-written users."""

import gzip
import json

import pytest

from recjax.data.formats import regen
from recjax.data.formats.common import NARRATIVE_FIELDS, BadLines, FormatError


def entry(asin, rating, t, category="Office Products - Office & School Supplies - Pens", **extra):
  return {"item": {"asin": asin, "title": f"Title {asin}", "category": category,
                   "description": f"About {asin}", "price": "$9.99"},
          "review": {"summary": f"Sum {asin}", "rating": rating, "text": f"Text {asin}",
                     "unix_time": t},
          **extra}


USER_A = {
    "reviewer_id": "RA",
    "purchase_history": [
        entry("X1", 5.0, 100, critique="<no_critique>"),
        entry("X2", 4, 200, critique="Wanted a finer tip than X1.", endorsement="Great pens.",
              preferences=["likes fine tips", "  "]),
        entry("X3", "3", 300, critique="N/A", endorsement="", helpful_votes=2),
    ],
    "last_purchase": {"reason": "Needed refills.", "explanation": "Matches past pens."},
    "user": {"profile": "An office worker.", "brief_summary": "Buys pens.",
             "long_summary": "Buys pens, mostly fine tips."},
    "metadata": {"example": {"richness": 3, "confidence": 4}},
}
USER_B = {
    "reviewer_id": "RB",
    "purchase_history": [
        entry("X2", 2.0, 150),  # same metadata as in RA
        {"item": {"asin": "X1", "title": "Other title", "price": 3}, "review": {"rating": 1}},
    ],
    "last_purchase": {"reason": "", "explanation": None},
    "user": {"profile": "Student."},
    "split": "train",
}


def write(path, records, compress=False):
  text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


@pytest.mark.parametrize("compress", [False, True])
def test_interactions_items_users(tmp_path, compress):
  path = write(tmp_path / "office.jsonl", [USER_A, USER_B], compress)
  source = regen.read(path)
  assert source.format == "regen"

  inter = list(source.interactions())
  assert [(i.user, i.item, i.rating, i.timestamp) for i in inter] == [
      ("RA", "X1", 5.0, 100), ("RA", "X2", 4.0, 200), ("RA", "X3", 3.0, 300),
      ("RB", "X2", 2.0, 150), ("RB", "X1", 1.0, None)]
  assert [i.order for i in inter] == [0, 1, 2, 3, 4]
  assert (inter[0].review, inter[0].summary) == ("Text X1", "Sum X1")
  # Placeholders and empty strings mean "no critique / endorsement".
  assert [i.critique for i in inter] == [None, "Wanted a finer tip than X1.", None, None, None]
  assert [i.endorsement for i in inter] == [None, "Great pens.", None, None, None]
  assert inter[1].preferences == ("likes fine tips",)
  assert inter[0].preferences is None
  assert source.notes["optional_fields"] == {
      "user": {"split": 1},
      "entry": {"critique": 3, "endorsement": 2, "helpful_votes": 1, "preferences": 1}}
  assert source.notes["critique_placeholders"] == 2

  items = list(source.items())
  assert [i.item for i in items] == ["X1", "X2", "X3"]  # first occurrence wins
  assert items[0].title == "Title X1" and items[0].price == 9.99
  assert items[0].categories == ("Office Products", "Office & School Supplies", "Pens")
  assert items[0].description == "About X1" and items[0].brand is None
  assert source.notes["items_with_conflicting_metadata"] == 1  # X1 differs in RB

  users = {u.user: u.narratives for u in source.users()}
  assert users["RA"] == {"purchase_reason": "Needed refills.", "explanation": "Matches past pens.",
                         "brief_summary": "Buys pens.", "long_summary": "Buys pens, mostly fine tips.",
                         "profile": "An office worker."}
  assert users["RB"] == {"profile": "Student."}
  assert set(users["RA"]) <= set(NARRATIVE_FIELDS)


def test_nested_unknown_keys_and_numeric_price(tmp_path):
  e = entry("Y1", 4, 10)
  e["item"]["price"] = 12
  e["item"]["brand"] = "Acme"
  e["review"]["helpful"] = [1, 2]
  path = write(tmp_path / "clothing.jsonl", [{"reviewer_id": "R", "purchase_history": [e]}])
  source = regen.read(path)
  assert len(list(source.interactions())) == 1
  assert source.notes["optional_fields"]["entry"] == {"item.brand": 1, "review.helpful": 1}
  assert next(source.items()).price == 12.0
  assert list(source.users())[0].narratives == {}


def bad_user(**changes):
  user = json.loads(json.dumps(USER_B))
  for path, value in changes.items():
    *parents, last = path.split("__")
    node = user
    for p in parents:
      node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
      del node[last]
    else:
      node[last] = value
  return user


@pytest.mark.parametrize("changes, field", [
    ({"reviewer_id": KeyError}, "reviewer_id"),
    ({"purchase_history": KeyError}, "purchase_history"),
    ({"purchase_history__1__item__asin": KeyError}, "purchase_history[1].item.asin"),
    ({"purchase_history__1__item": KeyError}, "purchase_history[1].item"),
    ({"purchase_history__0__review__rating": "five"}, "purchase_history[0].review.rating"),
    ({"purchase_history__1__review__unix_time": "soon"}, "purchase_history[1].review.unix_time"),
    ({"purchase_history__0__preferences": [1]}, "purchase_history[0].preferences"),
    ({"last_purchase__reason": 5}, "last_purchase.reason"),
])
def test_bad_line_raises_with_dotted_field(tmp_path, changes, field):
  path = write(tmp_path / "office.jsonl", [USER_A, bad_user(**changes)])
  with pytest.raises(FormatError) as e:
    list(regen.read(path).interactions())
  assert f"office.jsonl:2: field '{field}'" in str(e.value)


def test_bad_lines_skipped_once_across_streams(tmp_path):
  path = write(tmp_path / "office.jsonl", [
      bad_user(purchase_history__0__review__rating="five"), "{not json", USER_A])
  bad = BadLines(skip=True)
  source = regen.read(path, bad=bad)
  assert {i.user for i in source.interactions()} == {"RA"}
  assert [i.order for i in source.interactions()] == [0, 1, 2]
  assert [i.item for i in source.items()] == ["X1", "X2", "X3"]
  assert [u.user for u in source.users()] == ["RA"]
  assert bad.count == 2  # each bad line counted once though three streams read it
  assert "office.jsonl:1: field 'purchase_history[0].review.rating'" in bad.examples[0]
  assert "office.jsonl:2" in bad.examples[1]


def test_rejects_side_files(tmp_path):
  path = write(tmp_path / "office.jsonl", [USER_A])
  with pytest.raises(ValueError, match="item_text"):
    regen.read(path, item_text=tmp_path / "meta.json")
  with pytest.raises(ValueError, match="datamaps"):
    regen.read(path, datamaps=tmp_path / "datamaps.json")
