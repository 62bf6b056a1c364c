"""Training a contract model on in-memory example arrays, on one host.

The drivers of LUMEN, ReAT and the Mender benchmark still build numpy example arrays
and train here (issue: they move onto SeqIO tasks + `loop.train`); every other model
trains through `recjax.train.loop.train`. No checkpoints, no resume, one process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import numpy as np

from recjax.train import loop
from recjax.train import mesh as mesh_lib

log = logging.getLogger("recjax.train.arrays")


def batches(examples: dict, batch_size: int, *, seed: int, fields):
  """Endless shuffled batches (reshuffled every epoch; the ragged tail is dropped)."""
  n = len(examples["weights"])
  if n < batch_size:
    raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
      rows = order[s:s + batch_size]
      yield {k: examples[k][rows] for k in fields}


# -- training and evaluation -------------------------------------------------------------


def train_arrays(model, examples: dict, *, steps: int, batch_size: int = 256, seed: int = 0,
                learning_rate: float = 1e-3, warmup_steps: int = 100, weight_decay: float = 0.0,
                log_every: int = 100, callback: Callable[[int, dict], None] | None = None,
                frozen_inputs: dict | None = None, init_params: Callable | None = None):
  """Trains with `recjax.train.loop.Trainer`'s jitted step on one host. Returns
  (trainer, state, history [{step, loss, accuracy, seconds}]). `frozen_inputs` as for the
  Trainer (models whose memory reads frozen tables, e.g. Mender_Emb); `init_params(params)`
  replaces the fresh parameters (e.g. with a pretrained checkpoint's). Any model with
  `network`, `loss_fn` and `batch_fields` trains here (TIGER, Mender, LUMEN, ReAT)."""
  opt = lambda total: loop.make_optimizer(total, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                          weight_decay=weight_decay, schedule="cosine",
                                          end_learning_rate_fraction=0.1)
  trainer = loop.Trainer(model, mesh_lib.create_mesh(), mesh_lib.DEFAULT_RULES, seed=seed,
                         total_steps=steps, optimizer_fn=opt, frozen_inputs=frozen_inputs or {})
  data = batches(examples, batch_size, seed=seed, fields=model.batch_fields)
  history, window, start = [], [], time.perf_counter()
  with jax.set_mesh(trainer.mesh):
    state = trainer.init_state()
    if init_params is not None:
      # Adam's moments start at zero whatever the values, so only the parameters change.
      state = dataclasses.replace(state, params=jax.device_put(init_params(state.params),
                                                               trainer.param_shardings))
    step_fn = trainer.make_train_step()
    for step in range(1, steps + 1):
      state, metrics = step_fn(state, trainer.to_global(next(data)))
      window.append({k: metrics[k] for k in ("loss_sum", "accuracy_sum", "targets")})
      if step % log_every == 0 or step == steps:
        got = jax.device_get(window)  # the only host sync
        tot = {k: float(sum(m[k] for m in got)) for k in got[0]}
        row = {"step": step, "loss": tot["loss_sum"] / tot["targets"],
               "accuracy": tot["accuracy_sum"] / tot["targets"],
               "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        log.info("train %s", row)
        if callback:
          callback(step, row)
        window = []
  return trainer, state, history
