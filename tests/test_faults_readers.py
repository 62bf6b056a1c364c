"""Fault injection into every reader, through `prepare`: each fault class x reader.

For every case the verdict is asserted, never just "no crash":
  * by default, prepare raises a FormatError whose message starts with `file:line` (or
    names the JSON path for LC-Rec's whole-document files) and, for the CLI, exit 2;
  * with skip_bad_lines, prepare succeeds, the manifest counts exactly the faulty records
    under the expected reason, and the prepared data is bit-identical (content hash) to
    preparing the same files with the faulty records deleted: nothing else changed.
File-level faults (a truncated or corrupt gzip stream) are errors in both modes: what
follows the fault cannot be counted. `CASES` is the table in docs/data.md.

The hypothesis test at the end mutates single records at random and checks the same
contract: a mutation is either accepted as a valid record, or an error by default and a
count under skip_bad_lines, never a crash.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recjax.data import prepare, prepared
from recjax.data.formats.common import FileCorrupt, FormatError

# A small clean dataset: 5 users, 6 items, >= 3 interactions each, distinct timestamps.
USERS = {f"U{u}": [(f"I{(u + k) % 6}", 1_500_000_000 + 1000 * u + 10 * k, 1.0 + (u + k) % 5)
                   for k in range(3 + u % 2)] for u in range(5)}
ITEMS = {f"I{i}": (f"Title {i}", ["Cat", f"Sub{i % 2}"]) for i in range(6)}
OPTIONS = dict(kcore=0, min_seq_len=3)


# --- one writer per format: {file name: [lines]} (lines without their "\n") ------------


def _json(d) -> str:
  return json.dumps(d)


def amazon_review(u, i, t, r, edition=2018, **over):
  rec = {"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "reviewText": f"text {u} {i}",
         "summary": "ok"}
  rec.update(over)
  return _json({k: v for k, v in rec.items() if v is not _DROP})


def amazon_meta(i, edition=2018, **over):
  title, cats = ITEMS[i]
  rec = {"asin": i, "title": title, "description": [f"About {i}"]}
  rec["category" if edition == 2018 else "categories"] = cats if edition == 2018 else [cats]
  rec.update(over)
  return _json({k: v for k, v in rec.items() if v is not _DROP})


def steam_review(u, i, t, r, **over):
  import datetime
  day = datetime.datetime.utcfromtimestamp(t).date().isoformat()
  rec = {"username": u, "product_id": i, "date": day, "text": f"fun {i}"}
  rec.update(over)
  return repr({k: v for k, v in rec.items() if v is not _DROP})


def steam_game(i, **over):
  title, cats = ITEMS[i]
  rec = {"id": i, "app_name": title, "genres": cats}
  rec.update(over)
  return repr({k: v for k, v in rec.items() if v is not _DROP})


def regen_user(u, entries=None, **over):
  history = []
  for i, t, r in (entries if entries is not None else USERS[u]):
    title, cats = ITEMS[i]
    history.append({"item": {"asin": i, "title": title, "category": " - ".join(cats)},
                    "review": {"rating": r, "unix_time": t, "text": f"{u} on {i}"}})
  rec = {"reviewer_id": u, "purchase_history": history}
  rec.update(over)
  return _json({k: v for k, v in rec.items() if v is not _DROP})


_DROP = object()  # a field override that removes the field
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token\tcategories:token_seq"


def recbole_row(u, i, t, r):
  return f"{u}\t{i}\t{r}\t{t}"


def recbole_item(i, title=None):
  t, cats = ITEMS[i]
  return f"{i}\t{title or t}\t" + ", ".join(f"'{c}'" for c in cats)


def num(x: str) -> str:
  return x[1:]  # S3-Rec / LC-Rec ids are numbers: U3 -> 3, I4 -> 4


@dataclasses.dataclass
class Format:
  name: str
  inter: str  # interaction file name
  item: str | None  # item file name (discovered next to `inter`)
  render: Callable[[], dict[str, list[str]]]


def _amazon(edition):
  def render():
    return {"X.json": [amazon_review(u, i, t, r) for u, ev in USERS.items() for i, t, r in ev],
            "meta_X.json": [amazon_meta(i, edition) for i in ITEMS]}
  return render


FORMATS = {
    "amazon2018": Format("amazon2018", "X.json", "meta_X.json", _amazon(2018)),
    "amazon2014": Format("amazon2014", "X.json", "meta_X.json", _amazon(2014)),
    "steam": Format("steam", "steam_reviews.json", "steam_games.json.gz", lambda: {
        "steam_reviews.json": [steam_review(u, i, t, r) for u, ev in USERS.items() for i, t, r in ev],
        "steam_games.json.gz": [steam_game(i) for i in ITEMS]}),
    "regen": Format("regen", "X.jsonl", None, lambda: {"X.jsonl": [regen_user(u) for u in USERS]}),
    "recbole": Format("recbole", "X.inter", "X.item", lambda: {
        "X.inter": [INTER_HEADER] + [recbole_row(u, i, t, r) for u, ev in USERS.items() for i, t, r in ev],
        "X.item": [ITEM_HEADER] + [recbole_item(i) for i in ITEMS]}),
    "s3rec": Format("s3rec", "X.txt", None, lambda: {
        "X.txt": [" ".join([num(u)] + [num(i) for i, _, _ in ev]) for u, ev in USERS.items()]}),
    "lcrec": Format("lcrec", "X.inter.json", "X.item.json", lambda: {
        "X.inter.json": [_json({num(u): [int(num(i)) for i, _, _ in ev] for u, ev in USERS.items()})],
        "X.item.json": [_json({num(i): {"title": t, "categories": ", ".join(c)} for i, (t, c) in ITEMS.items()})]}),
}


# --- faults: each returns (bad files, clean files or None, reason, count, where) ----------


def _lines(files, name):
  return list(files[name])


def replace(files, name, k, new, *, clean_drop=True):
  """Line k (0-based) of `name` replaced; the clean version drops it."""
  bad = dict(files, **{name: _lines(files, name)[:k] + [new] + _lines(files, name)[k + 1:]})
  clean = dict(files, **{name: _lines(files, name)[:k] + _lines(files, name)[k + 1:]}) if clean_drop else None
  return bad, clean


def append(files, name, new):
  return dict(files, **{name: _lines(files, name) + [new]}), files


def write_files(directory: pathlib.Path, files, raw: dict | None = None) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  for name, lines in files.items():
    data = ("\n".join(lines) + "\n").encode()
    if raw and name in raw:
      data = raw[name](data)
    (directory / name).write_bytes(data)


@dataclasses.dataclass
class Case:
  fmt: str
  klass: str
  reason: str | None  # None: an error in both modes (file-level)
  build: Callable  # files -> (bad files, clean files, raw byte transforms)
  count: int = 1
  where: str = ""  # expected in the error message, e.g. "X.json:3"


def _cut_last(files, name):
  lines = _lines(files, name)
  cut = lines[-1][: max(1, len(lines[-1]) - 3)]
  return {name: lambda data, cut=cut, lines=lines: ("\n".join(lines[:-1] + [cut])).encode()}


def _gz(transform):
  def apply(data):
    return transform(gzip.compress(data, mtime=0))
  return apply


def _undecodable(k):
  def apply(data):
    lines = data.split(b"\n")
    lines[k] = lines[k] + b"\xff"  # one byte that is not UTF-8
    return b"\n".join(lines)
  return apply


def _flip_middle(data):
  out = bytearray(data)
  for k in range(len(out) // 2, len(out) // 2 + 8):
    out[k] ^= 0xA5
  return bytes(out)


def cases() -> list[Case]:
  out = []
  json_like = ("amazon2018", "amazon2014", "steam", "regen")
  line_formats = ("amazon2018", "amazon2014", "steam", "regen", "recbole", "s3rec")
  for f in FORMATS:
    F = FORMATS[f]
    n_inter = len(F.render()[F.inter])
    # Truncated final record: a cut that still parses (s3rec id 2795 -> 2) or does not.
    if f in line_formats:
      out.append(Case(f, "truncated final record", "truncated",
                      lambda files, F=F: (files, replace(files, F.inter, len(files[F.inter]) - 1, "")[1],
                                          _cut_last(files, F.inter)), where=f"{F.inter}:{n_inter}"))
    else:  # whole-document JSON: the cut document does not parse, an error in both modes
      out.append(Case(f, "truncated final record", None,
                      lambda files, F=F: (files, None, _cut_last(files, F.inter)), where=F.inter))
    out.append(Case(f, "truncated gzip", None,
                    lambda files, F=F: (files, None, {F.inter: _gz(lambda d: d[: len(d) * 2 // 3])}),
                    where=F.inter))
    out.append(Case(f, "corrupt gzip", None,
                    lambda files, F=F: (files, None, {F.inter: _gz(_flip_middle)}), where=F.inter))
    if f in line_formats:
      k = 2  # a data line (line 3; recbole: its line 3 is the second data row)
      out.append(Case(f, "undecodable bytes", "undecodable",
                      lambda files, F=F, k=k: (files, replace(files, F.inter, k, "")[1],
                                               {F.inter: _undecodable(k)}), where=f"{F.inter}:{k + 1}"))
    else:
      out.append(Case(f, "undecodable bytes", None, lambda files, F=F: (
          files, None, {F.inter: lambda d: d.replace(b"[", b"[\xff", 1)}), where=F.inter))
  # Record-level classes, per format: (class, reason, files -> (bad, clean), where).
  t_big = int(1e30)
  big = "x" * (1 << 20)
  first = next(iter(USERS.items()))
  u0, ev0 = first
  table = {
      "amazon2018": _amazon_cases(2018, t_big, big),
      "amazon2014": _amazon_cases(2014, t_big, big),
      "steam": [
          ("oversized field", "oversized", lambda fl: _meta_swap(fl, "steam_games.json.gz", 1,
                                                                 steam_game("I1", genres=[big])),
           "steam_games.json.gz:2"),
          ("wrong JSON type", "wrong_type", lambda fl: _meta_swap(fl, "steam_games.json.gz", 1,
                                                                  steam_game("I1", app_name=["Red", "Shoe"])),
           "steam_games.json.gz:2"),
          ("missing required field", "missing_field",
           lambda fl: replace(fl, "steam_reviews.json", 0, steam_review(u0, *ev0[0], product_id=_DROP)),
           "steam_reviews.json:1"),
          ("empty id", "empty_id",
           lambda fl: replace(fl, "steam_reviews.json", 0, steam_review(u0, *ev0[0], product_id="  ")),
           "steam_reviews.json:1"),
          ("exact duplicate interaction", "duplicate_interaction",
           lambda fl: append(fl, "steam_reviews.json", fl["steam_reviews.json"][0]), "steam_reviews.json:18"),
      ],
      "regen": [
          ("out-of-range number", "out_of_range", lambda fl: replace(
              fl, "X.jsonl", 0, regen_user(u0, [ev0[0], ev0[1], (ev0[2][0], t_big, 5.0)])), "X.jsonl:1"),
          ("oversized field", "oversized", lambda fl: _regen_item_swap(fl, 0, {"category": big}), "X.jsonl:1"),
          ("wrong JSON type", "wrong_type", lambda fl: replace(fl, "X.jsonl", 1, json.dumps(
              {**json.loads(fl["X.jsonl"][1]), "purchase_history": {"not": "a list"}})), "X.jsonl:2"),
          ("missing required field", "missing_field",
           lambda fl: replace(fl, "X.jsonl", 0, regen_user(u0, reviewer_id=_DROP)), "X.jsonl:1"),
          ("empty id", "empty_id", lambda fl: replace(fl, "X.jsonl", 0, regen_user(u0, reviewer_id="")), "X.jsonl:1"),
          ("duplicate user", "duplicate_user", lambda fl: append(fl, "X.jsonl", regen_user(u0)), "X.jsonl:6"),
          ("exact duplicate interaction", "duplicate_interaction", lambda fl: _regen_dup_entry(fl), "X.jsonl:1"),
      ],
      "recbole": [
          ("out-of-range number", "out_of_range",
           lambda fl: replace(fl, "X.inter", 1, recbole_row(u0, ev0[0][0], "1e30", 5.0)), "X.inter:2"),
          ("oversized field", "oversized", lambda fl: _meta_swap(fl, "X.item", 2, recbole_item("I1", big)),
           "X.item:3"),
          ("wrong JSON type", "wrong_type",
           lambda fl: replace(fl, "X.inter", 1, recbole_row(u0, ev0[0][0], ev0[0][1], "five")), "X.inter:2"),
          ("missing required field", "missing_field",
           lambda fl: replace(fl, "X.inter", 1, recbole_row(u0, ev0[0][0], "", 5.0)), "X.inter:2"),
          ("empty id", "empty_id", lambda fl: replace(fl, "X.inter", 1, recbole_row("", "I1", 1, 5.0)),
           "X.inter:2"),
          ("exact duplicate interaction", "duplicate_interaction",
           lambda fl: append(fl, "X.inter", fl["X.inter"][1]), "X.inter:19"),
          ("unbalanced quote", "unbalanced_quote",
           lambda fl: replace(fl, "X.inter", 2, fl["X.inter"][2].replace("\t", "\t\"", 1)), "X.inter:3"),
      ],
      "s3rec": [
          ("oversized field", "oversized", lambda fl: replace(fl, "X.txt", 1, "1 2 3 " + "9" * 2000), "X.txt:2"),
          ("wrong JSON type", "wrong_type", lambda fl: replace(fl, "X.txt", 1, "1 2 three 4"), "X.txt:2"),
          ("missing required field", "missing_field", lambda fl: replace(fl, "X.txt", 1, "1"), "X.txt:2"),
          ("duplicate user", "duplicate_user", lambda fl: append(fl, "X.txt", "0 1 2 3"), "X.txt:6"),
      ],
      "lcrec": [
          ("oversized field", "oversized", lambda fl: _lcrec_item(fl, "1", {"title": big}), "item[1]"),
          ("wrong JSON type", "wrong_type", lambda fl: _lcrec_item(fl, "1", {"title": ["Red", "Shoe"]}),
           "item[1]"),
          ("missing required field", "missing_field", lambda fl: _lcrec_inter(fl, "1", []), "inter[1]"),
          ("empty id", "empty_id", lambda fl: _lcrec_inter(fl, "", [1, 2, 3], add=True), "inter[]"),
          ("duplicate user", "duplicate_user", lambda fl: _lcrec_dup_user(fl), "inter[1]"),
      ],
  }
  for f, rows in table.items():
    for klass, reason, fn, where in rows:
      out.append(Case(f, klass, reason, lambda files, fn=fn: (*fn(files), {}), where=where))
  return out


def _amazon_cases(edition, t_big, big):
  u0, ev0 = next(iter(USERS.items()))
  (i0, t0, r0) = ev0[0]
  return [
      ("out-of-range number", "out_of_range", lambda fl: replace(
          fl, "X.json", 0, amazon_review(u0, i0, t0, r0, unixReviewTime=t_big)), "X.json:1"),
      ("oversized field", "oversized", lambda fl: _meta_swap(
          fl, "meta_X.json", 1, amazon_meta("I1", edition, **{"category" if edition == 2018 else "categories":
                                                              [big] if edition == 2018 else [[big]]})),
       "meta_X.json:2"),
      ("wrong JSON type", "wrong_type", lambda fl: _meta_swap(fl, "meta_X.json", 1, amazon_meta(
          "I1", edition, title=["Red", "Shoe"])), "meta_X.json:2"),
      ("missing required field", "missing_field", lambda fl: replace(
          fl, "X.json", 0, amazon_review(u0, i0, t0, r0, unixReviewTime=_DROP)), "X.json:1"),
      ("empty id", "empty_id", lambda fl: replace(fl, "X.json", 0, amazon_review(u0, i0, t0, r0, asin=" ")),
       "X.json:1"),
      ("exact duplicate interaction", "duplicate_interaction",
       lambda fl: append(fl, "X.json", fl["X.json"][0]), "X.json:18"),
  ]


def _meta_swap(files, name, k, new):
  """An item row replaced by a bad one; the clean version lacks the row (no metadata)."""
  return replace(files, name, k, new)


def _regen_item_swap(files, k, item_over):
  rec = json.loads(files["X.jsonl"][k])
  rec["purchase_history"][0]["item"].update(item_over)
  return replace(files, "X.jsonl", k, json.dumps(rec))


def _regen_dup_entry(files):
  rec = json.loads(files["X.jsonl"][0])
  clean = dict(files)
  rec["purchase_history"].append(rec["purchase_history"][0])
  bad = dict(files, **{"X.jsonl": [json.dumps(rec)] + files["X.jsonl"][1:]})
  return bad, clean


def _lcrec_inter(files, user, seq, add=False):
  doc = json.loads(files["X.inter.json"][0])
  clean = dict(doc)
  if not add:
    del clean[user]
  doc[user] = seq
  return ({**files, "X.inter.json": [json.dumps(doc)]}, {**files, "X.inter.json": [json.dumps(clean)]})


def _lcrec_item(files, key, over):
  doc = json.loads(files["X.item.json"][0])
  clean = {k: v for k, v in doc.items() if k != key}
  doc[key] = {**doc[key], **over}
  return ({**files, "X.item.json": [json.dumps(doc)]}, {**files, "X.item.json": [json.dumps(clean)]})


def _lcrec_dup_user(files):
  text = files["X.inter.json"][0]
  return {**files, "X.inter.json": [text[:-1] + ', "1": [3, 4, 5]}']}, files


CASES = cases()


def _prepare(directory: pathlib.Path, case_or_fmt, skip: bool, tmp: pathlib.Path):
  F = FORMATS[case_or_fmt]
  return prepare.prepare(F.name, directory / F.inter, tmp, options=prepare.PrepareOptions(
      skip_bad_lines=skip, **OPTIONS))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.fmt}-{c.klass.replace(' ', '_')}")
def test_fault(case: Case, tmp_path):
  files = FORMATS[case.fmt].render()
  bad, clean, raw = case.build(files)
  write_files(tmp_path / "bad", bad, raw)
  # Default: one FormatError at the record's location.
  with pytest.raises(FormatError) as info:
    _prepare(tmp_path / "bad", case.fmt, False, tmp_path / "out_default")
  assert case.where in str(info.value), str(info.value)
  assert not (tmp_path / "out_default").exists()  # nothing half-written left behind
  if case.reason is None:  # a file-level fault: an error under skip_bad_lines too
    with pytest.raises(FileCorrupt if "gzip" in case.klass else FormatError):
      _prepare(tmp_path / "bad", case.fmt, True, tmp_path / "out_skip")
    return
  assert info.value.reason == case.reason
  manifest = _prepare(tmp_path / "bad", case.fmt, True, tmp_path / "out_skip")
  assert manifest["bad_lines"]["skipped"] == case.count
  assert manifest["bad_lines"]["by_reason"] == {case.reason: case.count}
  on_disk = json.loads((tmp_path / "out_skip" / "manifest.json").read_text())
  assert on_disk["bad_lines"]["by_reason"] == {case.reason: case.count}
  # Exactly the faulty records are gone: the same data as the files without them.
  write_files(tmp_path / "clean", clean)
  expected = _prepare(tmp_path / "clean", case.fmt, False, tmp_path / "out_clean")
  assert manifest["content_hash"] == expected["content_hash"]


def test_every_reader_has_every_class_or_says_why_not():
  """The docs table: every (class, reader) cell is a case or a stated not-applicable."""
  classes = {c.klass for c in CASES}
  have = {(c.klass, c.fmt) for c in CASES}
  missing = {(k, f) for k in classes for f in FORMATS if (k, f) not in have}
  assert missing == NOT_APPLICABLE.keys(), sorted(missing ^ NOT_APPLICABLE.keys())


NOT_APPLICABLE = {
    ("out-of-range number", "s3rec"): "no numbers but ids (a long id is 'oversized')",
    ("out-of-range number", "lcrec"): "no numbers but ids",
    ("out-of-range number", "steam"): "dates, not numbers; a bad date is unparsable",
    ("empty id", "s3rec"): "whitespace-separated ids cannot be empty",
    ("duplicate user", "amazon2018"): "one review per line: users recur by design",
    ("duplicate user", "amazon2014"): "one review per line",
    ("duplicate user", "steam"): "one review per line",
    ("duplicate user", "recbole"): "one interaction per row",
    ("exact duplicate interaction", "s3rec"): "no timestamps: a repeat is a repeat purchase",
    ("exact duplicate interaction", "lcrec"): "no timestamps: a repeat is a repeat purchase",
    ("unbalanced quote", "amazon2018"): "JSON: a broken quote does not parse",
    ("unbalanced quote", "amazon2014"): "literal: a broken quote does not parse",
    ("unbalanced quote", "steam"): "literal: a broken quote does not parse",
    ("unbalanced quote", "regen"): "JSON: a broken quote does not parse",
    ("unbalanced quote", "s3rec"): "no quoting",
    ("unbalanced quote", "lcrec"): "JSON: a broken quote does not parse",
}


def test_cli_reports_a_bad_line_in_one_sentence_and_counts_skips(tmp_path, capsys):
  from recjax.main import main
  files = FORMATS["recbole"].render()
  bad, _ = replace(files, "X.inter", 2, files["X.inter"][2].replace("\t", "\t\"", 1))
  write_files(tmp_path, bad)
  code = main(["prepare", "--format", "recbole", "--input", str(tmp_path / "X.inter"), "--output",
               str(tmp_path / "out"), "--min_seq_len", "3"])
  err = capsys.readouterr().err
  assert code == 2 and "X.inter:3: unbalanced quote" in err and "Traceback" not in err
  code = main(["prepare", "--format", "recbole", "--input", str(tmp_path / "X.inter"), "--output",
               str(tmp_path / "out"), "--skip_bad_lines"])
  captured = capsys.readouterr()
  assert code == 0 and "skipped 1 bad lines" in captured.err and "unbalanced_quote 1" in captured.out


def test_unbalanced_quote_costs_one_line_not_the_rest_of_the_file(tmp_path):
  """The issue's case: one stray quote swallowed 1,311 lines and was counted as 1."""
  header = INTER_HEADER
  rows = [recbole_row(f"U{u}", f"I{k}", 1_500_000_000 + k, 4.0) for u in range(200) for k in range(3)]
  rows[10] = rows[10].replace("\t", "\t\"", 1)
  write_files(tmp_path, {"X.inter": [header] + rows})
  m = prepare.prepare("recbole", tmp_path / "X.inter", tmp_path / "out",
                      options=prepare.PrepareOptions(skip_bad_lines=True, **OPTIONS))
  assert m["bad_lines"]["by_reason"] == {"unbalanced_quote": 1}
  assert m["filters"]["raw_interactions"] == len(rows) - 1


# --- record-level fuzzing ------------------------------------------------------------


@st.composite
def mutations(draw):
  fmt = draw(st.sampled_from(sorted(FORMATS)))
  files = FORMATS[fmt].render()
  name = draw(st.sampled_from(sorted(files)))
  lines = files[name]
  k = draw(st.integers(0, len(lines) - 1))
  line = lines[k]
  kind = draw(st.sampled_from(["cut", "byte", "splice"]))
  if kind == "cut":
    pos = draw(st.integers(0, len(line)))
    new = line[:pos]
  elif kind == "byte":
    pos = draw(st.integers(0, max(len(line) - 1, 0)))
    new = line[:pos] + draw(st.sampled_from(['"', "'", "\t", "[", "}", "\\", "0", " ", ",", "\x00", "\u00e9"])) + line[pos + 1:]
  else:
    pos = draw(st.integers(0, len(line)))
    new = line[:pos] + draw(st.text(max_size=8)) + line[pos:]
  return fmt, dict(files, **{name: lines[:k] + [new] + lines[k + 1:]})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutations())
def test_fuzzed_records_are_valid_or_refused_and_counted(case, tmp_path_factory):
  fmt, files = case
  tmp = tmp_path_factory.mktemp("fuzz")
  write_files(tmp / "in", files)
  try:
    strict = _prepare(tmp / "in", fmt, False, tmp / "strict")
  except FormatError as e:
    strict = e
  except ValueError as e:  # whole-input verdicts: "no interactions left", "no ... matches"
    assert "no " in str(e), e
    return
  if isinstance(strict, FileCorrupt):
    return
  try:
    lenient = _prepare(tmp / "in", fmt, True, tmp / "lenient")
  except FormatError as e:
    # Only whole-document faults (LC-Rec, a broken header) stay errors under skip.
    assert isinstance(strict, FormatError) and (fmt == "lcrec" or e.line in (None, 1)), e
    return
  except ValueError as e:
    assert "no " in str(e), e
    return
  if isinstance(strict, FormatError):
    assert lenient["bad_lines"]["skipped"] >= 1, strict
    assert strict.reason in lenient["bad_lines"]["by_reason"], (strict, lenient["bad_lines"])
  else:
    assert lenient["bad_lines"]["skipped"] == 0
    assert lenient["content_hash"] == strict["content_hash"]


def fault_table() -> str:
  """The docs/data.md table: for each class x reader, the verdict this suite asserts."""
  readers = list(FORMATS)
  classes = list(dict.fromkeys(c.klass for c in CASES))
  verdict = {(c.klass, c.fmt): f"`{c.reason}`" if c.reason else "error" for c in CASES}
  rows = ["| fault | " + " | ".join(readers) + " |", "| --- |" + " --- |" * len(readers)]
  for k in classes:
    rows.append(f"| {k} | " + " | ".join(verdict.get((k, f), "n/a") for f in readers) + " |")
  return "\n".join(rows)


def test_docs_table_is_current():
  docs = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
  assert fault_table() in docs, "regenerate: python -c 'import tests.test_faults_readers as t; print(t.fault_table())'"
