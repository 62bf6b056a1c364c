"""`recjax bench loop`: what the input pipeline costs the training loop, as an A/B.

Three ways to run the same jitted step, interleaved in rounds so that the machine's
drift (other tenants, thermal) hits all of them alike:

  alone     the step on one fixed, already-placed batch: the compute-only reference
  reuse     the loop as `recjax train` runs it past epoch 0: batches permuted from the
            epoch-0 rows kept in memory (Bert4Rec: packed unmasked, masked per epoch
            in numpy)
  convert   the same loop with the pipeline converting every epoch (`reuse_rows=False`)

For each mode: seconds per step, and the fraction of the loop's wall time the host spent
blocked in `next(data)` (time the device could only fill from already-dispatched steps).
`overhead` = step_s / alone step_s - 1: everything the loop adds to the step, including
tf.data threads competing with XLA for the same cores. Prints one JSON object per mode.
"""

from __future__ import annotations

import json
import time

import jax


def run(task: str, *, model: str = "sasrec", batch_size: int = 128, length: int = 50, dim: int = 64,
        steps: int = 25, rounds: int = 4, seed: int = 0) -> list[dict]:
  from recjax.bench import step as step_bench
  from recjax.data import pipeline
  from recjax.train import loop
  from recjax.train import mesh as mesh_lib
  net_model = step_bench.build_model(model, loop.item_vocab_size(task), length, dim)
  mesh = mesh_lib.create_mesh()
  trainer = loop.Trainer(net_model, mesh, mesh_lib.DEFAULT_RULES, total_steps=10**9, seed=seed)

  def iterator(reuse: bool):
    return pipeline.DataIterator(task, split="train", feature_converter=net_model.feature_converter(seed=seed),
                                 task_feature_lengths={"items": length}, batch_size=batch_size, seed=seed,
                                 reuse_rows=reuse)

  iters = {"convert": iterator(False)}
  reuse = iterator(True) if iters["convert"]._spec.reusable_rows() else None
  if reuse is not None:
    # Past epoch 0 (read without stepping), where the reused rows take over.
    while reuse.state()["epoch"] == 0:
      next(reuse)
    iters["reuse"] = reuse
  timings = {name: [0.0, 0.0, 0] for name in ("alone", *iters)}  # seconds, blocked seconds, steps
  with jax.set_mesh(mesh):
    state, step_fn = trainer.init_state(), trainer.make_train_step()
    fixed = trainer.to_global(next(iters["convert"]))
    state, _ = step_fn(state, fixed)  # compile
    jax.block_until_ready(state)
    for _ in range(rounds):
      for name in timings:
        blocked = 0.0
        t = time.perf_counter()
        for _ in range(steps):
          if name == "alone":
            batch = fixed
          else:
            t_next = time.perf_counter()
            batch = trainer.to_global(next(iters[name]))
            blocked += time.perf_counter() - t_next
          state, _ = step_fn(state, batch)
        jax.block_until_ready(state)
        timings[name][0] += time.perf_counter() - t
        timings[name][1] += blocked
        timings[name][2] += steps
  alone_s = timings["alone"][0] / timings["alone"][2]
  rows = []
  for name, (seconds, blocked, n) in timings.items():
    row = {"bench": "loop", "model": model, "task": task, "mode": name, "batch_size": batch_size, "length": length,
           "steps": n, "step_s": round(seconds / n, 4), "blocked_in_next_fraction": round(blocked / seconds, 4),
           "overhead_vs_alone": round(seconds / n / alone_s - 1, 4)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows
