"""Output-layer losses (recjax/models/losses.py): the chunked exact softmax against the
dense one, the sampled softmax's log-Q correction, and their selection in the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.models import bert4rec, flare, losses, sasrec


def _problem(p=37, v=1000, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(p, d)), jnp.float32), jnp.asarray(rng.normal(size=(v, d)) * 0.5, jnp.float32),
          jnp.asarray(rng.normal(size=(v,)) * 0.1, jnp.float32), jnp.asarray(rng.integers(2, 990, size=p)),
          jnp.asarray(rng.random(p), jnp.float32))


@pytest.mark.parametrize("chunk", [1000, 128, 300, 7])  # 300, 7: a last chunk shifted back over counted rows
def test_chunked_matches_dense_loss_and_gradients(chunk):
  q, t, b, targets, w = _problem()

  def total(fn, **kw):
    return lambda q, t, b: jnp.sum(fn(q, t, b, targets, lo=2, hi=990, **kw)[0] * w)

  dense, grads = jax.value_and_grad(total(losses.full_softmax_xent), argnums=(0, 1, 2))(q, t, b)
  fn = jax.jit(jax.value_and_grad(total(losses.chunked_softmax_xent, chunk=chunk), argnums=(0, 1, 2)))
  chunked, cgrads = fn(q, t, b)
  np.testing.assert_allclose(float(chunked), float(dense), rtol=1e-6)
  for g, cg in zip(grads, cgrads):
    np.testing.assert_allclose(np.asarray(cg), np.asarray(g), atol=1e-5)
  assert np.all(np.asarray(cgrads[1])[990:] == 0) and np.all(np.asarray(cgrads[1])[:2] == 0)  # never scored
  _, correct = losses.full_softmax_xent(q, t, b, targets, lo=2, hi=990)
  np.testing.assert_array_equal(losses.chunked_softmax_xent(q, t, b, targets, lo=2, hi=990, chunk=chunk)[1], correct)


def test_chunked_temp_memory_at_376k_items_is_under_a_tenth_of_dense():
  p, v, d = 1600, 376_064, 64  # Bert4Rec's gathered positions for 128 rows of 50
  args = (jax.ShapeDtypeStruct((p, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
          jax.ShapeDtypeStruct((v,), jnp.float32), jax.ShapeDtypeStruct((p,), jnp.int32))

  def temp(fn, **kw):
    loss = lambda q, t, b, y: jnp.sum(fn(q, t, b, y, lo=2, hi=376_000, **kw)[0])
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  dense, chunked = temp(losses.full_softmax_xent), temp(losses.chunked_softmax_xent, chunk=256)
  assert dense > p * v * 4  # at least the [P, V] logits
  assert chunked < 0.1 * dense, (chunked, dense)


def test_sampled_softmax_log_q_correction():
  q, t, b, targets, w = _problem(p=12, v=60)
  counts = np.arange(60, dtype=np.float64)
  frozen = {k: jnp.asarray(x) for k, x in losses.popularity_inputs(counts, 2, 55).items()}
  rng = jax.random.key(0)
  nll, _, ids = losses.sampled_softmax_xent(q, t, b, targets % 53 + 2, w.at[3].set(0.0), rng, lo=2, hi=55,
                                            num_negatives=8, sampler="mixed", popularity_mix=0.5, in_batch=5,
                                            frozen=frozen)
  ids = np.asarray(ids)
  assert ids.shape == (13,) and np.all((ids >= 2) & (ids < 55))
  # Reference: logit - log(4 / 53 + (4 + 5) p(i)) for target and candidates; a candidate
  # equal to the target is masked, and so is the in-batch pick of an unweighted position.
  p = (counts[2:55] + 1) / (counts[2:55] + 1).sum()
  expected = lambda i: 4 / 53 + 9 * p[i - 2]
  y = np.asarray(targets % 53 + 2)
  noise = np.where(np.asarray(w.at[3].set(0.0)) > 0, np.asarray(jax.random.uniform(jax.random.split(rng)[1], (12,))), -1)
  picked = np.argsort(-noise, kind="stable")[:5]
  valid = np.r_[np.ones(8, bool), np.asarray(w.at[3].set(0.0))[picked] > 0]
  qn, tn, bn = (np.asarray(x, np.float64) for x in (q, t, b))
  for r in range(12):
    logit = lambda i: qn[r] @ tn[i] + bn[i] - np.log(expected(i))
    cands = [logit(i) for i, ok in zip(ids, valid) if ok and i != y[r]]
    want = np.logaddexp.reduce([logit(y[r]), *cands]) - logit(y[r])
    np.testing.assert_allclose(float(nll[r]), want, rtol=1e-5)


def test_popularity_sampler_follows_the_counts():
  counts = np.zeros(10)
  counts[2:] = [0, 0, 0, 0, 0, 0, 0, 999]  # item 9 holds nearly all the mass
  frozen = {k: jnp.asarray(x) for k, x in losses.popularity_inputs(counts, 2, 10).items()}
  ids, n_uni, n_pop = losses.draw_negatives(jax.random.key(1), 4000, sampler="popularity", lo=2, hi=10,
                                            frozen=frozen)
  assert (n_uni, n_pop) == (0, 4000)
  assert 0.98 < float(jnp.mean(ids == 9)) and int(ids.min()) >= 2
  with pytest.raises(ValueError, match="popularity"):
    losses.draw_negatives(jax.random.key(1), 4, sampler="mixed", lo=2, hi=10)


def _batch():
  rng = np.random.default_rng(0)
  items = rng.integers(2, 40, size=(3, 8))
  w = (rng.random((3, 8)) < 0.5).astype(np.float32)
  return {"inputs": jnp.asarray(np.where(w > 0, 1, items)), "targets": jnp.asarray(items),
          "weights": jnp.asarray(w), "segment_ids": jnp.ones((3, 8), jnp.int32),
          "positions": jnp.tile(jnp.arange(8), (3, 1))}


@pytest.mark.parametrize("cls,extra", [(bert4rec.Bert4Rec, {}), (sasrec.SASRec, {}),
                                       (flare.Flare, {"use_text": False})])
def test_models_select_the_loss_in_config(cls, extra):
  kw = dict(vocab_size=40, max_length=8, dim=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0,
            attention_dropout=0.0, **extra)
  full = cls(loss="full", **kw)
  net = full.network(nnx.Rngs(0))
  batch = _batch()
  rng = jax.random.key(0)
  want = float(full.loss_fn(net, batch, rng)[0])
  assert cls(**kw).train_loss == "chunked"
  np.testing.assert_allclose(float(cls(loss="chunked", loss_chunk=16, **kw).loss_fn(net, batch, rng)[0]), want,
                             rtol=1e-5)
  counts = np.ones(40)
  frozen = {k: jnp.asarray(x) for k, x in losses.popularity_inputs(counts, 2, 40).items()}
  sampled = cls(num_negatives=6, negatives="mixed", in_batch_negatives=4, **kw)
  assert sampled.train_loss == "sampled" and sampled.needs_popularity
  loss, metrics = sampled.loss_fn(net, dict(batch, frozen=frozen), rng)
  assert np.isfinite(float(loss)) and float(metrics["targets"]) == float(batch["weights"].sum())
  # Evaluation (no rng) is the exact loss whatever the training loss.
  np.testing.assert_allclose(float(sampled.loss_fn(net, dict(batch, frozen=frozen), None)[0]),
                             float(full.loss_fn(net, batch, None)[0]), rtol=1e-5)
  with pytest.raises(ValueError, match="loss"):
    cls(loss="sampled", **kw)
  with pytest.raises(ValueError, match="negatives"):
    cls(num_negatives=4, negatives="zipf", **kw)
