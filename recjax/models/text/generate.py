"""Autoregressive decoding: greedy and beam search, jittable with fixed shapes.

Generic over the model: `step_fn(state, tokens [rows]) -> (logits [rows, V], state)` feeds
one token per row and returns the next-token logits (an encoder-decoder closes over its
encoder memory; a decoder-only LM would prefill its prompt into `state` first). Every
leaf of `state` must have the rows first: beam search reorders beams by gathering rows.
Loops are `jax.lax.while_loop`s (they end early once every row is done); no host syncs.

Semantics are Hugging Face `generate`'s (transformers 5), checked against it in
tests/test_t5_seq2seq.py:
  * greedy: argmax each step; once a row emits EOS its later tokens are `pad_token`.
  * beam search (`num_beams` N, log-softmax scores): each step takes the top 2N of the
    N x V continuations; those ending in EOS *and ranked in the top N* become finished
    hypotheses, scored sum(log p) / generated_length**length_penalty (the length counts EOS);
    the best N non-EOS continuations keep running. At `max_new_tokens` every running
    beam is finished as is. The best N finished hypotheses are returned, best first.
    `early_stopping`: True stops adding hypotheses to a row once it has N; False (HF's
    default) once the best running beam, length-normalised by its current length, cannot
    beat the worst of N finished; "never" bounds it at `max_new_tokens` when
    length_penalty > 0 (exact: the same result as running every step).
  * outputs hold the generated tokens only (no start token), `pad_token` after EOS
    (Hugging Face pads beam outputs with EOS instead when pad is 0).
The length penalty is Hugging Face's len**alpha, not t5x's ((5 + len) / 6)**alpha.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
_BIG = 1.0e9  # Hugging Face's "very large" score offset (kept so ties resolve alike)


class GreedyOutput(NamedTuple):
  tokens: jax.Array  # int32 [B, max_new_tokens]
  scores: jax.Array  # float32 [B]: sum of the generated tokens' log-probabilities (EOS included)
  lengths: jax.Array  # int32 [B]: generated tokens, EOS included


class BeamOutput(NamedTuple):
  sequences: jax.Array  # int32 [B, N, max_new_tokens], best first
  scores: jax.Array  # float32 [B, N]: sum(log p) / length**length_penalty
  lengths: jax.Array  # int32 [B, N]


def greedy_search(step_fn: StepFn, state, *, batch_size: int, max_new_tokens: int, start_token: int,
                  eos_token: int, pad_token: int = 0) -> GreedyOutput:
  b, n = batch_size, max_new_tokens

  def cond(carry):
    t, _, _, done, _, _, _ = carry
    return (t < n) & ~jnp.all(done)

  def body(carry):
    t, tokens, last, done, score, length, state = carry
    logits, state = step_fn(state, last)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nxt = jnp.argmax(logp, -1).astype(jnp.int32)
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], -1)[:, 0])
    length = length + (~done).astype(jnp.int32)
    nxt = jnp.where(done, pad_token, nxt)
    tokens = tokens.at[:, t].set(nxt)
    return t + 1, tokens, nxt, done | (nxt == eos_token), score, length, state

  init = (jnp.int32(0), jnp.full((b, n), pad_token, jnp.int32), jnp.full((b,), start_token, jnp.int32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), state)
  _, tokens, _, _, score, length, _ = jax.lax.while_loop(cond, body, init)
  return GreedyOutput(tokens, score, length)


def _gather(x, idx):
  """x [B, M, ...] rows idx [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def beam_search(step_fn: StepFn, state, *, batch_size: int, num_beams: int, max_new_tokens: int,
                start_token: int, eos_token: int, pad_token: int = 0, length_penalty: float = 1.0,
                early_stopping: bool | str = "never") -> BeamOutput:
  """`state` holds batch_size * num_beams rows, the beams of a batch row adjacent."""
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  b, nb, n = batch_size, num_beams, max_new_tokens
  k = 2 * nb  # one EOS token: 2N candidates leave at least N that keep running
  top_n = jnp.arange(k) < nb

  def cond(c):
    going = c["t"] < n
    going &= jnp.any(c["improvable"])
    if early_stopping is True:
      going &= ~jnp.all(c["finished"])
    return going

  def body(c):
    t = c["t"]
    logits, st = step_fn(c["state"], c["last"])
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, nb, v)
    flat = (logp + c["run_scores"][:, :, None]).reshape(b, nb * v)
    cand_scores, cand = jax.lax.top_k(flat, k)
    src = cand // v
    tok = (cand % v).astype(jnp.int32)
    cand_seqs = _gather(c["run_seqs"], src)
    cand_seqs = jnp.where(jnp.arange(n) == t, tok[:, :, None], cand_seqs)
    hits = (tok == eos_token) | (t + 1 >= n)  # EOS, or the last step

    # Running beams for the next step: the best N candidates that did not finish.
    run_cand = cand_scores - hits.astype(jnp.float32) * _BIG
    _, keep = jax.lax.top_k(run_cand, nb)
    run_seqs = _gather(cand_seqs, keep)
    run_scores = _gather(run_cand, keep)
    rows = (jnp.arange(b)[:, None] * nb + _gather(src, keep)).reshape(-1)
    st = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), st)

    # Finished hypotheses: merge the newly finished top-N candidates, keep the best N.
    fin_cand = cand_scores / jnp.float32(t + 1) ** length_penalty
    if early_stopping is True:
      fin_cand -= jnp.all(c["finished"], -1, keepdims=True).astype(jnp.float32) * _BIG
    fin_cand -= (~c["improvable"]).astype(jnp.float32) * _BIG
    done_now = hits & top_n
    fin_cand -= (~done_now).astype(jnp.float32) * _BIG
    merged_scores = jnp.concatenate([c["fin_scores"], fin_cand], 1)
    _, best = jax.lax.top_k(merged_scores, nb)
    fin_scores = _gather(merged_scores, best)
    fin_seqs = _gather(jnp.concatenate([c["fin_seqs"], cand_seqs], 1), best)
    fin_lens = _gather(jnp.concatenate([c["fin_lens"], jnp.full((b, k), t + 1, jnp.int32)], 1), best)
    finished = _gather(jnp.concatenate([c["finished"], done_now], 1), best)

    # Can a running beam still beat the worst finished one? (sticky per row, as HF)
    # (length_penalty may be traced: one compiled search serves every value)
    best_len = jnp.where((early_stopping == "never") & (length_penalty > 0.0), n, t + 1)
    best_possible = run_scores[:, :1] / best_len.astype(jnp.float32) ** length_penalty
    worst = jnp.where(finished, jnp.min(fin_scores, -1, keepdims=True), -_BIG)
    improvable = c["improvable"] & jnp.any(best_possible > worst, -1, keepdims=True)
    return {"t": t + 1, "state": st, "last": run_seqs[:, :, t].reshape(-1), "run_seqs": run_seqs,
            "run_scores": run_scores, "fin_seqs": fin_seqs, "fin_scores": fin_scores, "fin_lens": fin_lens,
            "finished": finished,
            "improvable": improvable}

  # Only beam 0 is live at first, so the N beams do not all pick the same tokens.
  run_scores = jnp.where(jnp.arange(nb) == 0, 0.0, -_BIG) * jnp.ones((b, 1), jnp.float32)
  seqs = jnp.full((b, nb, n), pad_token, jnp.int32)
  init = {"t": jnp.int32(0), "state": state, "last": jnp.full((b * nb,), start_token, jnp.int32),
          "run_seqs": seqs, "run_scores": run_scores, "fin_seqs": seqs,
          "fin_scores": jnp.full((b, nb), -_BIG, jnp.float32), "fin_lens": jnp.zeros((b, nb), jnp.int32),
          "finished": jnp.zeros((b, nb), bool),
          "improvable": jnp.ones((b, 1), bool)}
  c = jax.lax.while_loop(cond, body, init)
  # Running rows hold pad beyond their last token, so finished ones are pad after EOS.
  return BeamOutput(c["fin_seqs"], c["fin_scores"], c["fin_lens"])
