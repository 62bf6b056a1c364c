"""Mender_Emb and Mender_Tok: the preference decides the target where the history cannot;
negatives (sign -1) push their ID's likelihood down; model_examples' layouts; Mender_Tok's
text rendering and its on-disk token-state cache (tiny sizes)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from recjax.evaluation import preferences as prefs_lib
from recjax.models import beam_search as bs
from recjax.models import mender, rqvae, tiger

NUM_ITEMS, DIM, PREFS = 30, 8, 4


def make_sids(num_items: int, sizes=(3, 3, 8), seed: int = 0) -> rqvae.SemanticIds:
  rng = np.random.default_rng(seed)
  codes = rqvae.add_unique_level(rng.integers(0, sizes[0], (num_items, len(sizes) - 1)), sizes[-1])
  full = np.full((num_items + 2, len(sizes)), -1, np.int32)
  full[2:] = codes
  offsets = rqvae.token_offsets(sizes)
  return rqvae.SemanticIds(codes=full, metadata={"codebook_sizes": list(sizes), "offsets": offsets,
                                                  "vocab_size": offsets[-1] + sizes[-1]})


def toy_split(n: int, seed: int, sign: float = 1.0) -> dict:
  """Random histories; the target is a fixed item per preference (2 + 5 * p)."""
  rng = np.random.default_rng(seed)
  history = np.zeros((n, 6), np.int32)
  lens = rng.integers(1, 7, n)  # up to 6: longer than max_items 5
  for r, m in enumerate(lens):
    history[r, :m] = rng.integers(2, NUM_ITEMS + 2, m)
  prefs = np.full((n, 2), -1, np.int32)
  prefs[:, 0] = rng.integers(0, PREFS, n)
  return {"user": np.arange(n, dtype=np.int32), "history": history, "preferences": prefs,
          "target": (2 + 5 * prefs[:, 0]).astype(np.int32), "sign": np.full(n, sign, np.float32)}


@pytest.fixture(scope="module")
def setup():
  sids = make_sids(NUM_ITEMS)
  rng = np.random.default_rng(1)
  item_emb = rng.normal(size=(NUM_ITEMS + 2, DIM)).astype(np.float32)
  item_emb[:2] = 0
  pref_emb = rng.normal(size=(PREFS, DIM)).astype(np.float32)
  sizes = dict(max_items=5, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=1)
  return sids, item_emb, pref_emb, sizes


def _train_eval(model, sids, train, test, frozen_in, steps=150):
  trainer, state, _ = tiger.train_tiger(model, mender.model_examples(train, sids.tokens, model), steps=steps,
                                        batch_size=32, learning_rate=3e-3, warmup_steps=10, log_every=steps,
                                        frozen_inputs=frozen_in)
  net = trainer.network(state.params)
  with jax.set_mesh(trainer.mesh):
    got = tiger.evaluate_tiger(model, net, mender.model_examples(test, sids.tokens, model), bs.trie_tables_of(sids),
                               num_beams=4, ks=(1,), frozen=trainer.frozen if frozen_in else None,
                               return_items=True)
  return got, trainer, state


def test_model_examples_layouts(setup):
  sids, _, _, sizes = setup
  split = toy_split(10, 0)
  t = mender.model_examples(split, sids.tokens, tiger.Tiger(vocab_size=sids.vocab_size, **sizes))
  assert t["encoder_tokens"].shape == (10, 5 * 3) and "preferences" not in t
  # The most recent max_items of the 6 history slots are kept; pads have no tokens.
  np.testing.assert_array_equal(t["encoder_mask"], t["encoder_tokens"] > 0)
  m = mender.model_examples(split, sids.tokens, mender.MenderEmb(vocab_size=sids.vocab_size, embed_dim=DIM,
                                                                 num_preferences=3, **sizes))
  assert m["history"].shape == (10, 5) and m["preferences"].shape == (10, 3)
  for r in range(10):  # the most recent 5 real items, still oldest first and right-padded
    real = split["history"][r][split["history"][r] > 0]
    np.testing.assert_array_equal(m["history"][r], np.pad(real[-5:], (0, 5 - len(real[-5:]))))
  np.testing.assert_array_equal(mender.recent_items(np.array([[5, 6, 7, 8, 9, 10], [5, 0, 0, 0, 0, 0]]), 3),
                                [[8, 9, 10], [5, 0, 0]])
  assert (m["preferences"][:, 2] == -1).all() and (m["preferences"][:, 0] == split["preferences"][:, 0]).all()
  np.testing.assert_array_equal(m["targets"], sids.tokens[split["target"]])


def test_the_preference_steers_the_generated_item(setup):
  sids, item_emb, pref_emb, sizes = setup
  train, test = toy_split(512, 0), toy_split(64, 1)
  model = mender.MenderEmb(vocab_size=sids.vocab_size, embed_dim=DIM, num_preferences=2, **sizes)
  frozen = mender.MenderEmb.frozen_tables(item_emb, pref_emb, sids.tokens)
  got, _, _ = _train_eval(model, sids, train, test, frozen)
  assert got["recall@1"] > 0.95, got
  # TIGER sees only the (uninformative) history: it cannot beat always guessing one item.
  base, _, _ = _train_eval(tiger.Tiger(vocab_size=sids.vocab_size, **sizes), sids, train, test, None)
  best_constant = np.bincount(test["target"]).max() / len(test["target"])
  assert base["recall@1"] <= best_constant + 0.1 < got["recall@1"]


def test_negative_rows_push_the_target_down(setup):
  sids, item_emb, pref_emb, sizes = setup
  model = mender.MenderEmb(vocab_size=sids.vocab_size, embed_dim=DIM, num_preferences=2, **sizes)
  frozen = mender.MenderEmb.frozen_tables(item_emb, pref_emb, sids.tokens)
  pos = toy_split(512, 0)
  # Preference 3 appears only in negatives: "not item 17" must stop producing item 17.
  neg = toy_split(512, 2, sign=-1.0)
  keep = pos["preferences"][:, 0] != 3
  pos = {k: v[keep] for k, v in pos.items()}
  neg = {k: v[neg["preferences"][:, 0] == 3] for k, v in neg.items()}
  test = toy_split(64, 3)
  test = {k: v[test["preferences"][:, 0] == 3] for k, v in test.items()}
  with_neg, _, _ = _train_eval(model, sids, mender.concat_splits(pos, neg), test, frozen)
  assert with_neg["recall@1"] < 0.05
  assert with_neg["items"].shape == (len(test["target"]), 1)


def test_mender_command_reports_every_axis(synthetic_prepared, with_random_ids):
  import json
  import os
  import subprocess
  import sys
  from recjax.artifacts import manifest, preference_benchmark, text_embeddings
  data = with_random_ids(synthetic_prepared["synthetic_regen"])
  if "minilm" not in manifest.find(data, "text_embeddings"):  # the copied dataset may hold it already
    text_embeddings.fit(data, "minilm")
  preference_benchmark.fit(data, "steer", held_out_splits=("test_fine_steering", "test_coarse_steering"))
  cmd = [sys.executable, "-m", "recjax.main", "mender", "--data", str(data), "--ids", "rand", "--steps", "10",
         "--models", "tiger,mender_emb,mender_emb_extras,mender_tok", "--text_length", "16",
         "--batch_size", "32", "--d_model", "16", "--d_kv", "8", "--num_heads", "2", "--d_ff", "32",
         "--num_layers", "1", "--num_beams", "10", "--held_out", "test_fine_steering,test_coarse_steering",
         "--benchmark", "steer"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  data_row = rows[0]
  assert data_row["held_out"] == ["test_fine_steering", "test_coarse_steering"]
  assert (data / "artifacts" / "preference_benchmark" / "steer" / "manifest.json").is_file()
  tests = {r["model"]: r for r in rows if r.get("event") == "test"}
  assert set(tests) == {"tiger", "mender_emb", "mender_emb_extras", "mender_tok"}
  text = next(r for r in rows if r.get("event") == "text")
  # One text per distinct example of the train and test splits (not valid_recommendation).
  assert text["rows"]["train"] == data_row["splits"]["train"] and "valid_recommendation" not in text["rows"]
  assert 0 < text["texts"] <= sum(text["rows"].values()) and not text["cached"]
  assert len(list((data / "text_cache").glob("text-*/states.npy"))) == 1
  for r in tests.values():
    for axis in ("recommendation", "fine_steering", "coarse_steering", "consolidation"):
      assert r[axis]["count"] == data_row["splits"][f"test_{axis}"] > 0
      assert 0.0 <= r[axis]["recall@5"] <= r[axis]["recall@10"] <= 1.0
    assert r["sentiment"]["count"] == data_row["splits"]["test_sentiment_positive"]
  # A saved benchmark built with other held-out splits is refused, not silently reused.
  bad = subprocess.run(cmd[:-4] + ["--held_out", "all", "--benchmark", "steer", "--steps", "1"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert bad.returncode != 0 and "holds out" in bad.stderr


# -- Mender_Tok ---------------------------------------------------------------------------

STATEMENTS = ["Likes kitchen tools", "Prefers red items", "Avoid wool", "Trusts Acme"]


@pytest.fixture(scope="module")
def tok_setup(tmp_path_factory):
  from recjax.models import text as text_lib
  sids = make_sids(NUM_ITEMS)
  titles = ["", ""] + [f"gadget {w} model" for w in _WORDS[:NUM_ITEMS]]
  encoder = text_lib.load_text_encoder("minilm")
  sizes = dict(max_items=5, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=1)
  model = mender.MenderTok(vocab_size=sids.vocab_size, text_length=24, text_dim=encoder.dim, num_preferences=2,
                           **sizes)
  bench = prefs_lib.Benchmark(preferences=STATEMENTS, pref_embeddings=np.zeros((PREFS, 1), np.float32),
                              item_embeddings=np.zeros((NUM_ITEMS + 2, 1), np.float32),
                              splits={"train": toy_split(512, 0), "test_recommendation": toy_split(64, 1)})
  cache_dir = tmp_path_factory.mktemp("text_cache")
  built = mender.tok_text_table(bench, titles, model, encoder, cache_dir, ["train", "test_recommendation"])
  return sids, titles, encoder, model, bench, cache_dir, built


_WORDS = ("apple banana cherry delta echo falcon garnet harbor indigo jasper kiwi lemon mango nectar olive "
          "pepper quartz raven saffron tulip umber violet walnut xenon yarrow zinnia amber basil cedar dune").split()


def test_tok_text_puts_the_newest_items_first_and_truncates_the_oldest(tok_setup):
  _, titles, encoder, model, _, _, _ = tok_setup
  split = {"history": np.array([[2, 3, 4, 5, 6, 7, 0]]), "preferences": np.array([[1, 3]])}
  text, = mender.render_texts(split, STATEMENTS, titles, max_items=5, num_preferences=2)
  # max_items keeps the 5 most recent (item 2 is dropped), listed newest first.
  assert text == ("Preference: Prefers red items; Trusts Acme. History: gadget falcon model; gadget echo model; "
                  "gadget delta model; gadget cherry model; gadget banana model")
  one, = mender.render_texts(split, STATEMENTS, titles, max_items=5, num_preferences=1)
  assert one.startswith("Preference: Prefers red items. History:")
  # Token truncation (text_length) then loses the oldest titles, never the preference or the newest.
  ids, _ = encoder.tokenize([text], model.text_length)
  word = lambda w: encoder.tokenize([w], 3)[0][0, 1]
  assert word("falcon") in ids and word("red") in ids and word("banana") not in ids


def test_tok_text_cache_is_reused(tok_setup, monkeypatch):
  _, titles, encoder, model, bench, cache_dir, (tok_bench, frozen, info) = tok_setup
  assert not info["cached"] and info["rows"] == {"train": 512, "test_recommendation": 64}
  # One row per distinct text: equal texts share a row.
  texts = mender.render_texts(bench.splits["train"], STATEMENTS, titles, max_items=5, num_preferences=2)
  assert info["texts"] == len(set(texts + mender.render_texts(bench.splits["test_recommendation"], STATEMENTS,
                                                              titles, max_items=5, num_preferences=2)))
  assert frozen["tok_states"][0].shape == (info["texts"], 24, encoder.dim)
  monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("re-encoded a cached text table"))
  # Another split order reads the same entry (texts are deduplicated and sorted).
  again, frozen2, info2 = mender.tok_text_table(bench, titles, model, encoder, cache_dir,
                                                ["test_recommendation", "train"])
  assert info2["cached"] and len(list(cache_dir.glob("text-*"))) == 1
  np.testing.assert_array_equal(again.splits["train"]["text"], tok_bench.splits["train"]["text"])
  np.testing.assert_array_equal(np.asarray(frozen2["tok_states"][0]), np.asarray(frozen["tok_states"][0]))


def test_tok_the_preference_text_steers_the_generated_item(tok_setup):
  sids, _, _, model, _, _, (tok_bench, frozen, _) = tok_setup
  got, _, _ = _train_eval(model, sids, tok_bench.splits["train"], tok_bench.splits["test_recommendation"], frozen)
  assert got["recall@1"] > 0.95, got


def test_tok_with_and_without_the_trainable_encoder(tok_setup):
  import dataclasses
  from flax import nnx
  sids, _, _, model, _, _, (tok_bench, frozen, _) = tok_setup
  assert model.network(nnx.Rngs(0)).encoder is None  # the default: no unused encoder weights
  bare = dataclasses.replace(model, trainable_encoder=True)
  net = bare.network(nnx.Rngs(0))
  assert net.encoder is not None
  batch = {"text": tok_bench.splits["train"]["text"][:2], "frozen": {k: v for k, (v, _) in frozen.items()}}
  memory, mask = bare.memory(net, batch)
  assert memory.shape == (2, 24, 32) and np.isfinite(np.asarray(memory)).all()
  np.testing.assert_array_equal(mask, np.asarray(frozen["tok_mask"][0])[batch["text"]])
