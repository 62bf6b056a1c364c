"""Generative retrieval: rank the held-out item among a model's decoded items.

The model generates K items per row (`predict_batch`: trie-constrained beam search over
semantic IDs for TIGER); the target's position among them is its rank (past K: a miss).
Recall@k / NDCG@k come from the one metrics core (`ranking.RankingMetrics`); MRR is left
out (it would be truncated at K). History items are not excluded (TIGER's protocol: the
decoder may regenerate an item the user already has). Unconstrained decoding also counts
the returned IDs that name no item (`invalid_id_fraction`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recjax.evaluation import ranking
from recjax.evaluation import scorer as scorer_lib
from flax import nnx

from recjax.models import beam_search as bs

# The eval converters' features a generative model may read (EncoderDecoderConverter,
# PreferenceConverter); those a batch has are passed.
FEATURES = ("encoder_input_tokens", "history", "preferences", "sign", "text")


def trie_tables(sids) -> bs.TrieTables:
  """The decoding trie of a task's semantic IDs (`recjax.tasks.semantic_ids_of`)."""
  return bs.trie_tables_of(sids)


@jax.jit
def _ranks(items, scores, targets, valid):
  top = items.shape[1]
  hit = items == targets[:, None]
  rank = jnp.where(hit.any(1), jnp.argmax(hit, 1), top)  # a miss ranks past every cutoff
  live = jnp.isfinite(scores) & valid[:, None]
  return rank, jnp.stack([jnp.sum(live & (items < 0)), jnp.sum(live)])


def rank_generated(predict: Callable, batches: Iterable[dict], *, ks: Sequence[int],
                   put: Callable = jnp.asarray) -> dict[str, float]:
  """Metrics of `predict(features) -> (items [B, K], scores [B, K])` over eval batches
  (with "target_item" and the "valid" padding mask); `put` makes this process's rows a
  global array (several processes)."""
  acc, counts = ranking.RankingMetrics(ks), []
  top = max(ks)
  for batch in batches:
    items, scores = predict({k: put(batch[k]) for k in FEATURES if k in batch})
    if items.shape[1] < top:
      raise ValueError(f"the model returned {items.shape[1]} items per row, fewer than max(ks) = {top}: "
                       "decode with at least that many beams")
    valid = put(batch["valid"])
    rank, count = _ranks(items[:, :top], scores[:, :top], put(batch["target_item"]), valid)
    acc.update(rank, valid=valid)
    counts.append(count)
  out = {k: v for k, v in acc.result().items() if k != "mrr"}
  invalid, live = np.sum(jax.device_get(counts), 0) if counts else (0, 0)
  out["invalid_id_fraction"] = float(invalid) / max(float(live), 1.0)
  return out


def decode(predict: Callable, batches: Iterable[dict], *, top: int) -> tuple[np.ndarray, np.ndarray]:
  """(items [N, top], targets [N]) of every valid row, in order (one process)."""
  if jax.process_count() > 1:
    raise NotImplementedError("decoding whole splits to the host runs in one process")
  items, targets = [], []
  for batch in batches:
    got, _ = predict({k: jnp.asarray(batch[k]) for k in FEATURES if k in batch})
    valid = np.asarray(batch["valid"])
    items.append(np.asarray(jax.device_get(got))[valid, :top])
    targets.append(np.asarray(batch["target_item"])[valid])
  return np.concatenate(items), np.concatenate(targets)


def checkpoint_predictor(model, trainer, params, tables: bs.TrieTables, *, num_beams: int,
                         constrained: bool = True, free: bool = False) -> Callable:
  """predict(features) -> (items, scores) of in-memory parameters (jitted once per model,
  trainer and decoding options: a run validating every N steps compiles it once)."""
  def build():
    @jax.jit
    def run(params, tables, frozen, batch):
      if frozen:
        batch = dict(batch, frozen=frozen)
      return model.predict_batch(trainer.network(params), batch, tables, num_beams=num_beams,
                                 constrained=constrained, free=free)
    return run

  run = scorer_lib.jitted_for(trainer, (id(model), "predict", num_beams, constrained, free), build)
  return lambda batch: run(params, tables, trainer.frozen, batch)


def evaluate_arrays(model, net, examples: dict, tables: bs.TrieTables, *,
                   num_beams: int = 20, ks=(5, 10), batch_size: int = 256, constrained: bool = True,
                   free: bool = False, frozen: dict | None = None, return_items: bool = False) -> dict:
  """Recall@K / NDCG@K of the top beams (history not excluded) and, for unconstrained
  decoding, the fraction of returned IDs (top max(ks) live beams) that name no item.
  `frozen`: the trainer's frozen inputs on device (`Trainer.frozen`), for models that read
  them; `return_items`: also return the top max(ks) items per example ("items" [N, K])."""
  top = max(ks)
  if num_beams < top:
    raise ValueError(f"num_beams ({num_beams}) must be at least max(ks) ({top})")

  graphdef, params = nnx.split(net)

  @jax.jit  # parameters and tables as arguments, not constants baked into the program
  def run(params, tables, frozen, batch):
    net = nnx.merge(graphdef, params)
    if frozen:
      batch = dict(batch, frozen=frozen)
    _, scores, items = model.generate(net, batch, tables, num_beams=num_beams, constrained=constrained,
                                    free=free)
    hit = items[:, :top] == batch["target_items"][:, None]
    rank = jnp.where(hit.any(1), jnp.argmax(hit, 1), top)  # a miss ranks past every cutoff
    live = jnp.isfinite(scores[:, :top]) & (batch["weights"][:, None] > 0)
    return rank, jnp.stack([jnp.sum(live & (items[:, :top] < 0)), jnp.sum(live)]), items[:, :top]

  acc, counts, tops = ranking.RankingMetrics(ks), [], []
  n = len(examples["weights"])
  fields = [f for f in model.batch_fields if f not in ("decoder_target_tokens", "decoder_loss_weights")]
  fields += ["target_items"]
  for s in range(0, n, batch_size):
    batch = {k: examples[k][s:s + batch_size] for k in fields}
    pad = batch_size - len(batch["weights"])  # one shape: one compilation
    batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    rank, count, items = run(params, tables, frozen or {}, batch)
    acc.update(rank, valid=batch["weights"] > 0)
    counts.append(count)
    if return_items:
      tops.append(items[:batch_size - pad])
  out = {k: v for k, v in acc.result().items() if k != "mrr"}  # MRR would be truncated at `top`
  invalid, live = np.sum(jax.device_get(counts), 0)
  out["invalid_id_fraction"] = float(invalid) / max(float(live), 1.0)
  if return_items:
    out["items"] = np.concatenate(jax.device_get(tops)) if tops else np.zeros((0, top), np.int32)
  return out
