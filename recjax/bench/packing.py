"""Packed vs padded rows of one gin experiment's model (`recjax bench packing`).

The same model, task, lengths and batch size; only the converter's `pack` differs. For
each: the packing efficiency (real tokens / row slots), and the jitted train step's rate
over the same prefetched batches (compilation excluded): real tokens/s and examples/s.
One JSON line, with packed / padded ratios.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import gin
import jax
import numpy as np

from recjax.train import loop
from recjax.train import mesh as mesh_lib


def _rate(net_model, batches, seed: int) -> float:
  """Seconds per step of the jitted train step over `batches` (after one compiling step)."""
  mesh = mesh_lib.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  trainer = loop.Trainer(net_model, mesh, mesh_lib.DEFAULT_RULES, seed=seed, total_steps=len(batches) + 1)
  with jax.set_mesh(mesh):
    state, step = trainer.init_state(), trainer.make_train_step()
    placed = [trainer.to_global(b) for b in batches]
    state, metrics = step(state, placed[0])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in placed:
      state, metrics = step(state, b)
    jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / len(placed)


def packing(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
            task_feature_lengths: dict = gin.REQUIRED, batch_size: int = gin.REQUIRED, steps: int = 20,
            seed: int = 0) -> dict:
  from recjax.data import pipeline
  net_model = loop.build_model(model, mixture_or_task_name, task_feature_lengths)
  out = {"bench": "packing", "model": type(net_model).__name__, "task": mixture_or_task_name,
         "task_feature_lengths": dict(task_feature_lengths), "batch_size": batch_size, "steps": steps,
         "device": jax.devices()[0].device_kind}
  for name, pack in (("packed", True), ("padded", False)):
    it = pipeline.DataIterator(mixture_or_task_name, split="train", feature_converter=net_model.feature_converter(
        pack=pack, seed=seed), task_feature_lengths=task_feature_lengths, batch_size=batch_size, shuffle=True,
        seed=seed)
    batches = [next(it) for _ in range(steps)]
    segments = np.stack([b["decoder_segment_ids"] for b in batches])
    tokens = int((segments > 0).sum())
    examples = int(sum(((b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0)).sum() for b in batches))
    seconds = _rate(net_model, batches, seed) * steps
    out[name] = {"efficiency": round(tokens / segments.size, 4), "examples_per_row": round(examples / (
        steps * batch_size), 3), "tokens_per_sec": round(tokens / seconds, 1),
        "examples_per_sec": round(examples / seconds, 2), "ms_per_step": round(1e3 * seconds / steps, 2)}
  out["packed_over_padded"] = {k: round(out["packed"][k] / out["padded"][k], 3)
                               for k in ("efficiency", "tokens_per_sec", "examples_per_sec")}
  print(json.dumps(out), flush=True)
  return out
