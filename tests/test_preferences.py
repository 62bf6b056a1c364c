"""Preference discerning benchmark (Mender): prompts/parsing, splits on the small synthetic REGEN set, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recjax.data.prepared import PreparedDataset
from recjax.evaluation import preferences as prefs

MAX_ITEMS, NUM_PREFS = 6, 3  # small enough that histories get truncated and consolidation slots fill up


@pytest.fixture(scope="module")
def regen_dir(synthetic_prepared):
  return synthetic_prepared["synthetic_regen"]


@pytest.fixture(scope="module")
def encoder():
  from recjax.models import text
  return text.load_text_encoder("minilm")


@pytest.fixture(scope="module")
def bench(regen_dir, encoder):
  from recjax.artifacts import manifest, text_embeddings
  if "minilm" not in manifest.find(regen_dir, "text_embeddings"):  # the session's dataset: built once
    text_embeddings.fit(regen_dir, "minilm", encoder=encoder)
  return prefs.build_benchmark(regen_dir, max_items=MAX_ITEMS, num_preferences=NUM_PREFS, seed=3)


@pytest.fixture(scope="module")
def users(regen_dir):
  rows = PreparedDataset(regen_dir).sequences(["user_id", "items", "ratings", "preferences"]).to_pylist()
  return {r["user_id"]: r for r in rows}


def _padded(items, max_items=MAX_ITEMS):
  h = np.zeros(max_items, np.int32)
  recent = np.asarray(items[-max_items:], np.int32)
  h[:len(recent)] = recent
  return h


def _position(user, history, target):
  """Index j of the row's target in the user's sequence (the one whose prefix matches the history)."""
  items = user["items"]
  hits = [j for j in range(1, len(items)) if items[j] == target and np.array_equal(_padded(items[:j]), history)]
  assert hits, (user["user_id"], history, target)
  return hits[0]


# --- prompts, parsing, JSON lines ----------------------------------------------------------------------------------


def test_build_prompt_holds_every_review_and_the_limit():
  history = [{"title": "Acme Red Skillet", "rating": 5.0, "review": "Love the cast iron, heats evenly."},
             {"title": "Acme Green Mug", "rating": 1.0, "review": "The green color looks awful."},
             {"title": "Plain Pen", "rating": None, "review": None}]
  prompt = prefs.build_prompt(history, max_preferences=4)
  assert "Love the cast iron, heats evenly." in prompt and "The green color looks awful." in prompt
  assert "at most 4" in prompt and "at most 5" not in prompt
  assert "rated 1/5" in prompt and "not rated" in prompt and "(no review)" in prompt
  assert prompt.index("Acme Red Skillet") < prompt.index("Acme Green Mug")  # oldest first
  assert "avoid" in prompt.lower() and "verbatim" in prompt
  with pytest.raises(ValueError, match="at least one"):
    prefs.build_prompt([])
  with pytest.raises(ValueError, match="review"):
    prefs.build_prompt([{"title": "x", "rating": 3}])


def test_parse_preferences_strips_bullets_and_numbering():
  text = ("1. Likes cast iron cookware\n- Avoid green items\n\n* **Prefers budget options**\n"
          "  3) Trusts Acme\n\u2022 likes cast iron cookware\n(4) Likes a modern style\n5: Prefers wool")
  assert prefs.parse_preferences(text, max_preferences=10) == [
      "Likes cast iron cookware", "Avoid green items", "Prefers budget options", "Trusts Acme",
      "Likes a modern style", "Prefers wool"]
  assert prefs.parse_preferences(text, max_preferences=2) == ["Likes cast iron cookware", "Avoid green items"]
  assert prefs.parse_preferences("") == []


def test_preferences_jsonl_round_trip_and_errors(tmp_path):
  rows = [{"user_id": 3, "preferences": ["Likes tea", "Avoid \u00e9toile"]}, {"user_id": 7, "preferences": []}]
  path = prefs.save_preferences_jsonl(rows, tmp_path / "p.jsonl")
  assert prefs.load_preferences_jsonl(path) == {3: ["Likes tea", "Avoid \u00e9toile"], 7: []}
  bad = tmp_path / "bad.jsonl"
  for line, match in (('{"user_id": 1, "preferences": "Likes tea"}', "list of strings"),
                      ('{"user_id": "1", "preferences": []}', "integer user_id"),
                      ('{"user_id": 1, "preferences": [}', "not JSON"),
                      ('{"user_id": 3, "preferences": []}', "appears twice")):
    bad.write_text(json.dumps(rows[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{match}"):
      prefs.load_preferences_jsonl(bad)


def test_generate_preferences_prompts_with_everything_before_the_test_target(regen_dir, users):
  seen = []

  def fake_llm(prompts):
    seen.append(len(prompts))
    return ["1. Likes tea\n- Avoid nothing\n- extra\n- more"] * len(prompts)

  out = prefs.generate_preferences(regen_dir, fake_llm, max_preferences=2, batch_size=64)
  assert [r["user_id"] for r in out] == list(users)
  assert seen[:-1] == [64] * (len(seen) - 1) and sum(seen) == len(users)
  assert all(len(r["preferences"]) == 2 and r["preferences"][1] == "Avoid nothing" for r in out)
  prompts = []
  prefs.generate_preferences(regen_dir, lambda ps: prompts.extend(ps) or [""] * len(ps), batch_size=1000)
  first = next(iter(users.values()))
  numbered = [ln for ln in prompts[0].splitlines() if ln[:1].isdigit()]
  assert len(numbered) == len(first["items"]) - 1  # items[:-1]: the test target stays hidden
  with pytest.raises(ValueError, match="2 outputs for 1 prompts"):
    prefs.generate_preferences(regen_dir, lambda ps: ["a", "b"], batch_size=1)


# --- benchmark ------------------------------------------------------------------------------------------------------


def test_missing_preferences_field_is_named(synthetic_prepared):
  with pytest.raises(ValueError, match="'preferences'"):
    prefs.build_benchmark(synthetic_prepared["synthetic"])


def test_inversion_and_negatives():
  assert prefs.invert("Avoid green") == "Prefers green"
  assert prefs.invert("exclude wool blend") == "Prefers wool blend"
  assert prefs.invert("No plastic") == "Prefers plastic"
  assert not prefs.is_negative("Notebooks are great") and not prefs.is_negative("Likes avoiding crowds")
  with pytest.raises(ValueError):
    prefs.invert("Likes green")


def test_shapes_dtypes_and_padding(bench, users, regen_dir):
  assert set(bench.splits) == set(prefs.SPLITS)
  vocab = PreparedDataset(regen_dir).vocab_size
  num = len(bench.preferences)
  assert bench.preferences == sorted(set(bench.preferences))
  assert bench.pref_embeddings.shape == (num, 384) and bench.pref_embeddings.dtype == np.float32
  assert bench.item_embeddings.shape == (vocab, 384) and bench.item_embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(bench.pref_embeddings, axis=1), 1.0, atol=1e-5)
  assert not bench.item_embeddings[:2].any()
  for name, split in bench.splits.items():
    n = len(split["target"])
    assert n > 0, name
    assert {k: (v.dtype, v.shape) for k, v in split.items()} == {
        "user": (np.int32, (n,)), "history": (np.int32, (n, MAX_ITEMS)),
        "preferences": (np.int32, (n, NUM_PREFS)), "target": (np.int32, (n,)), "sign": (np.float32, (n,))}, name
    h, p = split["history"], split["preferences"]
    assert (h[:, 0] >= 2).all(), name  # never an empty history
    assert ((h >= 2) | (h == 0)).all() and not ((h[:, :-1] == 0) & (h[:, 1:] != 0)).any(), name  # right-padded
    assert ((p >= -1) & (p < num)).all() and not ((p[:, :-1] == -1) & (p[:, 1:] != -1)).any(), name  # real ids first
    assert (p[:, 0] >= 0).all(), name
    assert ((split["target"] >= 2) & (split["target"] < vocab)).all(), name
    assert np.isin(split["sign"], [-1.0, 1.0]).all(), name
    assert np.isin(split["user"], list(users)).all(), name
  assert bench.stats["splits"] == {k: len(v["target"]) for k, v in bench.splits.items()}
  assert bench.stats["num_preferences"] == num


def test_recommendation_splits_are_leave_one_out(bench, users):
  for name, offset in (("valid_recommendation", 2), ("test_recommendation", 1)):
    split = bench.splits[name]
    assert len(split["user"]) == len(users)
    for u, h, t, p in zip(split["user"], split["history"], split["target"], split["preferences"]):
      items = users[int(u)]["items"]
      assert t == items[-offset]
      np.testing.assert_array_equal(h, _padded(items[:-offset]))
      assert (p[1:] == -1).all()
      statement = bench.preferences[p[0]]
      assert statement in users[int(u)]["preferences"][-offset - 1] and not prefs.is_negative(statement)


def test_train_preferences_come_from_before_the_target_and_match_it(bench, users):
  split = bench.splits["train"]
  neg = bench.negative
  for u, h, t, p in zip(split["user"], split["history"], split["target"], split["preferences"]):
    user = users[int(u)]
    j = _position(user, h, int(t))
    assert 1 <= j <= len(user["items"]) - 3  # inside the training part items[:-2]
    available = [s for s in user["preferences"][j - 1] if not prefs.is_negative(s)]
    assert not neg[p[0]] and bench.preferences[p[0]] in available
    ids = [bench.preferences.index(s) for s in available]
    sims = bench.pref_embeddings[ids] @ bench.item_embeddings[t]
    assert bench.pref_embeddings[p[0]] @ bench.item_embeddings[t] >= sims.max() - 1e-6


def test_no_preference_target_pair_is_shared_between_train_and_test(bench):
  def pairs(split):
    p, t = split["preferences"], np.broadcast_to(split["target"][:, None], split["preferences"].shape)
    return set(zip(p[p >= 0].tolist(), t[p >= 0].tolist()))

  test = set().union(*(pairs(bench.splits[s]) for s in prefs.TEST_SPLITS))
  for name in prefs.TRAIN_SPLITS:
    assert not pairs(bench.splits[name]) & test, name
  assert bench.stats["dropped_total"] == sum(bench.stats["dropped"].values()) > 0
  assert len(bench.splits["train"]["target"]) > 0


def test_held_out_splits_only_drop_their_pairs(bench, regen_dir, encoder):
  sentiment = ("test_sentiment_positive", "test_sentiment_negative")
  other = prefs.build_benchmark(regen_dir, max_items=MAX_ITEMS, num_preferences=NUM_PREFS, seed=3,
                                held_out_splits=sentiment)
  for name in prefs.TEST_SPLITS + ("valid_recommendation",):  # deterministic: the same seed gives the same splits
    for key in prefs.ARRAY_KEYS:
      np.testing.assert_array_equal(other.splits[name][key], bench.splits[name][key], err_msg=name)
  assert other.stats["dropped_total"] < bench.stats["dropped_total"]
  assert len(other.splits["train"]["target"]) > len(bench.splits["train"]["target"])
  with pytest.raises(ValueError, match="not test splits"):
    prefs.build_benchmark(regen_dir, held_out_splits=("train",))


def test_steering_changes_the_target_and_fine_is_closer_than_coarse(bench, users):
  original = bench.splits["test_recommendation"]
  emb = bench.item_embeddings
  test_target = {u: r["items"][-1] for u, r in users.items()}
  mean_cos = {}
  for kind in ("fine", "coarse"):
    split = bench.splits[f"test_{kind}_steering"]
    assert len(split["target"]) == len(original["target"])  # rows follow the test cases (none skipped here)
    orig = original["target"]
    assert (split["target"] != orig).all()
    assert not (split["history"] == split["target"][:, None]).any()  # the new target is not in the history
    # The history is that of a user with the same original target (or the user's own).
    donors_match = np.array([test_target[int(u)] == t for u, t in zip(split["user"], orig)])
    assert donors_match.all()
    moved = (split["user"] != original["user"]).mean()
    assert moved == pytest.approx(bench.stats["steering_same_target_fraction"][f"test_{kind}_steering"], abs=1e-3)
    assert moved > 0.3
    # The preference is the positive statement of the pool best matching the new target.
    neg = bench.negative
    pool = [i for i, s in enumerate(bench.preferences) if not neg[i] and any(
        s in step for r in users.values() for step in r["preferences"])]
    best = np.array(pool)[(emb[split["target"]] @ bench.pref_embeddings[pool].T).argmax(1)]
    np.testing.assert_array_equal(split["preferences"][:, 0], best)
    mean_cos[kind] = float(np.mean(np.sum(emb[split["target"]] * emb[orig], axis=1)))
  assert mean_cos["fine"] > mean_cos["coarse"] + 0.2, mean_cos
  for kind in ("fine", "coarse"):
    assert len(bench.splits[f"train_{kind}_steering"]["target"]) + bench.stats["dropped"][f"train_{kind}_steering"] \
        == len(users)


def test_sentiment_rows_are_aligned_and_inverted(bench, users):
  pos, neg = bench.splits["test_sentiment_positive"], bench.splits["test_sentiment_negative"]
  for key in ("user", "history", "target"):
    np.testing.assert_array_equal(pos[key], neg[key])
  assert (pos["sign"] == 1.0).all() and (neg["sign"] == -1.0).all()
  for u, h, t, p, n in zip(pos["user"], pos["history"], pos["target"], pos["preferences"][:, 0],
                           neg["preferences"][:, 0]):
    assert prefs.is_negative(bench.preferences[n]) and not prefs.is_negative(bench.preferences[p])
    assert bench.preferences[p] == prefs.invert(bench.preferences[n])
    user = users[int(u)]
    assert user["ratings"][_position(user, h, int(t))] <= 2
  train = bench.splits["train_sentiment"]
  signs = train["sign"]
  assert (signs == 1).any() and (signs == -1).any()
  test_pairs = {(bench.preferences[n], t) for n, t in zip(neg["preferences"][:, 0], neg["target"])}
  train_pairs = {(bench.preferences[n], t) for n, t, s in zip(train["preferences"][:, 0], train["target"], signs)
                 if s < 0}
  assert not test_pairs & train_pairs
  total = bench.stats["sentiment_cases"]
  assert 0.05 < len(neg["target"]) / total < 0.5  # ~test_fraction of the cases


def test_consolidation_hides_the_matched_statement_among_the_users_others(bench, users):
  rec, cons = bench.splits["test_recommendation"], bench.splits["test_consolidation"]
  for key in ("user", "history", "target"):
    np.testing.assert_array_equal(rec[key], cons[key])
  first = []
  for u, matched, row in zip(rec["user"], rec["preferences"][:, 0], cons["preferences"]):
    ids = row[row >= 0]
    assert matched in ids and len(set(ids.tolist())) == len(ids) == NUM_PREFS
    assert all(bench.preferences[i] in users[int(u)]["preferences"][-2] for i in ids)
    first.append(ids[0] == matched)
  assert 0.1 < np.mean(first) < 0.7  # shuffled: the matched statement is not always first
  assert any(bench.negative[row[row >= 0]].any() for row in cons["preferences"])


def test_save_load_round_trip(bench, regen_dir, tmp_path):
  import shutil
  from recjax.artifacts import preference_benchmark
  data_dir = tmp_path / "data"
  shutil.copytree(regen_dir, data_dir)
  path = preference_benchmark.save(bench, data_dir, name="gt")
  assert path == data_dir / "artifacts" / "preference_benchmark" / "gt" and (path / "benchmark.npz").is_file()
  assert sorted(p.name for p in path.parent.iterdir()) == [".lock-gt", "gt"]  # no build dir left behind
  loaded = preference_benchmark.load(data_dir, name="gt")
  assert loaded.preferences == bench.preferences and loaded.stats == json.loads(json.dumps(bench.stats))
  np.testing.assert_array_equal(loaded.pref_embeddings, bench.pref_embeddings)
  np.testing.assert_array_equal(loaded.item_embeddings, bench.item_embeddings)
  assert list(loaded.splits) == list(bench.splits)
  for name, split in bench.splits.items():
    for key, value in split.items():
      assert loaded.splits[name][key].dtype == value.dtype
      np.testing.assert_array_equal(loaded.splits[name][key], value)
  with pytest.raises(FileNotFoundError, match="fits/preference_benchmark.gin .* --gin.NAME=missing"):
    preference_benchmark.load(data_dir, name="missing")
  with pytest.raises(ValueError, match="name"):
    preference_benchmark.save(bench, data_dir, name="../escape")


# --- metrics --------------------------------------------------------------------------------------------------------


def test_hit_at_k():
  top = np.array([[5, 6, 7], [7, 8, 9], [2, 3, 4]])
  np.testing.assert_array_equal(prefs.hit_at_k(top, np.array([6, 9, 10]), 2), [True, False, False])
  np.testing.assert_array_equal(prefs.hit_at_k(top, np.array([6, 9, 10]), 3), [True, True, False])
  with pytest.raises(ValueError, match="k=4"):
    prefs.hit_at_k(top, np.array([1, 2, 3]), 4)


def test_sentiment_following_counts_hit_positive_and_missed_negative():
  targets = np.array([10, 11, 12, 13])
  top_pos = np.array([[10, 1], [11, 2], [3, 4], [5, 13]])  # hits rows 0, 1, 3 at k=2; rows 0, 1 at k=1
  top_neg = np.array([[7, 8], [9, 11], [12, 6], [6, 7]])  # hits rows 1, 2 at k=2; row 2 at k=1
  # k=2: row 0 (hit, missed), row 3 (hit, missed) -> 2/4; row 1 is hit under both.
  assert prefs.sentiment_following(top_pos, top_neg, targets, 2) == pytest.approx(0.5)
  # k=1: rows 0 and 1 are hit with the positive, neither with the negative -> 2/4.
  assert prefs.sentiment_following(top_pos, top_neg, targets, 1) == pytest.approx(0.5)
  assert prefs.sentiment_following(top_pos, top_pos, targets, 2) == 0.0
  assert np.isnan(prefs.sentiment_following(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), 1))


def test_benchmark_splits_become_seqio_tasks(bench, regen_dir, tmp_path):
  import shutil
  import seqio
  from recjax.data import converters
  from test_item_tasks import import_tasks
  tasks = import_tasks()
  data = tmp_path / "regen"
  shutil.copytree(regen_dir, data)
  from recjax.artifacts import preference_benchmark
  preference_benchmark.save(bench, data, "ground_truth")
  names = tasks.register_dataset_tasks("pt_regen", data)
  try:
    axes = ["recommendation", "fine_steering", "coarse_steering", "sentiment", "consolidation"]
    assert {f"pt_regen_pref_{a}" for a in axes} | {"pt_regen_pref_mix"} <= set(names)
    task = seqio.get_mixture_or_task("pt_regen_pref_recommendation")
    vocab = task.output_features["preferences"].vocabulary
    assert vocab.table == ("", *bench.preferences)
    split = bench.splits["test_recommendation"]
    exs = list(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
    assert len(exs) == len(split["target"])
    for r in (0, 7, len(exs) - 1):  # history then target; statement ids shifted by one
      h = split["history"][r]
      np.testing.assert_array_equal(exs[r]["items"], [*h[h > 0], split["target"][r]])
      p = split["preferences"][r]
      np.testing.assert_array_equal(exs[r]["preferences"], p[p >= 0] + 1)
      assert vocab.table[exs[r]["preferences"][0]] == bench.preferences[p[0]]
    # Sentiment's test split holds the positive rows, then the aligned negative ones.
    senti = list(seqio.get_mixture_or_task("pt_regen_pref_sentiment").get_dataset(
        None, split="test", shuffle=False).as_numpy_iterator())
    n = len(bench.splits["test_sentiment_positive"]["target"])
    assert [e["sign"] for e in senti] == [1.0] * n + [-1.0] * n
    # The item-sequence eval converter holds out the target, as for every other task.
    conv = converters.ItemSequenceEvalConverter()
    batch = next(conv(task.get_dataset(None, split="test", shuffle=False), {"items": 20}).batch(4)
                 .as_numpy_iterator())
    np.testing.assert_array_equal(batch["target"], split["target"][:4])
    mix = seqio.get_mixture_or_task("pt_regen_pref_mix")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates["pt_regen_pref_recommendation"] == len(bench.splits["train"]["target"])
  finally:
    tasks.unregister_dataset_tasks("pt_regen")
  assert not [n for n in seqio.TaskRegistry.names() if n.startswith("pt_regen_")]
