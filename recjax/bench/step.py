"""`recjax bench step`: the jitted Bert4Rec train step alone vs the input pipeline alone.

Prefetches a few batches (timing the pipeline), then times the step on them, so the two
rates come from one run on the same batches. Prints one JSON object.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np


def run(task: str, *, batch_size: int = 128, length: int = 50, steps: int = 20, dim: int = 64) -> dict:
  from recjax.data import pipeline
  from recjax.models import bert4rec
  from recjax.train import loop
  from recjax.train import mesh as mesh_lib
  model = bert4rec.Bert4Rec(vocab_size=loop.item_vocab_size(task), max_length=length, dim=dim)
  mesh = mesh_lib.create_mesh()
  trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, total_steps=steps)
  it = pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                             task_feature_lengths={"items": length}, batch_size=batch_size)
  next(it)  # pipeline start-up is not part of the rate
  t = time.perf_counter()
  batches = [next(it) for _ in range(steps + 1)]
  data_s = (time.perf_counter() - t) / len(batches)
  with jax.set_mesh(mesh):
    state, step = trainer.init_state(), trainer.make_train_step()
    arrays = [trainer.to_global(b) for b in batches]
    state, metrics = step(state, arrays[0])  # compile
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for b in arrays[1:]:
      state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps
  items = float(np.mean([(b["segment_ids"] > 0).sum() for b in batches]))
  out = {"bench": "step", "task": task, "batch_size": batch_size, "length": length, "dim": dim,
         "devices": len(jax.devices()), "step_s": round(step_s, 4), "pipeline_s_per_batch": round(data_s, 4),
         "items_per_batch": items, "step_items_per_s": round(items / step_s, 1),
         "pipeline_items_per_s": round(items / data_s, 1)}
  print(json.dumps(out))
  return out
