"""Full-catalog ranking: chunked ranks / top-k against brute force, metrics, memory."""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.evaluation import ranking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- brute-force references (float64 numpy) -----------------------------------


def _scores(q, table, bias):
  s = np.asarray(q, np.float64) @ np.asarray(table, np.float64).T
  return s if bias is None else s + np.asarray(bias, np.float64)[None, :]


def ref_ranks(q, table, targets, bias=None, exclude=None, vocab_size=None):
  vocab = len(table) if vocab_size is None else vocab_size
  s = _scores(q, table, bias)
  out = []
  for b, t in enumerate(targets):
    if not 2 <= t < vocab:
      out.append(-1)
      continue
    cand = np.ones(len(table), bool)
    cand[:2] = cand[vocab:] = False
    if exclude is not None:
      cand[exclude[b]] = False
    cand[t] = False  # Never compared with itself (and never excluded).
    out.append(int(np.sum(s[b, cand] >= s[b, t])))
  return np.array(out)


def ref_top_k(q, table, k, bias=None, exclude=None, vocab_size=None):
  vocab = len(table) if vocab_size is None else vocab_size
  s = _scores(q, table, bias)
  ids = np.full((len(q), k), -1)
  vals = np.full((len(q), k), -np.inf)
  for b in range(len(q)):
    cand = np.arange(2, vocab)
    if exclude is not None:
      cand = np.setdiff1d(cand, exclude[b])
    order = cand[np.lexsort((cand, -s[b, cand]))][:k]  # score desc, then id asc
    ids[b, :len(order)] = order
    vals[b, :len(order)] = s[b, order]
  return vals, ids


def _int_data(seed, b, v, d, h=6, levels=2):
  """Integer-valued data: exact f32 scores with many exact ties."""
  rng = np.random.default_rng(seed)
  q = rng.integers(-levels, levels + 1, (b, d)).astype(np.float32)
  table = rng.integers(-levels, levels + 1, (v, d)).astype(np.float32)
  bias = rng.integers(-1, 2, v).astype(np.float32)
  targets = rng.integers(0, v, b)
  targets[0], targets[1] = 0, 1  # PAD and MASK targets: rank -1.
  exclude = rng.integers(0, v, (b, h))
  exclude[:, 0] = targets  # The target sits in its own history: kept anyway.
  exclude[:, 1] = 0
  return q, table, bias, targets.astype(np.int32), exclude.astype(np.int32)


# --- ranks -----------------------------------------------------------------


@pytest.mark.parametrize("v,chunk_size", [(103, 10), (103, 16), (97, 97), (50, 200), (211, 64)])
def test_ranks_match_brute_force_with_ties(v, chunk_size):
  q, table, bias, targets, exclude = _int_data(v, b=24, v=v, d=3)
  for with_bias in (False, True):
    b_ = bias if with_bias else None
    want = ref_ranks(q, table, targets, b_)
    got = ranking.target_ranks(q, table, targets, b_, chunk_size=chunk_size)
    np.testing.assert_array_equal(got, want)
  want = ref_ranks(q, table, targets, bias, exclude)
  got = ranking.target_ranks(q, table, targets, bias, exclude=exclude, chunk_size=chunk_size)
  np.testing.assert_array_equal(got, want)
  assert (np.asarray(got)[:2] == -1).all()


def test_ties_are_pessimistic_and_pad_mask_never_ranked():
  # Every item scores the same: rank = number of other real items. PAD and
  # MASK get huge scores and must still not count.
  v = 10
  table = np.ones((v, 2), np.float32)
  table[:2] = 100.0
  q = np.ones((2, 2), np.float32)
  got = ranking.target_ranks(q, table, np.array([2, 9]), chunk_size=4)
  np.testing.assert_array_equal(got, [v - 3, v - 3])
  # Excluding history shrinks the field, but never removes the target itself.
  got = ranking.target_ranks(q, table, np.array([2, 9]), chunk_size=4,
                             exclude=np.array([[2, 3, 4, 0], [9, 9, 0, 0]]))
  np.testing.assert_array_equal(got, [v - 5, v - 3])


def test_duplicate_items_tie_with_float_scores():
  # Items with the target's exact embedding must tie with it (rank counts
  # them), even though a [B, D] x [D, V] matmul and a per-row dot product round
  # differently; this exercises the target-score consistency logic.
  rng = np.random.default_rng(0)
  b, v, d = 32, 300, 16
  q = rng.normal(size=(b, d)).astype(np.float32)
  table = rng.normal(size=(v, d)).astype(np.float32)
  targets = rng.integers(2, v - 5, b).astype(np.int32)
  dup = np.arange(v - 5, v)
  table[dup] = table[targets[0]]
  got = np.asarray(ranking.target_ranks(q, table, targets, chunk_size=64))
  np.testing.assert_array_equal(got, ref_ranks(q, table, targets))
  s = _scores(q, table, None)[0]
  assert got[0] == np.sum(np.delete(s[2:v - 5], targets[0] - 2) > s[targets[0]]) + len(dup)


@pytest.mark.parametrize("b,v,chunk_size,dtype", [(256, 12_103, 8192, jnp.float32),
                                                   (100, 5_000, 512, jnp.float32),
                                                   (40, 3_001, 16, jnp.float32),
                                                   (64, 2_000, 256, jnp.bfloat16)])
def test_target_scores_match_catalog_scores(b, v, chunk_size, dtype):
  # The fast path: the target scores used as thresholds are bit-identical to
  # the scores the catalog chunks give the targets, so no recount is needed.
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, 64)), dtype)
  table = jnp.asarray(rng.normal(size=(v, 64)), dtype)
  bias = jnp.asarray(rng.normal(size=v), dtype)
  targets = jnp.asarray(rng.integers(2, v, b), jnp.int32)

  @jax.jit
  def run(q, table, bias, targets):
    cat = ranking._Catalog(q, table, bias, chunk_size, None)
    return ranking._count_ge(cat, targets, cat.exclusion(None))

  _, threshold, actual = run(q, table, bias, targets)
  np.testing.assert_array_equal(threshold, actual)


def test_rank_recount_when_target_scores_are_off(monkeypatch):
  # Skew the first pass (counts and target scores): the safety net must notice
  # and recount against the catalog's own target scores.
  q, table, bias, targets, exclude = _int_data(5, b=9, v=61, d=3)
  real = ranking._count_ge

  def skewed(cat, targets, excluded, threshold=None):
    if threshold is None:
      counts, thr, actual = real(cat, targets, excluded)
      return counts + 7, thr + 0.5, actual
    return real(cat, targets, excluded, threshold)

  monkeypatch.setattr(ranking, "_count_ge", skewed)
  ranking.target_ranks.clear_cache()
  try:
    got = ranking.target_ranks(q, table, targets, bias, exclude=exclude, chunk_size=8)
  finally:
    ranking.target_ranks.clear_cache()
  np.testing.assert_array_equal(got, ref_ranks(q, table, targets, bias, exclude))


def test_bfloat16_inputs_and_padded_vocab():
  q, table, bias, targets, exclude = _int_data(3, b=16, v=120, d=4)
  targets = np.where(targets >= 100, 5, targets)  # Rows >= 100 are table padding.
  want = ref_ranks(q, table, targets, bias, exclude, vocab_size=100)
  got = ranking.target_ranks(jnp.asarray(q, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16),
                             targets, bias, exclude=exclude, chunk_size=30, vocab_size=100)
  np.testing.assert_array_equal(got, want)
  s, ids = ranking.top_k(q, table, bias, k=7, exclude=exclude, chunk_size=30, vocab_size=100)
  assert np.asarray(ids).max() < 100


def test_nan_scores_rank_last():
  table = np.arange(12, dtype=np.float32)[:, None]
  table[5] = np.nan
  got = ranking.target_ranks(np.ones((2, 1), np.float32), table, np.array([5, 11]),
                             chunk_size=4)
  np.testing.assert_array_equal(got, [9, 0])


# --- top-k -----------------------------------------------------------------


@pytest.mark.parametrize("v,chunk_size,k", [(103, 10, 7), (103, 16, 25), (50, 200, 5),
                                           (37, 8, 40)])
def test_top_k_matches_brute_force_with_ties(v, chunk_size, k):
  q, table, bias, _, exclude = _int_data(v + k, b=12, v=v, d=2, levels=1)
  for b_, ex in ((None, None), (bias, exclude)):
    want_s, want_id = ref_top_k(q, table, k, b_, ex)
    got_s, got_id = ranking.top_k(q, table, b_, k=k, exclude=ex, chunk_size=chunk_size)
    np.testing.assert_array_equal(got_id, want_id)
    np.testing.assert_array_equal(got_s, want_s)
    assert not np.isin(np.asarray(got_id), [0, 1]).any()


def test_top_k_agrees_with_ranks():
  # With ties, a pessimistic rank < k implies a top-k hit (not conversely: the
  # id tie-break may let a tied target in). Without ties they are equivalent.
  q, table, bias, targets, exclude = _int_data(11, b=40, v=150, d=3)
  rng = np.random.default_rng(1)
  for q, table in ((q, table), (rng.normal(size=q.shape), rng.normal(size=table.shape))):
    q, table = q.astype(np.float32), table.astype(np.float32)
    ranks = np.asarray(ranking.target_ranks(q, table, targets, bias, exclude=exclude,
                                            chunk_size=32))[2:]
    ex = ranking.history_exclusion(exclude, targets)
    _, ids = ranking.top_k(q, table, bias, k=10, exclude=ex, chunk_size=32)
    hit = (np.asarray(ids) == targets[:, None]).any(1)[2:]
    hit, ranks = hit[ranks >= 0], ranks[ranks >= 0]  # Drop PAD / MASK targets.
    assert hit[ranks < 10].all()
  np.testing.assert_array_equal(hit, ranks < 10)
  assert 0 < hit.sum() < len(hit)


# --- metrics ---------------------------------------------------------------


def test_metrics_hand_computed():
  m = ranking.metrics_from_ranks(jnp.array([0, 4, 10]), ks=(1, 5, 10, 20))
  assert m["recall@5"] == pytest.approx(2 / 3)
  assert m["recall@1"] == pytest.approx(1 / 3)
  assert m["recall@20"] == pytest.approx(1.0)
  assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 3)
  assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(12)) / 3)
  assert m["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 11) / 3)
  assert int(m["count"]) == 3


def test_metrics_skip_padding_and_no_examples():
  m = ranking.metrics_from_ranks(jnp.array([0, 4, 10, -1, 0]), ks=(5,),
                                 valid=jnp.array([1, 1, 1, 1, 0], bool))
  assert int(m["count"]) == 3 and m["recall@5"] == pytest.approx(2 / 3)
  m = ranking.metrics_from_ranks(jnp.array([-1, -1]), ks=(5,))
  assert int(m["count"]) == 0 and float(m["mrr"]) == 0.0


def test_accumulator_equals_one_big_batch():
  ranks = np.random.default_rng(0).integers(-1, 60, 1000)
  acc = ranking.RankingMetrics(ks=(5, 10))
  for start in range(0, 1000, 128):  # Padded final batch via `valid`.
    batch = np.zeros(128, np.int64)
    n = min(128, 1000 - start)
    batch[:n] = ranks[start:start + n]
    acc.update(jnp.asarray(batch), valid=jnp.arange(128) < n)
  got = acc.result()
  want = ranking.metrics_from_ranks(jnp.asarray(ranks), ks=(5, 10))
  assert got["count"] == int(want["count"]) == int((ranks >= 0).sum())
  for name in ("recall@5", "ndcg@10", "mrr"):
    assert got[name] == pytest.approx(float(want[name]), rel=1e-6)
  acc.reset()
  assert acc.result()["count"] == 0


def test_format_table_and_protocol():
  proto = ranking.ranking_protocol(12_103, exclude_history=True)
  assert proto == "full ranking over 12,101 items, pessimistic ties, history excluded: yes"
  table = ranking.format_metrics_table(
      {"valid/bert4rec": {"recall@5": 0.0203, "ndcg@5": 0.0124, "count": 22363},
       "test/bert4rec": ranking.metrics_from_ranks(jnp.array([0, 4, 10]), ks=(5,))},
      protocol=proto)
  lines = table.splitlines()
  assert lines[0].split() == ["recall@5", "ndcg@5", "count", "mrr"]
  assert lines[2].split() == ["valid/bert4rec", "0.0203", "0.0124", "22363", "-"]
  assert lines[3].split()[1:] == ["0.6667", "0.4623", "3", "0.4303"]
  assert lines[-1] == f"({proto})"


# --- memory and sharding -----------------------------------------------------


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _avals(sub)


@pytest.mark.parametrize("fn", ["target_ranks", "top_k"])
@pytest.mark.parametrize("v", [1_000_000, 1_000_002])  # Strided view / gathered chunks.
def test_memory_is_bounded_for_a_million_items(fn, v):
  b, d = 256, 64
  args = (jax.ShapeDtypeStruct((b, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, 50), jnp.int32))
  if fn == "target_ranks":
    f = lambda q, e, t, ex: ranking.target_ranks(q, e, t, exclude=ex)
  else:
    f = lambda q, e, t, ex: ranking.top_k(q, e, k=20, exclude=ex)
  sizes = [int(np.prod(a.shape)) for a in _avals(jax.make_jaxpr(f)(*args).jaxpr)
           if hasattr(a, "shape")]
  assert max(sizes) <= v * d  # The table view; nothing [B, V]-sized.
  analysis = jax.jit(f).lower(*args).compile().memory_analysis()
  if analysis is not None:
    assert analysis.temp_size_in_bytes < b * v * 4 / 20  # < 50 MB vs 1 GB dense.


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from recjax.evaluation import ranking
    assert jax.device_count() == 8
    from jax.sharding import AxisType
    rng = np.random.default_rng(0)
    for v, chunk, kind in ((4096, 256, AxisType.Explicit), (1004, 100, AxisType.Explicit),
                           (4096, 256, AxisType.Auto), (1004, 100, AxisType.Auto)):
      mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
      put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
      q = rng.integers(-3, 4, (16, 8)).astype(np.float32)
      table = rng.integers(-3, 4, (v, 8)).astype(np.float32)
      bias = rng.integers(-2, 3, v).astype(np.float32)
      t = rng.integers(2, v, 16).astype(np.int32)
      ex = rng.integers(0, v, (16, 5)).astype(np.int32)
      want = ranking.target_ranks(q, table, t, bias, exclude=ex, chunk_size=chunk)
      want_s, want_id = ranking.top_k(q, table, bias, k=12, exclude=ex, chunk_size=chunk)
      args = (put(q, "data", None), put(table, "model", None), put(t, "data"),
              put(bias, "model"), put(ex, "data", None))
      @jax.jit
      def run(q, table, t, bias, ex):
        return (ranking.target_ranks(q, table, t, bias, exclude=ex, chunk_size=chunk),
                ranking.top_k(q, table, bias, k=12, exclude=ex, chunk_size=chunk))
      with jax.set_mesh(mesh):
        got, (got_s, got_id) = run(*args)
      assert len(got.sharding.device_set) == 8, got.sharding
      np.testing.assert_array_equal(got, want)
      np.testing.assert_array_equal(got_id, want_id)
      np.testing.assert_array_equal(got_s, want_s)
    print("SHARDED OK")
    """)


def test_sharded_matches_unsharded():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "SHARDED OK" in proc.stdout, proc.stderr[-3000:]
