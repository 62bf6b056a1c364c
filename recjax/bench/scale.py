"""`recjax bench scale`: train-step time and memory as the catalog and the device count grow.

Two sweeps, one JSON object per point:

  catalog   one process, the default devices; item vocabularies e.g. 12K -> 1M. Batches
            are random packed rows (ids uniform over the catalog, Beauty-like segment
            lengths), so no dataset of that size is needed.
  devices   one subprocess per count with XLA_FLAGS=--xla_force_host_platform_device_count=N
            and a (data 1, fsdp 1, model N) mesh: the item table (and its optimizer state)
            sharded N ways over 'model'.

Memory per device is XLA's compiled view of the step: `arguments` (parameters, optimizer
state, batch), `temp` (activations, logits, gradients), both per device; `item_table_mib`
is one device's shard of the item embedding; `peak_rss_mib` the process's peak resident
memory (per point with `isolate`: each point in a fresh process). CPU "devices" share the
same cores, so the device sweep shows memory splitting and the cost of the collectives,
not a speed-up.

Variants (`losses`, `optimizers`): the output layer's loss (full [P, V] logits, chunked
exact, sampled over `num_negatives` shared uniform ids; recjax/models/losses.py) and the
item tables' update (dense AdamW; sparse: lazy row-wise Adam of the gathered rows the step
reads, recjax/train/sparse.py; sparse_dense_grads: the same update found from the tables'
dense gradients).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

MIB = 2.0**20
# sparse: lazy rows, only the rows a step reads differentiated (a sampled loss; full and
# chunked read whole tables, so there it is sparse_dense_grads); sparse_dense_grads: lazy
# rows found in the tables' dense gradients (the former path, for comparison).
OPTIMIZERS = ("dense", "sparse", "sparse_dense_grads")


def random_batch(vocab_size: int, batch_size: int, length: int, mask_prob: float, seed: int = 0,
                 mean_len: float = 7.0) -> dict[str, np.ndarray]:
  """Packed rows of random sequences: geometric lengths (mean ~mean_len), ids in the catalog."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch_size, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  weights = np.zeros((batch_size, length), np.float32)
  for r in range(batch_size):
    start, seg = 0, 1
    while start < length:
      n = min(int(rng.geometric(1.0 / mean_len)) + 1, length - start)
      out["segment_ids"][r, start:start + n] = seg
      out["positions"][r, start:start + n] = np.arange(n)
      start, seg = start + n, seg + 1
  items = rng.integers(2, vocab_size, size=(batch_size, length), dtype=np.int32)
  out["targets"][:] = items
  masked = rng.random((batch_size, length)) < mask_prob
  out["inputs"][:] = np.where(masked, 1, items)
  weights[masked] = 1.0
  out["weights"] = weights
  return out


def _model(name: str, vocab_size: int, length: int, dim: int, loss: str = "full", num_negatives: int = 1024,
           loss_chunk: int = 0):
  from recjax.models import bert4rec, sasrec
  cls = {"bert4rec": bert4rec.Bert4Rec, "sasrec": sasrec.SASRec}[name]
  extra = {"num_negatives": num_negatives} if loss == "sampled" else {}
  return cls(vocab_size=vocab_size, max_length=length, dim=dim, loss=loss, loss_chunk=loss_chunk, **extra)


def point(*, vocab_size: int, model: str = "bert4rec", batch_size: int = 32, length: int = 50, dim: int = 64,
          steps: int = 5, model_axis: int = 1, loss: str = "full", optimizer: str = "dense",
          num_negatives: int = 1024, loss_chunk: int = 0) -> dict:
  """Step time and per-device memory of one configuration (in this process)."""
  from recjax.train import loop
  from recjax.train import mesh as mesh_lib
  from recjax.train import sparse
  net_model = _model(model, vocab_size, length, dim, loss, num_negatives, loss_chunk)
  mesh = mesh_lib.create_mesh(data=1, fsdp=-1, model=model_axis)
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  # Sparse: room for every row a step can touch (inputs, targets, negatives).
  max_rows = 2 * batch_size * length + (num_negatives if loss == "sampled" else 0)
  opt = loop.make_optimizer if optimizer == "dense" else functools.partial(
      sparse.make_optimizer, max_rows=max_rows, gather_rows=optimizer == "sparse")
  trainer = loop.Trainer(net_model, mesh, mesh_lib.DEFAULT_RULES, total_steps=10**6, optimizer_fn=opt)
  # SASRec scores every position; Bert4Rec the masked ones.
  batch = random_batch(vocab_size, batch_size, length, mask_prob=1.0 if model == "sasrec" else 0.2)
  with jax.set_mesh(mesh):
    state = trainer.init_state()
    step_fn = trainer.make_train_step()
    g = trainer.to_global(batch)
    compiled = jax.jit(lambda s, b: step_fn(s, b)).lower(state, g).compile()
    mem = compiled.memory_analysis()
    state, _ = step_fn(state, g)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, _ = step_fn(state, g)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    table = state.params["items"]["embedding"]
    shard = table.addressable_shards[0].data
  items = float((batch["segment_ids"] > 0).sum())
  step_s = statistics.median(times)
  return {"bench": "scale", "model": model, "vocab_size": vocab_size, "devices": len(jax.devices()),
          "mesh": dict(mesh.shape), "batch_size": batch_size, "length": length, "dim": dim, "loss": loss,
          "optimizer": optimizer, "num_negatives": num_negatives if loss == "sampled" else 0,
          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
          "step_s": round(step_s, 4), "items_per_s": round(items / step_s, 1),
          "item_table_mib": round(shard.nbytes / MIB, 2), "item_table_shard_rows": int(shard.shape[0]),
          "arguments_mib_per_device": None if mem is None else round(mem.argument_size_in_bytes / MIB, 1),
          "temp_mib_per_device": None if mem is None else round(mem.temp_size_in_bytes / MIB, 1)}


def devices_point(count: int, **kwargs) -> dict:
  """`point` in a subprocess with `count` CPU devices and the item table sharded over them."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if count > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  args = json.dumps(dict(kwargs, model_axis=count))
  out = subprocess.run([sys.executable, "-m", "recjax.bench.scale", args], capture_output=True, text=True,
                       env=env, check=False)
  if out.returncode:
    raise RuntimeError(f"scale point with {count} devices failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, vocab_sizes=(12_101, 100_000, 376_000, 1_000_000), device_counts=(1, 2, 4, 8),
        device_vocab_size: int = 376_000, model: str = "bert4rec", batch_size: int = 32, steps: int = 5,
        losses=("full",), optimizers=("dense",), isolate: bool = False, **shape):
  """Both sweeps; the catalog sweep for every (loss, optimizer) pair; `shape` (length,
  dim, num_negatives) passes through to `point`. isolate: each catalog point in a fresh
  process (its own peak memory)."""
  rows = []
  for loss in losses:
    for optimizer in optimizers:
      for v in vocab_sizes:
        kw = dict(vocab_size=v, model=model, batch_size=batch_size, steps=steps, loss=loss, optimizer=optimizer,
                  **shape)
        rows.append(dict(devices_point(1, **kw) if isolate else point(**kw), sweep="catalog"))
        print(json.dumps(rows[-1]), flush=True)
  for n in device_counts:
    rows.append(dict(devices_point(n, vocab_size=device_vocab_size, model=model, batch_size=batch_size,
                                   steps=steps, **shape), sweep="devices"))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def plot(rows: list[dict], path) -> None:
  """Step time and peak memory against the catalogue, one line per (loss, item update):
  the catalogue sweep of `run` as a figure (docs/performance.md)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cat = [r for r in rows if r.get("sweep", "catalog") == "catalog"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for key in dict.fromkeys((r["loss"], r["optimizer"]) for r in cat):
    pts = sorted((r for r in cat if (r["loss"], r["optimizer"]) == key), key=lambda r: r["vocab_size"])
    xs = [r["vocab_size"] for r in pts]
    label = f"{key[0]} softmax, {key[1]} update"
    axes[0].plot(xs, [r["step_s"] for r in pts], marker="o", label=label)
    axes[1].plot(xs, [r["peak_rss_mib"] / 1024 for r in pts], marker="o", label=label)
  axes[0].set_ylabel("step seconds (median, log)")
  axes[0].set_yscale("log")  # flat vs linear growth reads best on log-log
  axes[1].set_ylabel("peak RSS GiB (process)")
  model = cat[0]["model"] if cat else ""
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel(f"catalogue items ({model}, {cat[0]['batch_size'] if cat else 0} packed rows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  print(json.dumps(point(**json.loads(sys.argv[1]))))
