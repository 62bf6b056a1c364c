"""Text-to-text tasks (ReAT, REGEN/LUMEN): golden prompts, sampling invariants, determinism."""

import collections
import shutil
import uuid

import numpy as np
import pytest
import seqio
import tensorflow as tf

from recjax.data import prepare, prepared
from recjax.data import preprocessors as P
from recjax.data import vocab
from recjax.data.formats.common import BadLines, Interaction, Item, Source, UserInfo
from recjax.tasks import text

LENGTHS = {"inputs": 1024, "targets": 128}

# --- a hand-built tiny dataset -------------------------------------------------------

_ITEMS = [Item("a", title="Red Pen", categories=("Office", "Pens")),
          Item("b", title="Blue Pen", categories=("Office", "Pens")),
          Item("c", title="Black Notebook", categories=("Office", "Paper")),
          Item("d", title="Stapler", categories=("Office", "Tools")),
          Item("e", title="Paper Clips", categories=("Office", "Tools")),
          Item("f", title="Desk Lamp", categories=("Office", "Lighting"))]
# (user, item, rating, critique, endorsement); ids: a..f -> 2..7 ("I2".."I7"), u1..u3 -> 0..2
_EVENTS = [("u1", "a", 5.0, None, None), ("u1", "b", 2.0, "Do you have it in blue?", "A blue pen that writes smoothly."),
           ("u1", "c", 4.0, None, None), ("u1", "d", 5.0, None, "A sturdy stapler for your desk."),
           ("u2", "b", 4.0, None, None), ("u2", "c", 1.0, None, None), ("u2", "e", 5.0, None, None),
           ("u2", "f", 3.0, "Something to light my desk?", None),
           ("u3", "a", 4.0, None, None), ("u3", "c", 5.0, None, None), ("u3", "f", 2.0, None, None)]
_USERS = [UserInfo("u1", {"purchase_reason": "Needed a stapler for the office.", "profile": "An office worker."}),
          UserInfo("u2", {"purchase_reason": "Wanted light.", "profile": "Works late at a desk."}),
          UserInfo("u3", {"purchase_reason": "Reading at night.", "profile": "A student."})]


def _build_tiny(out, ratings=True):
  def interactions():
    for order, (u, i, r, c, e) in enumerate(_EVENTS):
      yield Interaction(user=u, item=i, order=order, timestamp=order, rating=r if ratings else None,
                        critique=c, endorsement=e)
  source = Source(format="test", interactions=interactions, items=lambda: iter(_ITEMS),
                  users=lambda: iter(_USERS))
  manifest = prepare.build(source, out, prepare.PrepareOptions(), BadLines())
  prepare._write_manifest(out, manifest)
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  name = "tiny_" + uuid.uuid4().hex[:8]
  names = text.register(name, _build_tiny(root / "tiny"))
  yield name, names, root / "tiny"
  text.unregister(names)


@pytest.fixture(scope="module")
def synthetic(synthetic_prepared, tmp_path_factory):
  """The shared synthetic datasets, copied (vocabularies are written into the dataset dir)."""
  root = tmp_path_factory.mktemp("text_synthetic")
  out = {}
  for key, src in synthetic_prepared.items():
    shutil.copytree(src, root / key)
    name = f"{key}_{uuid.uuid4().hex[:8]}"
    out[key] = (name, text.register(name, root / key), root / key)
  yield out
  for _, names, _ in out.values():
    text.unregister(names)


def examples(name, split="train", lengths=LENGTHS, seed=0, shuffle=False, limit=None):
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=shuffle, seed=seed)
  if limit:
    ds = ds.take(limit)
  return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def by_user(exs):
  return {int(ex["user_id"]): ex for ex in exs}


def vocabulary(name):
  return seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary


def assert_tokens_match_text(name, ex, feature="inputs"):
  # Pieces are tokenized separately; the result must equal tokenizing the whole text.
  ids = list(ex[feature])
  assert ids[-1] == 1  # EOS
  assert vocabulary(name).encode(ex[feature + "_pretokenized"]) == ids[:-1]


# --- golden prompts ----------------------------------------------------------------------

HISTORY_A = "Item ID: I2, Title: Red Pen"
HISTORY_AB = "Item ID: I2, Title: Red Pen; Item ID: I3, Title: Blue Pen"


def test_task_names(tiny, tmp_path):
  name, names, _ = tiny
  reat = [f"{name}_reat_{f}" for f in ("retrieval", "ranking", "rating", "mim", "mlm", "bpr")]
  regen = [f"{name}_{k}_{n}" for n in ("purchase_reason", "profile", "endorsement")
           for k in ("lumen", "narrative")]
  regen += [f"{name}_lumen_{n}_no_critiques" for n in ("purchase_reason", "profile", "endorsement")]
  mixtures = [f"{name}_{m}" for m in ("reat", "raat", "rpat", "ut", "ut_at")]
  lumen = [f"{name}_{m}" for m in ("lumen", "lumen_no_critiques", "narrative")]
  assert sorted(names) == sorted(reat + regen + mixtures + lumen)
  # LUMEN's mixtures: the LUMEN_NARRATIVES the source has, mixed by their training examples.
  mix = seqio.get_mixture_or_task(f"{name}_lumen")
  assert sorted(t.name for t in mix.tasks) == [f"{name}_lumen_endorsement", f"{name}_lumen_purchase_reason"]
  for t in mix.tasks:
    assert mix.get_rate(t) == len(examples(t.name)) > 0
  raat = seqio.get_mixture_or_task(f"{name}_raat")
  rates = {t.name.rsplit("_reat_", 1)[1]: raat.get_rate(t) for t in raat.tasks}
  assert rates == {"ranking": 1.0, "mim": 1.0, "mlm": 1.0, "bpr": 1.0}
  # Without ratings there is no rating task, no RpAT, and UT is retrieval + ranking.
  other = "noratings_" + uuid.uuid4().hex[:8]
  names2 = text.register(other, _build_tiny(tmp_path / "nr", ratings=False))
  try:
    assert f"{other}_reat_rating" not in names2 and f"{other}_rpat" not in names2
    ut = seqio.get_mixture_or_task(f"{other}_ut")
    assert sorted(t.name for t in ut.tasks) == [f"{other}_reat_ranking", f"{other}_reat_retrieval"]
  finally:
    text.unregister(names2)


def test_golden_retrieval(tiny):
  name = tiny[0] + "_reat_retrieval"
  train = examples(name)
  assert [(int(e["user_id"]), int(e["position"])) for e in train] == [(0, 1), (1, 1)]  # u3's prefix has one item
  ex = by_user(train)[0]
  assert ex["inputs_pretokenized"] == (
      "Here is the purchase history of a user, oldest first: Item ID: I2, Title: Red Pen. "
      "Predict the next item the user will buy. Answer with its item ID.")
  assert ex["targets_pretokenized"] == "I3"
  assert int(ex["example_id"]) == 1  # user 0, position 1
  ex = by_user(examples(name, "validation"))[0]
  assert ex["inputs_pretokenized"] == RETRIEVAL_AB
  assert ex["targets_pretokenized"] == "I4"
  assert_tokens_match_text(name, ex)
  assert_tokens_match_text(name, ex, "targets")
  assert by_user(examples(name, "test"))[0]["targets_pretokenized"] == "I5"


RETRIEVAL_AB = ("Here is the purchase history of a user, oldest first: Item ID: I2, Title: Red Pen; "
                "Item ID: I3, Title: Blue Pen. Predict the next item the user will buy. Answer with its item ID.")


def test_golden_rating(tiny):
  ex = by_user(examples(tiny[0] + "_reat_rating"))[0]
  assert ex["inputs_pretokenized"] == (
      "Here is the purchase history of a user, oldest first: Item ID: I2, Title: Red Pen. "
      "Will the user like Item ID: I3, Title: Blue Pen? Answer yes or no.")
  assert ex["targets_pretokenized"] == "no"  # rated 2
  assert by_user(examples(tiny[0] + "_reat_rating", "validation"))[0]["targets_pretokenized"] == "yes"  # 4 > 3
  assert by_user(examples(tiny[0] + "_reat_rating", "test"))[1]["targets_pretokenized"] == "no"  # exactly 3


def test_golden_ranking(tiny):
  ex = by_user(examples(tiny[0] + "_reat_ranking"))[0]
  # u1 bought a-d; only e and f (I6, I7) are left as negatives in this 6-item catalog.
  order = [f"I{i}" for i in ex["candidates"]]
  assert sorted(order) == ["I3", "I6", "I7"]
  assert ex["inputs_pretokenized"] == (
      "Here is the purchase history of a user, oldest first: Item ID: I2, Title: Red Pen. "
      f"Candidates: {', '.join(order)}. Which candidate will the user buy next? Answer with its item ID.")
  assert ex["targets_pretokenized"] == "I3"
  assert P.RANKING_TEMPLATE.format(history=HISTORY_A, candidates=", ".join(order)) == ex["inputs_pretokenized"]


def test_golden_mim(tiny):
  ex = by_user(examples(tiny[0] + "_reat_mim"))[0]
  head = "Here is the purchase history of a user, oldest first, with some items hidden as [masked item]: "
  tail = ". Recover the hidden items in order. Answer with their item IDs."
  expected = {"I2": head + "[masked item]; Item ID: I3, Title: Blue Pen" + tail,
              "I3": head + "Item ID: I2, Title: Red Pen; [masked item]" + tail}
  assert ex["inputs_pretokenized"] == expected[ex["targets_pretokenized"]]
  assert list(ex["masked"]) == [ex["targets_pretokenized"] == "I2", ex["targets_pretokenized"] == "I3"]


def test_golden_bpr(tiny):
  ex = by_user(examples(tiny[0] + "_reat_bpr"))[0]
  a, b = (int(i) for i in ex["candidates"])
  assert 3 in (a, b) and ({a, b} - {3}) <= {6, 7}
  text_of = {3: "Item ID: I3, Title: Blue Pen", 6: "Item ID: I6, Title: Paper Clips", 7: "Item ID: I7, Title: Desk Lamp"}
  assert ex["inputs_pretokenized"] == (
      "Here is the purchase history of a user, oldest first: Item ID: I2, Title: Red Pen. "
      f"Which of these two items will the user buy next? A: {text_of[a]}. B: {text_of[b]}. "
      "Answer with its item ID.")
  assert ex["targets_pretokenized"] == "I3"


def test_golden_mlm_text_and_round_trip(tiny):
  name = tiny[0] + "_reat_mlm"
  ex = by_user(examples(name))[0]
  assert ex["text"] == HISTORY_AB + "."
  tokens = vocabulary(name).encode(ex["text"])
  assert reconstruct(list(ex["inputs"][:-1]), list(ex["targets"][:-1]), vocabulary(name).vocab_size) == tokens


def reconstruct(inputs, targets, vocab_size):
  """Undoes span corruption: each sentinel in inputs -> its span from targets."""
  spans, current = {}, None
  for t in targets:
    if t >= vocab_size - 100:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out.extend(spans[t] if t >= vocab_size - 100 else [t])
  return out


def _user_in(split):
  return [u for u, s in enumerate(P.narrative_split_of_users(np.arange(3))) if s == split]


def _find(name, user):
  for split in ("train", "validation", "test"):
    exs = by_user(examples(name, split))
    if user in exs:
      return split, exs[user]
  raise AssertionError(f"user {user} not in any split of {name}")


def test_golden_lumen_per_user(tiny):
  name = tiny[0] + "_lumen_purchase_reason"
  split, ex = _find(name, 0)
  assert split == P.narrative_split_of_users(np.array([0]))[0]
  assert ex["inputs_pretokenized"] == (
      "Shopping history, oldest first: Item: <item> Red Pen (Pens); User: Do you have it in blue? "
      "Item: <item> Blue Pen (Pens); Item: <item> Black Notebook (Paper). "
      "Recommend the next item and give the reason for the purchase.")
  assert ex["targets_pretokenized"] == "ID: <item> Text: Needed a stapler for the office."
  assert list(ex["inputs_item_ids"]) == [2, 3, 4] and list(ex["targets_item_ids"]) == [5]
  placeholder = P.item_placeholder_id(vocabulary(name))
  assert list(ex["inputs"]).count(placeholder) == 3 and list(ex["targets"]).count(placeholder) == 1
  assert_tokens_match_text(name, ex)
  # The critique that led to the last purchase is the user's request.
  _, ex = _find(tiny[0] + "_lumen_profile", 1)
  assert ex["inputs_pretokenized"] == (
      "Shopping history, oldest first: Item: <item> Blue Pen (Pens); Item: <item> Black Notebook (Paper); "
      "Item: <item> Paper Clips (Tools). User: Something to light my desk? "
      "Recommend the next item and describe the user's shopping profile.")
  assert ex["targets_pretokenized"] == "ID: <item> Text: Works late at a desk."


def test_golden_narrative_given_item(tiny):
  _, ex = _find(tiny[0] + "_narrative_purchase_reason", 0)
  assert ex["inputs_pretokenized"] == (
      "Shopping history, oldest first: Item: <item> Red Pen (Pens); User: Do you have it in blue? "
      "Item: <item> Blue Pen (Pens); Item: <item> Black Notebook (Paper). "
      "The next item is Item: <item> Stapler (Tools). Give the reason the user bought it.")
  assert ex["targets_pretokenized"] == "Needed a stapler for the office."
  assert list(ex["inputs_item_ids"]) == [2, 3, 4, 5]


def test_golden_endorsement_is_per_step(tiny):
  name = tiny[0] + "_lumen_endorsement"
  train = examples(name)
  assert [int(e["user_id"]) for e in train] == [0]  # the only train step with an endorsement
  assert train[0]["inputs_pretokenized"] == (
      "Shopping history, oldest first: Item: <item> Red Pen (Pens). User: Do you have it in blue? "
      "Recommend the next item and write an endorsement of it for the user.")
  assert train[0]["targets_pretokenized"] == "ID: <item> Text: A blue pen that writes smoothly."
  assert examples(name, "validation") == []  # c has no endorsement
  test = examples(name, "test")
  assert [int(e["user_id"]) for e in test] == [0] and list(test[0]["targets_item_ids"]) == [5]
  # The no-critique variant: the same example, the critique left out of the prompt.
  plain = examples(name + "_no_critiques")
  assert plain[0]["inputs_pretokenized"] == (
      "Shopping history, oldest first: Item: <item> Red Pen (Pens). "
      "Recommend the next item and write an endorsement of it for the user.")
  assert plain[0]["targets_pretokenized"] == train[0]["targets_pretokenized"]
  ex = examples(tiny[0] + "_narrative_endorsement", "test")[0]
  assert ex["inputs_pretokenized"].endswith(
      "The next item is Item: <item> Stapler (Tools). Write an endorsement of it for the user.")
  assert ex["targets_pretokenized"] == "A sturdy stapler for your desk."


def test_templates_are_plain_format_strings():
  assert P.RETRIEVAL_TEMPLATE.format(history=HISTORY_AB) == RETRIEVAL_AB
  assert P.LUMEN_TARGET_TEMPLATE.format(placeholder="<item>", narrative="x") == "ID: <item> Text: x"


# --- truncation -------------------------------------------------------------------------


def test_long_histories_drop_oldest_items_and_keep_the_question(synthetic):
  name, _, _ = synthetic["synthetic_regen"]
  for task, tail in (("_reat_retrieval", "Answer with its item ID."),
                     ("_lumen_long_summary", "summarize the user's purchase history in detail.")):
    full = examples(name + task, "test", limit=40)
    short = examples(name + task, "test", lengths={"inputs": 96, "targets": 64}, limit=40)
    cut = 0
    for f, s in zip(full, short):
      assert len(s["inputs"]) <= 96 and s["inputs_pretokenized"].endswith(tail)
      assert f["inputs_pretokenized"].endswith(s["inputs_pretokenized"][s["inputs_pretokenized"].index(": ") + 2:])
      assert_tokens_match_text(name + task, s)
      cut += len(s["inputs"]) < len(f["inputs"])
      if "inputs_item_ids" in s:
        placeholder = P.item_placeholder_id(vocabulary(name + task))
        assert list(s["inputs"]).count(placeholder) == len(s["inputs_item_ids"])
        np.testing.assert_array_equal(s["inputs_item_ids"], s["history"][len(s["history"]) - len(s["inputs_item_ids"]):])
    assert cut > 10


# --- sampling invariants on the synthetic data ----------------------------------------


def _user_items(data_dir):
  seqs = prepared.PreparedDataset(data_dir).sequences(["items"]).column("items").to_pylist()
  return [set(s) for s in seqs]


def test_ranking_negatives(synthetic):
  name, _, data_dir = synthetic["synthetic"]
  user_items = _user_items(data_dir)
  ds = prepared.PreparedDataset(data_dir)
  exs = examples(name + "_reat_ranking", limit=400) + examples(name + "_reat_ranking", "test")
  positions, full = collections.Counter(), 0
  count = ds.items(["item_id", "train_count"]).to_pydict()
  popularity = dict(zip(count["item_id"], count["train_count"]))
  neg_pop, all_pop = [], []
  for ex in exs:
    cands = [int(c) for c in ex["candidates"]]
    mine = user_items[int(ex["user_id"])]
    negatives = [c for c in cands if c != ex["target"]]
    assert cands.count(int(ex["target"])) == 1
    assert len(set(cands)) == len(cands)
    assert not mine & set(negatives)
    assert all(2 <= c < ds.vocab_size for c in cands)
    assert len(cands) == min(100, 1 + ds.num_items - len(mine))  # small catalog: every other item
    full += len(cands) == 100
    positions[cands.index(int(ex["target"]))] += 1
    assert ex["targets_pretokenized"] == f"I{int(ex['target'])}"
    neg_pop += [popularity[c] for c in negatives[:10]]
    all_pop += [popularity[c] for c in range(2, ds.vocab_size) if c not in mine]
  assert full > 100
  assert len(positions) > 50  # the positive lands anywhere
  assert np.mean(neg_pop) > np.mean(all_pop)  # popularity-weighted


def test_sample_negatives_large_catalog():
  logits = tf.constant(P.popularity_logits(np.r_[0, 0, np.arange(1, 1001)]))
  exclude = tf.constant([5, 7, 9, 1001, 1001], tf.int32)
  for i in range(5):
    key = P.example_key(0, 1, 0, i)
    neg = P.sample_negatives(key, logits, exclude, 99).numpy()
    assert len(neg) == 99 and len(set(neg)) == 99
    assert not set(neg) & {0, 1, 5, 7, 9, 1001}
  # Everything but the excluded items, when fewer than k remain.
  neg = P.sample_negatives(P.example_key(0, 1, 0, 0), logits[:8], tf.constant([2, 3]), 99).numpy()
  assert sorted(neg) == [4, 5, 6, 7]


def test_bpr_negative_not_bought(synthetic):
  name, _, data_dir = synthetic["synthetic"]
  user_items = _user_items(data_dir)
  firsts = collections.Counter()
  for ex in examples(name + "_reat_bpr", limit=300):
    a, b = (int(c) for c in ex["candidates"])
    target = int(ex["target"])
    assert target in (a, b) and a != b
    assert (b if a == target else a) not in user_items[int(ex["user_id"])]
    firsts[a == target] += 1
  assert min(firsts.values()) > 100  # random order


def test_mim_rate_and_order(synthetic):
  name, _, _ = synthetic["synthetic"]
  masked = total = 0
  for ex in examples(name + "_reat_mim", limit=500):
    items = list(ex["history"]) + [int(ex["target"])]
    m = list(ex["masked"])
    assert len(m) == len(items)  # nothing cut at this length
    assert sum(m) == max(1, int(np.floor(0.2 * len(items) + 0.5)))
    hidden = [f"I{i}" for i, x in zip(items, m) if x]
    assert ex["targets_pretokenized"] == ", ".join(hidden)
    assert ex["inputs_pretokenized"].count("[masked item]") == len(hidden) + 1  # +1: the instruction
    masked += sum(m)
    total += len(items)
  assert 0.18 < masked / total < 0.3


def test_span_corruption_round_trip_and_density(synthetic):
  name, _, _ = synthetic["synthetic"]
  size = vocabulary(name + "_reat_mlm").vocab_size
  full = {"inputs": 2048, "targets": 512}  # room for the whole window: no crop
  for lengths in (full, {"inputs": 64, "targets": 16}):
    for ex in examples(name + "_reat_mlm", "test", lengths=lengths, limit=50):
      assert len(ex["inputs"]) <= lengths["inputs"] and len(ex["targets"]) <= lengths["targets"]
      tokens = vocabulary(name + "_reat_mlm").encode(ex["text"])
      restored = reconstruct(list(ex["inputs"][:-1]), list(ex["targets"][:-1]), size)
      if lengths is full:
        assert restored == tokens
      else:  # a random crop of the rendered window
        n = len(restored)
        assert any(tokens[s:s + n] == restored for s in range(len(tokens) - n + 1))
  for n in (2, 10, 57, 300):
    mask = P.span_noise_mask(P.example_key(0, 3, 0, n), tf.constant(n)).numpy()
    noise, spans = P.span_noise_counts(n)
    assert mask.sum() == noise and not mask[0]
    assert np.sum(mask[1:] & ~mask[:-1]) == spans


# --- determinism ------------------------------------------------------------------------

_STOCHASTIC = ("_reat_ranking", "_reat_mim", "_reat_mlm", "_reat_bpr")


def _signature(ex):
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ex.items()
          if k in ("inputs", "targets", "candidates")}


def test_determinism_independent_of_order_and_fresh_per_seed(synthetic):
  name, _, _ = synthetic["synthetic"]
  for task in _STOCHASTIC:
    a = {int(e["example_id"]): _signature(e) for e in examples(name + task, "validation", seed=7)}
    b = {int(e["example_id"]): _signature(e) for e in examples(name + task, "validation", seed=7, shuffle=True,
                                                                limit=100)}
    c = {int(e["example_id"]): _signature(e) for e in examples(name + task, "validation", seed=8, limit=50)}
    assert len(b) == 100 and all(a[k] == b[k] for k in b)  # same draws in another run, whatever the order
    assert sum(a[k] != c[k] for k in c) > 0.5 * len(c)  # another epoch's seed: fresh draws


def test_epochs_through_the_pipeline(synthetic):
  from recjax.data import pipeline  # pylint: disable=g-import-not-at-top
  name, _, _ = synthetic["synthetic"]
  conv = seqio.EncDecFeatureConverter(pack=False)
  lengths = {"inputs": 512, "targets": 16}

  def batches(start, end):
    ds = pipeline.get_dataset(name + "_reat_ranking", split="validation", feature_converter=conv,
                              task_feature_lengths=lengths, batch_size=8, seed=3, start_epoch=start,
                              num_epochs=end, shard_info=seqio.ShardInfo(0, 1))
    return [b["encoder_input_tokens"] for b in ds.take(2).as_numpy_iterator()]

  e0, e1 = batches(0, 1), batches(1, 2)
  for x, y in zip(e0, batches(0, 1)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(e0, e1))


# --- every task and mixture through seqio's converters ---------------------------------


def _check_example(name, ex):
  for f in ("inputs", "targets"):
    assert ex[f].dtype == np.int32 and ex[f][-1] == 1 and len(ex[f]) > 1 and (ex[f][:-1] > 1).all(), (name, f)
  if "targets_item_ids" in ex and "target" in ex:  # a mixture keeps only the output features
    assert list(ex["targets_item_ids"]) == [ex["target"]]


def _check_packed(batch, lengths):
  assert batch["encoder_input_tokens"].shape[-1] == lengths["inputs"]
  assert batch["decoder_target_tokens"].shape[-1] == lengths["targets"]
  assert (batch["encoder_segment_ids"] > 0).any()
  # Every packed target ends with EOS, and EOS appears nowhere else.
  seg = batch["decoder_segment_ids"]
  following = np.concatenate([seg[..., 1:], np.zeros_like(seg[..., :1])], -1)
  assert ((batch["decoder_target_tokens"] == 1) == ((seg > 0) & (following != seg))).all()


@pytest.mark.parametrize("key", ["synthetic_regen", "synthetic"])
def test_every_task_and_mixture_packs(synthetic, key):
  # The REGEN dataset registers every family and mixture; the Amazon one re-checks ReAT
  # on a source without critiques / narratives (its mixtures are the same code).
  name, names, _ = synthetic[key]
  if key == "synthetic_regen":
    assert len(names) == 6 + 12 + 6 + 5 + 3  # ReAT, lumen + narrative, lumen without critiques, mixtures, LUMEN mixtures
  else:
    names = [n for n in names if "_reat_" in n]
  lengths = {"inputs": 1024, "targets": 256}
  pairs = []
  for n in names:
    ds = seqio.get_mixture_or_task(n).get_dataset(lengths, split="train", shuffle=False, seed=0)
    exs = list(ds.take(8).as_numpy_iterator())
    assert len(exs) == 8, n
    for ex in exs:
      _check_example(n, ex)
    pairs += [(ex["inputs"], ex["targets"]) for ex in exs]
  # One packing pass over every provider's examples (building the packer is the slow part).
  spec = tf.TensorSpec([None], tf.int32)
  ds = tf.data.Dataset.from_generator(lambda: ({"inputs": i, "targets": t} for i, t in pairs),
                                      output_signature={"inputs": spec, "targets": spec})
  packed = list(seqio.EncDecFeatureConverter(pack=True)(ds, lengths).batch(16).as_numpy_iterator())
  for batch in packed:
    _check_packed(batch, lengths)
  assert sum(int(b["decoder_segment_ids"].max(-1).sum()) for b in packed) == len(pairs)


def test_decoder_only_converters(synthetic):
  name, _, _ = synthetic["synthetic_regen"]
  lengths = {"inputs": 512, "targets": 128}
  for task in ("_reat", "_lumen_explanation"):
    ds = seqio.get_mixture_or_task(name + task).get_dataset(lengths, split="validation", shuffle=False, seed=0)
    ds = ds.take(8).cache()
    out = next(iter(seqio.PrefixLMFeatureConverter(pack=True)(ds, lengths)))
    assert out["decoder_target_tokens"].shape == [640]
    assert int(tf.reduce_sum(out["decoder_causal_attention"])) > 0
    out = next(iter(seqio.DecoderFeatureConverter(pack=True)(ds, lengths)))
    assert out["decoder_target_tokens"].shape == [640]


# --- REGEN user partition ----------------------------------------------------------------


def test_per_user_narrative_splits_partition_users(synthetic):
  name, _, data_dir = synthetic["synthetic_regen"]
  users = {s: [int(e["user_id"]) for e in examples(name + "_narrative_profile", s)]
           for s in ("train", "validation", "test")}
  seqs = prepared.PreparedDataset(data_dir).sequences(["items"]).column("items").to_pylist()
  assert sorted(sum(users.values(), [])) == list(range(len(seqs)))
  assert 0.05 < len(users["test"]) / len(seqs) < 0.16
  split_of = P.narrative_split_of_users(np.arange(len(seqs)))
  for s, us in users.items():
    assert all(split_of[u] == s for u in us)
  for ex in examples(name + "_lumen_profile", "test"):
    assert ex["target"] == seqs[int(ex["user_id"])][-1]  # the narrative's purchase


# --- vocabulary ---------------------------------------------------------------------------


def test_sentencepiece_training_is_deterministic(synthetic, tmp_path):
  _, _, data_dir = synthetic["synthetic_regen"]
  a = P.train_dataset_sentencepiece(data_dir, tmp_path / "a" / "spm", vocab_size=2000)
  b = P.train_dataset_sentencepiece(data_dir, tmp_path / "b" / "other", vocab_size=2000)
  assert open(a, "rb").read() == open(b, "rb").read()
  v = vocab.load_sentencepiece(a)
  assert len(v.encode("<item>")) == 1
  assert v.encode("I123")[1:] == [v.tokenizer.PieceToId(d) for d in "123"]  # digits split
  assert v.decode(v.encode("Bought: café ☕")) == "Bought: café ☕"  # byte fallback, no unk


def test_lazy_dataset_vocabulary_and_external_model(tiny, tmp_path):
  name, _, data_dir = tiny
  v = vocabulary(name + "_reat_retrieval")
  assert v.sentencepiece_model_file == str(P.dataset_sentencepiece_path(data_dir))
  assert P.dataset_sentencepiece_path(data_dir).parent == data_dir / "vocab"
  # A user's model (here one without <item>): the placeholder falls back to the last sentinel.
  ext = vocab.train_sentencepiece(["Red Pen Blue Pen I2 I3 1 2 3 4 5", "Item ID Title"], tmp_path / "ext",
                                  vocab_size=60, hard_vocab_limit=False)
  other = "ext_" + uuid.uuid4().hex[:8]
  names = text.register(other, data_dir, spm_model=ext)
  try:
    ev = vocabulary(other + "_lumen_profile")
    assert ev.sentencepiece_model_file == ext
    assert P.item_placeholder(ev) == "<extra_id_99>"
    exs = examples(other + "_lumen_profile", str(P.narrative_split_of_users(np.array([0]))[0]))
    ex = by_user(exs)[0]
    assert list(ex["inputs"]).count(P.item_placeholder_id(ev)) == len(ex["inputs_item_ids"]) == 3
  finally:
    text.unregister(names)
