"""TIGER and semantic-ID beam search: trie tables, beam search vs brute force, constrained
and unconstrained decoding, cached decoding vs the full forward pass, overfitting a
deterministic next-item rule, and examples from a prepared dataset (tiny sizes)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.models import beam_search as bs
from recjax.models import rqvae, tiger


def make_sids(num_items: int, sizes=(3, 3, 3, 4), seed: int = 0) -> rqvae.SemanticIds:
  """Random semantic IDs for items 2..num_items + 1 (3 random levels + the unique level)."""
  rng = np.random.default_rng(seed)
  codes = rqvae.add_unique_level(rng.integers(0, sizes[0], (num_items, len(sizes) - 1)), sizes[-1])
  full = np.full((num_items + 2, len(sizes)), -1, np.int32)
  full[2:] = codes
  offsets = rqvae.token_offsets(sizes)
  return rqvae.SemanticIds(codes=full, metadata={"codebook_sizes": list(sizes), "offsets": offsets,
                                                  "vocab_size": offsets[-1] + sizes[-1]})


def tiny_model(sids, **kw) -> tiger.Tiger:
  return tiger.Tiger(**{"vocab_size": sids.vocab_size, "max_items": 5, "d_model": 32, "d_kv": 16,
                        "num_heads": 2, "d_ff": 64, "num_layers": 1, **kw})


def test_trie_tables_agree_with_the_prefix_trie():
  sids = make_sids(30)
  tables = bs.trie_tables_of(sids)
  children = [np.asarray(t) for t in tables.children]
  sizes = sids.codebook_sizes
  for prefix in itertools.chain.from_iterable(
      itertools.product(*[range(s) for s in sizes[:l]]) for l in range(len(sizes))):
    node = 0
    for l, c in enumerate(prefix):  # walk the tables
      node = children[l][node, c] if node >= 0 else -1
    valid = np.flatnonzero(children[len(prefix)][node] >= 0) if node >= 0 else []
    np.testing.assert_array_equal(valid, sids.trie.valid_next(prefix))
  for item in range(2, 32):  # the last level's entries are the item ids
    c = sids.codes[item]
    node = 0
    for l in range(len(sizes)):
      node = children[l][node, c[l]]
    assert node == item


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _toy_logits(vocab: int, batch: int, buckets: int = 97, seed: int = 1):
  """A prefix-dependent toy model: logits = R[row, hash(prefix)], the hash updated per token
  (so the state is a [B * K] int array, reordered with the beams like a cache)."""
  table = np.random.default_rng(seed).normal(size=(batch, buckets, vocab)).astype(np.float32)
  update = lambda h, tok: (h * 31 + tok + 7) % buckets

  def step_fn(state, tokens):
    h = update(state["h"], tokens)
    return jnp.asarray(table)[state["row"], h], {"h": h, "row": state["row"]}

  def log_probs(row, prefixes):  # numpy reference: prefixes [n, l] (the start token implied)
    h = np.full(len(prefixes), update(0, 0))
    for j in range(prefixes.shape[1]):
      h = update(h, prefixes[:, j])
    return log_softmax(table[row, h])

  return step_fn, log_probs


@pytest.mark.parametrize("constrained", [True, False])
def test_beam_search_equals_brute_force_when_beams_cover_every_prefix(constrained):
  sids = make_sids(30)
  tables = bs.trie_tables_of(sids)
  b, k = 3, 27  # 27 = 3 x 3 x 3: every 3-token prefix survives, so the search is exact
  step_fn, log_probs = _toy_logits(sids.vocab_size, b)
  state = {"h": jnp.zeros(b * k, jnp.int32), "row": jnp.repeat(jnp.arange(b), k)}
  search = jax.jit(lambda st, t: bs.beam_search(step_fn, st, batch_size=b, num_beams=k, tables=t,
                                                constrained=constrained))
  tokens, scores, items = search(state, tables)
  for row in range(b):
    want_tokens, want_scores = bs.brute_force_top_k(lambda p: log_probs(row, p), tables, k, constrained)
    np.testing.assert_array_equal(tokens[row], want_tokens)
    np.testing.assert_allclose(scores[row], want_scores, rtol=1e-5)
  if constrained:  # 30 valid IDs >= 27 beams: all live, valid and distinct
    assert np.all(np.isfinite(scores)) and np.all(items >= 2)
    np.testing.assert_array_equal(np.asarray(sids.tokens)[np.asarray(items)], tokens)


@pytest.mark.parametrize("free", [False, True])
def test_narrow_beams_are_exact_for_prefix_independent_scores(free):
  # Unconstrained scores that do not depend on the prefix: the top-K sequences extend
  # top-K prefixes, so K beams find them exactly though far fewer sequences are kept.
  # free=True: every vocabulary token at every level (15^4 sequences).
  sids = make_sids(30)
  tables = bs.trie_tables_of(sids)
  b, k = 2, 5
  logits = np.random.default_rng(3).normal(size=(b, len(sids.codebook_sizes), sids.vocab_size)).astype(np.float32)

  def step_fn(state, tokens):
    del tokens
    return jnp.asarray(logits)[state["row"], state["pos"]], {"row": state["row"], "pos": state["pos"] + 1}

  state = {"row": jnp.repeat(jnp.arange(b), k), "pos": jnp.zeros(b * k, jnp.int32)}
  tokens, scores, items = bs.beam_search(step_fn, state, batch_size=b, num_beams=k, tables=tables,
                                         constrained=False, free=free)
  lsm = log_softmax(logits)
  for row in range(b):
    want_tokens, want_scores = bs.brute_force_top_k(lambda p: lsm[row, p.shape[1]][None].repeat(len(p), 0),
                                                    tables, k, constrained=False, free=free)
    np.testing.assert_array_equal(tokens[row], want_tokens)
    np.testing.assert_allclose(scores[row], want_scores, rtol=1e-5)
    recount = [sids.item_of(t - sids.offsets) or -1 for t in want_tokens]
    np.testing.assert_array_equal(items[row], recount)


def _generate(model, net, batch, tables, **kw):
  run = nnx.jit(lambda net, batch, tables: model.generate(net, batch, tables, **kw))
  return tuple(map(np.asarray, run(net, batch, tables)))


def _untrained(sids, seed=0, **kw):
  model = tiny_model(sids, **kw)
  net = model.network(nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(2, len(sids.codes), rng.integers(2, 8)) for _ in range(16)]
  batch = tiger.examples_from_sequences(seqs, sids.tokens, model, every_prefix=False)
  return model, net, {k: jnp.asarray(v) for k, v in batch.items()}


def test_constrained_search_returns_only_valid_distinct_items():
  sids = make_sids(10)  # 10 items, 16 beams: the last 6 beams must come back dead
  model, net, batch = _untrained(sids)
  tables = bs.trie_tables_of(sids)
  tokens, scores, items = _generate(model, net, batch, tables, num_beams=16)
  live = np.isfinite(scores)
  assert np.all(live[:, :10]) and not np.any(live[:, 10:])
  assert np.all(items[:, 10:] == -1)
  for row in range(len(items)):
    assert sorted(items[row, :10]) == list(range(2, 12))  # every item exactly once
    for k in range(10):
      assert sids.item_of(tokens[row, k] - sids.offsets) == items[row, k]
  assert np.all(np.diff(scores[:, :10], axis=1) <= 0)  # best first


def test_unconstrained_search_produces_invalid_ids_and_they_are_counted():
  sids = make_sids(30)  # 30 of the 108 possible code tuples are items
  model, net, batch = _untrained(sids, seed=1)
  tables = bs.trie_tables_of(sids)
  tokens, scores, items = _generate(model, net, batch, tables, num_beams=20, constrained=False)
  assert np.all(np.isfinite(scores))
  recount = np.array([[sids.item_of(t - sids.offsets) or -1 for t in row] for row in tokens])
  np.testing.assert_array_equal(items, recount)  # the in-jit trie walk maps IDs like item_of
  frac = float(bs.invalid_fraction(jnp.asarray(items), jnp.asarray(scores)))
  assert frac == pytest.approx(np.mean(recount < 0))
  assert 0 < frac < 1
  top = float(bs.invalid_fraction(jnp.asarray(items), jnp.asarray(scores), top=10))
  assert top == pytest.approx(np.mean(recount[:, :10] < 0))
  # Free decoding may also emit pad/eos or another level's token: invalid too.
  tokens, scores, items = _generate(model, net, batch, tables, num_beams=20, constrained=False, free=True)
  level_ok = (tokens >= sids.offsets) & (tokens < sids.offsets + np.asarray(sids.codebook_sizes))
  recount = np.array([[sids.item_of(t - sids.offsets) if ok.all() else None for t, ok in zip(r, o)]
                      for r, o in zip(tokens, level_ok)], dtype=object)
  recount = np.where(recount == None, -1, recount).astype(int)  # noqa: E711
  np.testing.assert_array_equal(items, recount)
  assert float(bs.invalid_fraction(jnp.asarray(items), jnp.asarray(scores))) == pytest.approx(np.mean(recount < 0))


def test_cached_decoding_equals_the_full_forward_pass():
  sids = make_sids(30)
  model, net, batch = _untrained(sids, seed=2, num_layers=2, user_buckets=7)
  memory = net.encode(batch["encoder_tokens"], batch["encoder_mask"])
  full = model.logits(net, batch)  # teacher forcing, one pass, causal mask
  b = batch["targets"].shape[0]
  cache, cross = net.init_cache(b), net.cross_cache(memory)
  inputs = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), batch["targets"][:, :-1]], 1)
  step = jax.jit(lambda c, t: net.decode_step(c, t, cross, batch["encoder_mask"]))
  for pos in range(model.id_length):
    logits, cache = step(cache, inputs[:, pos])
    np.testing.assert_allclose(logits, full[:, pos], atol=1e-4, rtol=1e-4)
  assert int(cache["pos"][0]) == model.id_length


def test_tiny_tiger_learns_a_deterministic_next_item_rule():
  n = 60
  sids = make_sids(n, sizes=(4, 4, 4, 8))
  rng = np.random.default_rng(0)
  nxt = rng.permutation(n) + 2  # item i is always followed by nxt[i - 2]
  seqs = []
  for _ in range(200):
    s = [int(rng.integers(2, n + 2))]
    for _ in range(7):
      s.append(int(nxt[s[-1] - 2]))
    seqs.append(s)
  model = tiny_model(sids)
  train = tiger.examples_from_sequences([s[:-1] for s in seqs], sids.tokens, model, every_prefix=True)
  test = tiger.examples_from_sequences(seqs, sids.tokens, model, every_prefix=False)
  assert len(train["weights"]) == 200 * 6 and len(test["weights"]) == 200
  trainer, state, history = tiger.train_tiger(model, train, steps=300, batch_size=64, learning_rate=3e-3,
                                              warmup_steps=20, log_every=100)
  assert history[-1]["loss"] < 0.2 * history[0]["loss"]
  net = trainer.network(state.params)
  tables = bs.trie_tables_of(sids)
  got = tiger.evaluate_tiger(model, net, test, tables, num_beams=12, ks=(1, 10), batch_size=64)
  assert got["count"] == 200 and got["recall@1"] > 0.9 and got["invalid_id_fraction"] == 0.0


def test_examples_from_a_prepared_dataset(synthetic_prepared, tmp_path):
  import shutil
  from recjax.artifacts import semantic_ids
  from recjax.data.prepared import PreparedDataset
  data = tmp_path / "synthetic"
  shutil.copytree(synthetic_prepared["synthetic"], data)
  ds = PreparedDataset(data)
  rng = np.random.default_rng(0)
  n = ds.vocab_size - 2
  codes = np.full((ds.vocab_size, 4), -1, np.int32)
  codes[2:] = rqvae.add_unique_level(rng.integers(0, 4, (n, 3)), 64)
  sids = semantic_ids.save(data, "rand", codes, [4, 4, 4, 64])
  model = tiny_model(sids, max_items=3, user_buckets=11)
  seqs = ds.sequences(["items"]).column("items").to_pylist()
  train = tiger.build_examples(data, sids, model, "train")
  assert len(train["weights"]) == sum(max(len(s) - 3, 0) for s in seqs)
  tok = sids.tokens
  for split, target in (("valid", -2), ("test", -1)):
    ex = tiger.build_examples(data, sids, model, split)
    assert ex["encoder_tokens"].shape == (len(seqs), 1 + 3 * 4)
    np.testing.assert_array_equal(ex["target_items"], [s[target] for s in seqs])
    np.testing.assert_array_equal(ex["targets"], tok[ex["target_items"]])
    s = seqs[0][:len(seqs[0]) + target]  # the history: last 3 items before the target
    want = tok[np.asarray(s[-3:])].reshape(-1)
    np.testing.assert_array_equal(ex["encoder_tokens"][0, 1:1 + len(want)], want)
    user = ex["encoder_tokens"][:, 0]
    assert np.all((user >= sids.vocab_size) & (user < sids.vocab_size + 11))
    assert np.all(ex["encoder_mask"] == (ex["encoder_tokens"] > 0))


def test_tiger_command_trains_and_reports(synthetic_prepared, with_random_ids):
  import json
  import os
  import subprocess
  import sys
  data = with_random_ids(synthetic_prepared["synthetic"])
  cmd = [sys.executable, "-m", "recjax.main", "tiger", "--data", str(data), "--ids", "rand", "--steps", "20",
         "--batch_size", "32", "--d_model", "16", "--d_kv", "8", "--num_heads", "2", "--d_ff", "32",
         "--num_layers", "1", "--num_beams", "10", "--unconstrained_users", "50"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  data_row, *train_rows = [r for r in rows if r.get("event") != "test"]
  assert data_row["event"] == "data" and data_row["test_users"] == 300
  assert train_rows[-1]["step"] == 20 and np.isfinite(train_rows[-1]["loss"])
  tests = {r["mode"]: r for r in rows if r.get("event") == "test"}
  assert tests["constrained"]["count"] == 300 and tests["constrained"]["invalid_id_fraction"] == 0
  assert tests["unconstrained_free"]["count"] == 50
  assert 0 <= tests["constrained"]["ndcg@10"] <= tests["constrained"]["recall@10"] <= 1
