"""`recjax bench step`: the jitted train step alone vs the input pipeline alone.

Prefetches a few batches (timing the pipeline), then times the step on them, so the two
rates come from one run on the same batches. For FLARE it also times the frozen text
encoder on the text of every position of the same batches (forward only): the work the
on-disk token-state cache removes from each step. Prints one JSON object.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

MODELS = ("bert4rec", "sasrec", "flare", "flare_pooled", "flare_id")


def build_model(name: str, vocab_size: int, length: int, dim: int, project_tables: str = "auto"):
  from recjax.models import bert4rec, flare, sasrec
  if name in ("bert4rec", "sasrec"):
    cls = bert4rec.Bert4Rec if name == "bert4rec" else sasrec.SASRec
    return cls(vocab_size=vocab_size, max_length=length, dim=dim)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
  return flare.Flare(vocab_size=vocab_size, max_length=length, dim=dim, use_text=name != "flare_id",
                     use_perceiver=name != "flare_pooled", project_tables=project_tables)


def _time(fn, batches) -> float:
  out = fn(batches[0])  # compile
  jax.block_until_ready(out)
  t = time.perf_counter()
  for b in batches[1:]:
    out = fn(b)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / (len(batches) - 1)


def run(task: str, *, batch_size: int = 128, length: int = 50, steps: int = 20, dim: int = 64,
        model: str = "bert4rec", pack: bool = True, project_tables: str = "auto") -> dict:
  from recjax.data import pipeline
  from recjax.train import loop
  from recjax.train import mesh as mesh_lib
  net_model = build_model(model, loop.item_vocab_size(task), length, dim, project_tables)
  frozen = loop.frozen_inputs(net_model, task)
  mesh = mesh_lib.create_mesh()
  trainer = loop.Trainer(net_model, mesh, mesh_lib.DEFAULT_RULES, total_steps=steps, frozen_inputs=frozen)
  it = pipeline.DataIterator(task, split="train", feature_converter=net_model.feature_converter(pack=pack),
                             task_feature_lengths={"items": length}, batch_size=batch_size)
  next(it)  # pipeline start-up is not part of the rate
  t = time.perf_counter()
  batches = [next(it) for _ in range(steps + 1)]
  data_s = (time.perf_counter() - t) / len(batches)
  with jax.set_mesh(mesh):
    state, step = trainer.init_state(), trainer.make_train_step()
    arrays = [trainer.to_global(b) for b in batches]

    def one(b):
      nonlocal state
      state, metrics = step(state, b)
      return metrics

    step_s = _time(one, arrays)
  items = float(np.mean([(b["segment_ids"] > 0).sum() for b in batches]))
  out = {"bench": "step", "model": model, "task": task, "pack": pack, "batch_size": batch_size, "length": length,
         "dim": dim, "devices": len(jax.devices()), "step_s": round(step_s, 4),
         "pipeline_s_per_batch": round(data_s, 4), "items_per_batch": items,
         "step_items_per_s": round(items / step_s, 1), "pipeline_items_per_s": round(items / data_s, 1),
         "packing_efficiency": round(items / batches[0]["segment_ids"].size, 4)}
  if frozen:
    out["project_tables"] = project_tables
    out.update(_encode_in_step(net_model, task, batches[:4]))
    out["in_step_over_cached"] = round((step_s + out["encode_s_per_batch"]) / step_s, 2)
  print(json.dumps(out))
  return out


def _encode_in_step(net_model, task: str, batches) -> dict:
  """Seconds per batch to run the frozen encoder on every non-padding position's item text
  (forward only, no gradient: a lower bound on encoding inside the step)."""
  import recjax.tasks as tasks
  from recjax.models import text as text_lib
  from recjax.models.text import cache
  encoder = text_lib.load_text_encoder(net_model.text_encoder)
  ids, mask = encoder.tokenize(cache.item_texts(tasks.data_dir_of(task)), net_model.item_text_length)
  per_batch = []
  for b in batches:
    items = b["inputs"][b["segment_ids"] > 0]
    per_batch.append((ids[items], mask[items]))
  encoder.encode(*per_batch[0])  # compile
  t = time.perf_counter()
  for i, m in per_batch[1:]:
    encoder.encode(i, m)
  seconds = (time.perf_counter() - t) / (len(per_batch) - 1)
  return {"encoder": encoder.name, "text_tokens": int(ids.shape[1]), "encode_s_per_batch": round(seconds, 4)}
