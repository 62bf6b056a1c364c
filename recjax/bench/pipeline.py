"""`recjax bench pipeline`: throughput of the input pipeline alone, packed vs padded.

Runs the real path a trainer uses (SeqIO task -> Bert4Rec packing converter -> batches as
numpy through `recjax.data.pipeline.DataIterator`), without a model, and reports per mode:

  examples_per_s      user sequences delivered per second
  items_per_s         non-padding positions per second
  packing_efficiency  non-padding fraction of the delivered [batch, length] rows

The first batch (building the pipeline, tracing, the first shuffle buffer) is timed
separately as `startup_s`; the rate covers the `steps` batches after it.

Default data: Beauty when its raw files are in ../shared/data (prepared once into
runs/bench/beauty) or a dataset named "beauty" is registered; else the synthetic set.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any, Iterator

import numpy as np
import seqio

from recjax.data import converters, pipeline, registry

BENCH_DIR = pathlib.Path("runs/bench")


def shared_data_dir() -> pathlib.Path:
  """../shared/data beside the checkout (or $RECJAX_SHARED_DATA)."""
  return pathlib.Path(os.environ.get("RECJAX_SHARED_DATA", pathlib.Path.cwd().parent / "shared" / "data"))


def _log(msg: str) -> None:
  print(f"recjax bench: {msg}", file=sys.stderr, flush=True)


def default_dataset(tasks_module, cache_dir: pathlib.Path = BENCH_DIR) -> str:
  """Name of the dataset to bench: Beauty if available (preparing it once), else synthetic."""
  from recjax.data import prepare  # pylint: disable=g-import-not-at-top
  if "beauty" in registry.names():
    return "beauty"
  raw = shared_data_dir() / "amazon-beauty"
  if (raw / "Beauty.txt").is_file():
    out = cache_dir / "beauty"
    if not (out / prepare.MANIFEST).is_file():
      _log(f"preparing Beauty from {raw} into {out}")
      prepare.prepare("s3rec", raw / "Beauty.txt", out, item_text=raw / "Amazon_Beauty.item",
                      datamaps=raw / "datamaps.json")
    tasks_module.register_dataset_tasks("beauty", out)
    return "beauty"
  if "synthetic" in registry.names():
    return "synthetic"
  out = cache_dir / "synthetic"
  if not (out / prepare.MANIFEST).is_file():
    from recjax.data import synthetic  # pylint: disable=g-import-not-at-top
    _log(f"no Beauty in {shared_data_dir()}: synthesizing the default dataset into {out}")
    synthetic.write_synthetic(cache_dir / "raw", num_users=3000, num_items=800, seed=0, formats=("amazon2018",))
    prepare.prepare("amazon2018", cache_dir / "raw" / "amazon2018" / "Synthetic.json.gz", out,
                    options=prepare.PrepareOptions(kcore=5))
  tasks_module.register_dataset_tasks("synthetic", out)
  return "synthetic"


def _count(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(examples, non-padding positions) in a batch of packed or padded rows."""
  seg = batch["segment_ids"]
  # Segments are numbered 1..k along a row, so the row maximum counts its examples.
  return int(seg.max(axis=1).sum()), int(np.count_nonzero(seg))


def measure(task: str, *, pack: bool, split: str = "train", batch_size: int = 128, length: int = 50,
            steps: int = 100, seed: int = 0) -> dict[str, Any]:
  """One JSON-able measurement of the pipeline for `task` in packed or padded mode."""
  converter = converters.ItemSequencePackingConverter(pack=pack, seed=seed)
  start = time.perf_counter()
  it: Iterator = pipeline.DataIterator(task, split=split, feature_converter=converter,
                                       task_feature_lengths={"items": length}, batch_size=batch_size,
                                       shuffle=True, seed=seed, shard_info=seqio.ShardInfo(0, 1))
  next(it)
  startup = time.perf_counter() - start
  examples = tokens = 0
  start = time.perf_counter()
  for _ in range(steps):
    e, t = _count(next(it))
    examples += e
    tokens += t
  seconds = time.perf_counter() - start
  return {
      "bench": "pipeline", "task": task, "split": split, "mode": "packed" if pack else "padded",
      "batch_size": batch_size, "length": length, "steps": steps,
      "examples_per_s": round(examples / seconds, 1), "items_per_s": round(tokens / seconds, 1),
      "batches_per_s": round(steps / seconds, 2), "examples_per_batch": round(examples / steps, 2),
      "packing_efficiency": round(tokens / (steps * batch_size * length), 4),
      "startup_s": round(startup, 3), "seconds": round(seconds, 3),
  }


def run(task: str, **kwargs) -> Iterator[dict[str, Any]]:
  """Measurements for packed, then padded rows."""
  for pack in (True, False):
    yield measure(task, pack=pack, **kwargs)
