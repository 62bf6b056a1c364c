"""Output-layer losses over an item catalogue: full, chunked-exact and sampled softmax.

Every item-ID model (Bert4Rec, SASRec+, FLARE) scores queries [P, D] against an output
table [V, D] + bias [V]; ids outside [lo, hi) (PAD, MASK, table padding) are never scored.
All three losses return (nll [P], correct [P]) in float32; the model weights and sums them.

  full     the [P, V] logits at once: simplest, exact, but P x V floats (and as many for
           their gradient) are allocated every step: ~0.3 GB each for SASRec+ on Beauty,
           several GB at 1M items. On CPU, XLA gets such buffers from malloc, which maps
           them fresh (mmap) and unmaps them after each step, so every step page-faults
           them in again: that was most of the system time of SASRec+ training.
  chunked  the same loss and gradients, exact, streamed over catalogue chunks of C items
           (a running logsumexp forward; a custom VJP that recomputes each chunk's logits
           backward, since softmax = exp(logit - lse)). Working memory is P x C, not P x V.
  sampled  the target against negatives shared by the whole step, with the log-Q
           correction: every candidate logit (target and negatives) is lowered by the log
           of its expected count in the candidate set, so the sampled softmax estimates
           the full one whatever the proposal (Bengio & Senecal 2008; Yi et al. 2019;
           mixed negatives as in Yang et al. 2020). Negative sources: N ids drawn uniformly,
           by training popularity, or a mix; and/or the step's other targets (in-batch,
           popularity-distributed by construction).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOSSES = ("full", "chunked", "sampled")
SAMPLERS = ("uniform", "popularity", "mixed")


def _scores(queries, table, bias):
  return jnp.einsum("pd,vd->pv", queries, table.astype(queries.dtype),
                    preferred_element_type=jnp.float32) + bias.astype(jnp.float32)


def target_logits(queries, table, bias, targets):
  """The target's logit per query, float32 [P] (differentiable, a gather of P rows)."""
  return jnp.einsum("pd,pd->p", queries, table[targets].astype(queries.dtype),
                    preferred_element_type=jnp.float32) + bias[targets].astype(jnp.float32)


def full_softmax_xent(queries, table, bias, targets, *, lo: int, hi: int):
  """Dense cross-entropy over ids [lo, hi): the [P, V] logits materialised."""
  logits = _scores(queries, table, bias)
  ids = jnp.arange(logits.shape[-1])
  logits = jnp.where((ids < lo) | (ids >= hi), -jnp.inf, logits)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return nll, correct


def exclude_from_softmax(nll, queries, table, bias, targets, excluded, *, lo: int, hi: int):
  """nll [P] of a softmax over ids [lo, hi) turned into one over those ids minus `excluded`
  [P, K] (ids per query; repeats, the target and ids outside [lo, hi) are not removed):
  log(sum_v e^l_v - sum_x e^l_x) = lse + log(1 - sum_x e^(l_x - lse)), read from the K
  excluded logits, so it serves the dense and the chunked softmax alike. The target
  stays in the sum, so 1 - sum_x is at least its probability; clipped at 1e-12 against
  rounding."""
  lse = nll + target_logits(queries, table, bias, targets)
  k = excluded.shape[1]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [j, i]: i before j
  repeat = jnp.any((excluded[:, :, None] == excluded[:, None, :]) & earlier[None], axis=-1)
  keep = (excluded >= lo) & (excluded < hi) & (excluded != targets[:, None]) & ~repeat
  logits = jnp.einsum("pd,pkd->pk", queries, table[excluded].astype(queries.dtype),
                      preferred_element_type=jnp.float32) + bias[excluded].astype(jnp.float32)
  mass = jnp.sum(jnp.where(keep, jnp.exp(logits - lse[:, None]), 0.0), axis=-1)
  return nll + jnp.log(jnp.maximum(1.0 - mass, 1e-12))


# -- chunked exact softmax ------------------------------------------------------------------

def _chunks(v: int, chunk: int):
  """(chunk size, count): chunk i covers rows [min(i*c, v-c), +c); rows below i*c in the
  last, shifted chunk were already counted and are masked there."""
  c = max(1, min(chunk, v))
  return c, -(-v // c)


def _chunk(table, bias, i, c, lo, hi):
  v = table.shape[0]
  start = jnp.minimum(i * c, v - c)
  t = jax.lax.dynamic_slice_in_dim(table, start, c)
  b = jax.lax.dynamic_slice_in_dim(bias, start, c)
  ids = start + jnp.arange(c)
  return start, t, b, (ids >= lo) & (ids < hi) & (ids >= i * c)


def _lse_max(queries, table, bias, lo, hi, chunk):
  """Streaming (logsumexp, max) over the valid ids, chunk by chunk, float32 [P] each."""
  c, n = _chunks(table.shape[0], chunk)
  p = queries.shape[0]

  def body(carry, i):
    m, s = carry
    _, t, b, valid = _chunk(table, bias, i, c, lo, hi)
    logits = jnp.where(valid, _scores(queries, t, b), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no valid id seen yet
    s = s * jnp.exp(m - safe) + jnp.sum(jnp.exp(logits - safe[:, None]), axis=-1)
    return (m_new, s), None

  init = (jnp.full((p,), -jnp.inf, jnp.float32), jnp.zeros((p,), jnp.float32))
  (m, s), _ = jax.lax.scan(body, init, jnp.arange(n))
  return m + jnp.log(s), m


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def chunked_logsumexp(queries, table, bias, lo: int, hi: int, chunk: int):
  """(logsumexp, max) over ids [lo, hi) of queries . table^T + bias, float32 [P] each,
  without the [P, V] logits: forward and backward both stream over chunks of `chunk`
  rows. The max is for metrics: its gradient is taken as zero."""
  return _lse_max(queries, table, bias, lo, hi, chunk)


def _lse_fwd(queries, table, bias, lo, hi, chunk):
  lse, m = _lse_max(queries, table, bias, lo, hi, chunk)
  return (lse, m), (queries, table, bias, lse)


def _lse_bwd(lo, hi, chunk, res, cotangents):
  queries, table, bias, lse = res
  g = cotangents[0]
  c, n = _chunks(table.shape[0], chunk)

  def body(carry, i):
    dq, dt, db = carry
    start, t, b, valid = _chunk(table, bias, i, c, lo, hi)
    # d lse_p / d logit_pv = softmax_pv: recomputed per chunk, scaled by the cotangent.
    w = jnp.where(valid, jnp.exp(_scores(queries, t, b) - lse[:, None]), 0.0) * g[:, None]
    dq = dq + jnp.einsum("pv,vd->pd", w, t.astype(jnp.float32))
    dt_c = jnp.einsum("pv,pd->vd", w, queries.astype(jnp.float32))
    # Adds (not overwrites): the shifted last chunk overlaps rows already written.
    dt = jax.lax.dynamic_update_slice_in_dim(dt, jax.lax.dynamic_slice_in_dim(dt, start, c) + dt_c, start, 0)
    db = jax.lax.dynamic_update_slice_in_dim(db, jax.lax.dynamic_slice_in_dim(db, start, c) + w.sum(0), start, 0)
    return (dq, dt, db), None

  init = (jnp.zeros(queries.shape, jnp.float32), jnp.zeros(table.shape, jnp.float32),
          jnp.zeros(bias.shape, jnp.float32))
  (dq, dt, db), _ = jax.lax.scan(body, init, jnp.arange(n))
  return dq.astype(queries.dtype), dt.astype(table.dtype), db.astype(bias.dtype)


chunked_logsumexp.defvjp(_lse_fwd, _lse_bwd)


def chunked_softmax_xent(queries, table, bias, targets, *, lo: int, hi: int, chunk: int = 1024):
  """Exact cross-entropy over ids [lo, hi) in O(P x chunk) working memory.

  `correct`: the target's logit is the catalogue's max (the dense argmax differs only on
  exact ties)."""
  lse, m = chunked_logsumexp(queries, table, bias, lo, hi, chunk)
  positive = target_logits(queries, table, bias, targets)
  return lse - positive, (jax.lax.stop_gradient(positive) >= m).astype(jnp.float32)


# -- sampled softmax -----------------------------------------------------------------------

def popularity_inputs(counts: np.ndarray, lo: int, hi: int) -> dict[str, np.ndarray]:
  """Frozen inputs of the popularity sampler from training counts [V]: log p(i) and the
  CDF, over ids [lo, hi) with add-one smoothing (every real item can be drawn)."""
  p = np.zeros(counts.shape[0], np.float64)
  p[lo:hi] = np.asarray(counts[lo:hi], np.float64) + 1.0
  p /= p.sum()
  with np.errstate(divide="ignore"):
    log_p = np.log(p).astype(np.float32)
  return {"item_log_popularity": log_p, "item_popularity_cdf": np.cumsum(p).astype(np.float32)}


def draw_negatives(rng, n: int, *, sampler: str, lo: int, hi: int, popularity_mix: float = 0.5,
                   frozen=None):
  """(ids [n], log expected count function) of n ids shared by the step."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown negative sampler {sampler!r}; choose one of {SAMPLERS}")
  n_uni, n_pop = _mix(n, sampler, popularity_mix)
  parts = []
  uni_rng, pop_rng = jax.random.split(rng) if n_pop else (rng, None)
  if n_uni:
    parts.append(jax.random.randint(uni_rng, (n_uni,), lo, hi))
  if n_pop:
    cdf = _popularity(frozen)["item_popularity_cdf"]
    u = jax.random.uniform(pop_rng, (n_pop,)) * cdf[-1]
    parts.append(jnp.clip(jnp.searchsorted(cdf, u, side="right"), lo, hi - 1).astype(jnp.int32))
  return jnp.concatenate(parts) if len(parts) > 1 else parts[0], n_uni, n_pop


def _popularity(frozen):
  if not frozen or "item_log_popularity" not in frozen:
    raise ValueError("popularity / in-batch negatives need the training popularity: the model's "
                     "frozen_input_specs name the item counts (the trainer fetches them), or pass "
                     "losses.popularity_inputs(counts, ...) as frozen inputs")
  return frozen


def _mix(n: int, sampler: str, popularity_mix: float) -> tuple[int, int]:
  """(uniform, popularity) counts of n drawn negatives."""
  n_pop = n if sampler == "popularity" else (round(popularity_mix * n) if sampler == "mixed" else 0)
  return n - n_pop, n_pop


def negative_ids(rng, *, lo: int, hi: int, num_negatives: int = 0, sampler: str = "uniform",
                 popularity_mix: float = 0.5, in_batch: int = 0, frozen=None):
  """The ids [num_negatives] that `sampled_softmax_xent` draws from `rng` given the same
  arguments (its in-batch negatives are some of the step's targets): one function for
  both, so a train step can list the rows its loss will read before running it."""
  if not num_negatives:
    return jnp.zeros((0,), jnp.int32)
  # The negatives come from `rng` itself when there is no in-batch part.
  neg_rng = jax.random.split(rng)[0] if in_batch else rng
  return draw_negatives(neg_rng, num_negatives, sampler=sampler, lo=lo, hi=hi, popularity_mix=popularity_mix,
                        frozen=frozen)[0]


def sampled_softmax_xent(queries, table, bias, targets, weights, rng, *, lo: int, hi: int,
                         num_negatives: int = 0, sampler: str = "uniform", popularity_mix: float = 0.5,
                         in_batch: int = 0, frozen=None):
  """Sampled softmax with log-Q correction; returns (nll [P], correct [P], negatives).

  Candidates shared by every query: `num_negatives` ids from `sampler`, and `in_batch`
  of the step's own targets (a random subset of the weighted ones). Each candidate
  logit, the target's included, is lowered by log E[count of that id among the
  candidates] = log(n_uniform / (hi - lo) + (n_popularity + in_batch) * p(id)); a
  candidate equal to the query's target is masked (the target is scored once, as the
  positive). `correct`: the target beats every candidate (a sampled accuracy).

  `table` and `bias` are only indexed by ids (`table[ids]`), so they may be views that
  read a gathered subset of rows (`recjax.models.base.ItemRows.view`).
  """
  if num_negatives + in_batch <= 0:
    raise ValueError("a sampled softmax needs num_negatives > 0 or in_batch_negatives > 0")
  ids, valid = [], []
  n_uni, n_pop = _mix(num_negatives, sampler, popularity_mix) if num_negatives else (0, 0)
  if num_negatives:
    sampled = negative_ids(rng, lo=lo, hi=hi, num_negatives=num_negatives, sampler=sampler,
                           popularity_mix=popularity_mix, in_batch=in_batch, frozen=frozen)
    ids.append(sampled)
    valid.append(jnp.ones(sampled.shape, bool))
  if in_batch:
    k = min(in_batch, targets.shape[0])
    noise = jnp.where(weights > 0, jax.random.uniform(jax.random.split(rng)[1], weights.shape), -1.0)
    _, index = jax.lax.top_k(noise, k)
    ids.append(targets[index])
    valid.append(weights[index] > 0)
  ids, valid = jnp.concatenate(ids), jnp.concatenate(valid)

  def log_q(i):
    if not (n_pop or in_batch):  # uniform only: one constant, it cancels
      return jnp.full(i.shape, np.log(n_uni / (hi - lo)), jnp.float32)
    p = jnp.exp(_popularity(frozen)["item_log_popularity"][i])
    return jnp.log(n_uni / (hi - lo) + (n_pop + in_batch) * p)

  positive = target_logits(queries, table, bias, targets) - log_q(targets)
  negative = _scores(queries, table[ids], bias[ids]) - log_q(ids)[None, :]
  negative = jnp.where(valid[None, :] & (ids[None, :] != targets[:, None]), negative, -jnp.inf)
  nll = jnp.logaddexp(positive, jax.nn.logsumexp(negative, axis=-1)) - positive
  correct = (positive > jnp.max(negative, axis=-1)).astype(jnp.float32)
  return nll, correct, ids
