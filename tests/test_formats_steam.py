"""Steam (Kang & McAuley 2018) reader on small hand-written literal dumps."""

import gzip

import pytest

from recjax.data.formats import steam
from recjax.data.formats.common import BadLines, FormatError

REVIEWS = [
    "{u'username': u'Chaos Syren', u'hours': 0.1, u'products': 41, u'product_id': u'725280', "
    "u'page_order': 0, u'date': u'2017-12-17', u'text': u'Not acceptable \\u2639', "
    "u'early_access': False, u'page': 1}",
    "{'username': 'Ryan', 'user_id': '76561197970982479', 'product_id': '328100', "
    "'date': '2011-11-05', 'text': 'Fun', 'recommended': True}",
    "{'username': 'Ann', 'product_id': 328100, 'date': '2011-11-05', 'recommended': False}",
]
GAMES = [
    "{u'publisher': u'Kotoshiro', u'genres': [u'Action', u'Casual', u'Indie'], "
    "u'app_name': u'Lost Summoner Kitty', u'title': u'Lost Summoner Kitty', "
    "u'tags': [u'Strategy', u'Indie'], u'specs': [u'Single-player'], u'price': 4.99, "
    "u'id': u'725280', u'developer': u'Kotoshiro', u'sentiment': u'Mostly Positive'}",
    "{'title': 'Gunspell', 'tags': ['Puzzle', 'RPG'], 'price': 'Free to Play', 'id': '328100', "
    "'developer': 'Ino-Co'}",
    "{'app_name': 'No id here', 'genres': ['Action']}",  # the real file has such rows
    "{'app_name': 'Duplicate', 'id': '725280'}",
]


def write(path, lines, compress=True):
  text = "".join(line + "\n" for line in lines)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def test_reviews_and_games(tmp_path):
  reviews = write(tmp_path / "steam_reviews.json.gz", REVIEWS)
  games = write(tmp_path / "steam_games.json.gz", GAMES)
  source = steam.read(reviews)
  assert source.format == "steam"
  assert source.notes["item_text"] == str(games) and source.notes["item_text_discovered"]

  inter = list(source.interactions())
  assert [(i.user, i.item, i.timestamp, i.rating) for i in inter] == [
      ("Chaos Syren", "725280", 1513468800, None),  # 2017-12-17 00:00 UTC
      ("76561197970982479", "328100", 1320451200, 1.0),  # user_id wins over username
      ("Ann", "328100", 1320451200, 0.0),
  ]
  assert inter[0].review == "Not acceptable \u2639" and inter[2].review is None
  assert [i.order for i in inter] == [1, 2, 3]
  assert source.notes["reviews_with_recommended"] == 2

  items = list(source.items())
  assert [i.item for i in items] == ["725280", "328100"]
  kitty, gunspell = items
  assert kitty.title == "Lost Summoner Kitty" and kitty.brand == "Kotoshiro"
  assert kitty.categories == ("Action", "Casual", "Indie")  # genres, listed order
  assert kitty.price == 4.99
  assert kitty.description == ("Tags: Strategy, Indie. Features: Single-player. "
                               "Developer: Kotoshiro. Reviews: Mostly Positive.")
  assert gunspell.title == "Gunspell"  # `title` when `app_name` is absent
  assert gunspell.categories == ("Puzzle", "RPG")  # no genres: tags
  assert gunspell.price == 0.0 and gunspell.brand == "Ino-Co"
  assert source.notes["games_without_id"] == 1 and source.notes["duplicate_game_ids"] == 1


def test_parse_date():
  assert steam.parse_date("2017-12-17", "f", 1) == 1513468800
  assert steam.parse_date("1970-01-02", "f", 1) == 86400
  assert steam.parse_date("1970-01-01T01:00:00+01:00", "f", 1) == 0
  with pytest.raises(FormatError, match="f:7: field 'date'"):
    steam.parse_date("Posted November 5, 2011.", "f", 7)


def test_no_games_file_plain_text(tmp_path):
  reviews = write(tmp_path / "reviews.json", REVIEWS, compress=False)
  source = steam.read(reviews)
  assert source.notes["item_text"] is None and "steam_games.json.gz" in source.notes["item_text_missing"]
  assert len(list(source.interactions())) == 3 and list(source.items()) == []
  with pytest.raises(ValueError, match="datamaps"):
    steam.read(reviews, datamaps="x")


BAD = [
    REVIEWS[0],
    "{'username': 'B', 'product_id': '1', 'date': '17 Dec 2017'}",
    "{'username': 'B', 'date': '2017-12-17'}",
    "{'product_id': '1', 'date': '2017-12-17'}",
    "{'username': 'B', 'product_id': '1'}",
    "{'username': 'B', 'product_id': '1', 'date': '2017-12-17', 'recommended': 'yes'}",
    "not a literal",
]


@pytest.mark.parametrize("line, field", [(2, "date"), (3, "product_id"), (4, "username"),
                                         (5, "date"), (6, "recommended")])
def test_bad_review_raises(tmp_path, line, field):
  reviews = write(tmp_path / "steam_reviews.json.gz", [REVIEWS[0], BAD[line - 1]])
  with pytest.raises(FormatError) as e:
    list(steam.read(reviews).interactions())
  assert f"steam_reviews.json.gz:2: field '{field}'" in str(e.value)


def test_bad_lines_skipped_and_counted(tmp_path):
  reviews = write(tmp_path / "steam_reviews.json.gz", BAD)
  write(tmp_path / "steam_games.json.gz", GAMES + ["{'id': '9', 'genres': 'Action'}"])
  bad = BadLines(skip=True)
  source = steam.read(reviews, bad=bad)
  assert [i.user for i in source.interactions()] == ["Chaos Syren"]
  assert len(list(source.items())) == 2
  assert bad.count == 7
  assert any("steam_reviews.json.gz:7" in x for x in bad.examples)
  assert any("steam_games.json.gz:5: field 'genres'" in x for x in bad.examples)
