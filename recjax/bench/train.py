"""`recjax bench train`: train under a wall-clock budget, evaluating the test split as it goes.

The clock counts training only: the loop stops it (after blocking on the device) for
each full-ranking evaluation of the test split and restarts it after. Rows printed (one
JSON object each) share their schema with the RecBole peer runner
(recjax/bench/peers/recbole_runner.py), so the two compare line for line:

  {"event": "dataset", ...}     sizes, start-up seconds
  {"event": "step_alone", ...}  the jitted step on one repeated batch: its rate, XLA's
                                FLOP count, and model-FLOPs utilisation against --peak_gflops
  {"peer": "recjax", "epoch": k, "train_s", "sequences", "items", "targets", ...,
   "test": {"hr@10", "ndcg@10", ...}, "input_wait_fraction"}   one per evaluation

`input_wait_fraction` = 1 - (step alone) / (step in the loop with the real pipeline): the
share of the loop's time that the input pipeline adds. The learning rate is constant after
a warm-up, because the number of steps a budget buys is not known in advance (RecBole's
is constant as well).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import numpy as np

MODELS = ("sasrec", "bert4rec")


def _model(name: str, vocab_size: int, length: int, dim: int, dropout: float, num_negatives: int = 0,
           **loss):
  from recjax.models import bert4rec, sasrec
  cls = {"sasrec": sasrec.SASRec, "bert4rec": bert4rec.Bert4Rec}.get(name)
  if cls is None:
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
  extra = dict(loss)  # negatives, in_batch_negatives (recjax/models/losses.py)
  if num_negatives:
    if cls is not sasrec.SASRec:
      raise ValueError("num_negatives (sampled softmax) is a SASRec option")
    extra["num_negatives"] = num_negatives
  return cls(vocab_size=vocab_size, max_length=length, dim=dim, num_layers=2, num_heads=2,
             mlp_dim=4 * dim, dropout=dropout, attention_dropout=dropout, **extra)


def _test_metrics(net_model, trainer, params, batches) -> dict:
  from recjax.evaluation import evaluate
  scorer = evaluate.params_scorer(net_model, trainer, params)
  m = evaluate.rank_split(scorer, batches, exclude_history=True, ks=(5, 10, 20))["model"]
  out = {}
  for k in (5, 10, 20):
    out[f"hr@{k}"] = round(float(m[f"recall@{k}"]), 5)
    out[f"ndcg@{k}"] = round(float(m[f"ndcg@{k}"]), 5)
  out["mrr"] = round(float(m["mrr"]), 5)
  return out


def _print(row: dict) -> dict:
  print(json.dumps(row), flush=True)
  return row


def run(task: str, *, model: str = "sasrec", budget_s: float = 900.0, eval_every_s: float = 150.0,
        batch_size: int = 128, length: int = 50, dim: int = 64, dropout: float = 0.3,
        learning_rate: float = 1e-3, warmup_steps: int = 100, peak_gflops: float = 125.0,
        seed: int = 0, max_steps: int | None = None, num_negatives: int = 0, negatives: str = "uniform",
        in_batch_negatives: int = 0, sparse_rows: int = 0) -> list[dict]:
  """Trains for `budget_s` seconds, evaluating the test split as it goes (JSON lines).
  num_negatives / negatives / in_batch_negatives: a sampled softmax (recjax/models/losses.py);
  sparse_rows > 0: lazy row-wise Adam for the item tables with that row capacity
  (recjax/train/sparse.py)."""
  from recjax.data import pipeline
  from recjax.evaluation import evaluate
  from recjax.models import bert4rec
  from recjax.train import loop
  from recjax.train import mesh as mesh_lib

  t_start = time.perf_counter()
  from recjax.train import sparse
  loss = {"negatives": negatives, "in_batch_negatives": in_batch_negatives} if num_negatives or in_batch_negatives else {}
  net_model = _model(model, loop.item_vocab_size(task), length, dim, dropout, num_negatives, **loss)
  mesh = mesh_lib.create_mesh()
  make = functools.partial(sparse.make_optimizer, max_rows=sparse_rows) if sparse_rows else loop.make_optimizer
  optimizer = lambda total: make(total, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                 schedule="constant", weight_decay=0.01)
  trainer = loop.Trainer(net_model, mesh, mesh_lib.DEFAULT_RULES, seed=seed, total_steps=10**9,
                         optimizer_fn=optimizer, frozen_inputs=loop.frozen_inputs(net_model, task))
  data = pipeline.DataIterator(task, split="train", feature_converter=net_model.feature_converter(seed=seed),
                               task_feature_lengths={"items": length}, batch_size=batch_size,
                               shuffle=True, seed=seed)
  test = list(evaluate.eval_batches(task, "test", net_model.eval_feature_converter(), {"items": length}, 256))
  rows = [_print({"event": "dataset", "peer": "recjax", "model": model, "task": task,
                  "catalog_items": net_model.vocab_size - bert4rec.NUM_RESERVED, "test_users": int(sum(b["valid"].sum() for b in test)),
                  "devices": len(jax.devices()), "load_s": round(time.perf_counter() - t_start, 2)})]

  with jax.set_mesh(mesh):
    state = trainer.init_state()
    step_fn = trainer.make_train_step()
    first = next(data)
    # The step alone on one batch: its rate and FLOPs, the reference for input waiting.
    probe = trainer.to_global(first)
    state, _ = step_fn(state, probe)  # compile
    jax.block_until_ready(state)
    t = time.perf_counter()
    n_probe = 5
    for _ in range(n_probe):
      state, _ = step_fn(state, probe)
    jax.block_until_ready(state)
    alone_s = (time.perf_counter() - t) / n_probe
    flops = _step_flops(trainer, state, probe)
    items = float((first["segment_ids"] > 0).sum())
    rows.append(_print({"event": "step_alone", "peer": "recjax", "model": model, "num_negatives": num_negatives,
                        "negatives": negatives, "in_batch_negatives": in_batch_negatives, "sparse_rows": sparse_rows,
                        "step_s": round(alone_s, 4),
                        "items_per_step": items, "items_per_s": round(items / alone_s, 1),
                        "gflop_per_step": None if flops is None else round(flops / 1e9, 2),
                        "mfu": None if flops is None else round(flops / alone_s / (peak_gflops * 1e9), 4),
                        "peak_gflops": peak_gflops}))
    # Fresh parameters for the timed run: the probe's steps are not part of it.
    state = trainer.init_state()
    jax.block_until_ready(state)

    train_s, steps, seqs, n_items, targets, evals = 0.0, 0, 0, 0, 0, 0
    next_eval = min(eval_every_s, budget_s)
    batch = first
    while True:
      t = time.perf_counter()
      while train_s + (time.perf_counter() - t) < next_eval and (max_steps is None or steps < max_steps):
        state, _ = step_fn(state, trainer.to_global(batch))
        # Counted on the host from the numpy batch: no device sync in the loop.
        seg = batch["segment_ids"]
        seqs += int(np.count_nonzero((seg > 0) & (batch["positions"] == 0)))
        n_items += int(np.count_nonzero(seg))
        targets += int(np.count_nonzero(batch["weights"]))
        steps += 1
        batch = next(data)
      jax.block_until_ready(state)
      train_s += time.perf_counter() - t
      t_eval = time.perf_counter()
      metrics = _test_metrics(net_model, trainer, state.params, test)
      evals += 1
      loop_step_s = train_s / max(steps, 1)
      rows.append(_print({
          "peer": "recjax", "model": model, "epoch": evals, "steps": steps, "train_s": round(train_s, 2),
          "eval_s": round(time.perf_counter() - t_eval, 2), "sequences": seqs, "items": n_items,
          "targets": targets, "sequences_per_s": round(seqs / train_s, 1),
          "items_per_s": round(n_items / train_s, 1), "targets_per_s": round(targets / train_s, 1),
          "step_s": round(loop_step_s, 4), "input_wait_fraction": round(max(0.0, 1 - alone_s / loop_step_s), 4),
          "test": metrics, "batch_size": batch_size, "dim": dim, "dropout": dropout,
          "learning_rate": learning_rate, "num_negatives": num_negatives, "versions": {"jax": jax.__version__}}))
      if train_s >= budget_s or (max_steps is not None and steps >= max_steps):
        return rows
      next_eval = min(next_eval + eval_every_s, budget_s)


def _step_flops(trainer, state, batch) -> float | None:
  """FLOPs of one train step by XLA's cost analysis (None where the backend gives none)."""
  step = trainer.make_train_step()
  try:
    lowered = jax.jit(lambda s, b: step(s, b)).lower(state, batch)
    cost = lowered.compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  (cost analysis is best effort per backend)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None
