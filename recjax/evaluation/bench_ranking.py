"""Throughput of full-catalog ranking: chunked (recjax) vs dense score-then-sort.

Prints one JSON line per (catalog size, method) and one summary line per
catalog size with ratios against the dense argsort baseline. Methods:

  chunked_ranks       target_ranks, no exclusion
  chunked_ranks_hist  target_ranks excluding a 50-item history per user
  chunked_top_k       top_k (k = --k) with the same history excluded
  dense_count         [B, V] scores, then count >= target (pessimistic ranks)
  dense_argsort       [B, V] scores, full argsort, position of the target (the
                      common baseline; ties broken arbitrarily)

`temp_mib` is XLA's compiled temp allocation (memory_analysis), the peak
working memory beyond inputs and outputs. Times are medians over --repeats
runs, methods interleaved so machine load hits all of them alike.

  PYTHONPATH=. python -m recjax.evaluation.bench_ranking --items 12101,376000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from recjax.evaluation import ranking


def _dense_scores(q, table):
  s = jnp.dot(q, table.T, precision=jax.lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return s.at[:, :ranking.NUM_RESERVED].set(-jnp.inf)


@jax.jit
def dense_count(q, table, targets):
  s = _dense_scores(q, table)
  st = jnp.take_along_axis(s, targets[:, None], axis=1)
  return jnp.sum(s >= st, axis=1) - 1


@jax.jit
def dense_argsort(q, table, targets):
  order = jnp.argsort(-_dense_scores(q, table), axis=1)
  return jnp.argmax(order == targets[:, None], axis=1)


def _methods(args, chunk_size, k):
  q, table, targets, hist = args
  return {
      "chunked_ranks": (
          jax.jit(lambda q, e, t: ranking.target_ranks(q, e, t, chunk_size=chunk_size)),
          (q, table, targets)),
      "chunked_ranks_hist": (
          jax.jit(lambda q, e, t, h: ranking.target_ranks(q, e, t, exclude=h,
                                                          chunk_size=chunk_size)),
          (q, table, targets, hist)),
      "chunked_top_k": (
          jax.jit(lambda q, e, h: ranking.top_k(q, e, k=k, exclude=h, chunk_size=chunk_size)),
          (q, table, hist)),
      "dense_count": (dense_count, (q, table, targets)),
      "dense_argsort": (dense_argsort, (q, table, targets)),
  }


def bench(num_items, batch, dim, chunk_size, k, repeats, methods, seed=0):
  """Benchmarks one catalog size; returns the result dicts (also printed)."""
  vocab = num_items + ranking.NUM_RESERVED
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(vocab, dim)) / np.sqrt(dim), jnp.float32)
  targets = jnp.asarray(rng.integers(2, vocab, batch), jnp.int32)
  hist = jnp.asarray(rng.integers(2, vocab, (batch, 50)), jnp.int32)
  todo = {m: f for m, f in _methods((q, table, targets, hist), chunk_size, k).items()
          if m in methods}
  compiled, results = {}, {}
  for name, (fn, fargs) in todo.items():
    start = time.perf_counter()
    compiled[name] = fn.lower(*fargs).compile()
    mem = compiled[name].memory_analysis()
    out = jax.block_until_ready(compiled[name](*fargs))  # Warm-up.
    results[name] = {"compile_s": round(time.perf_counter() - start, 3),
                     "temp_mib": None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1),
                     "times": [], "out": out}
  for _ in range(repeats):
    for name, (_, fargs) in todo.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*fargs))
      results[name]["times"].append(time.perf_counter() - start)
  lines = []
  ref = results.get("dense_count", {}).get("out")
  for name, r in results.items():
    sec = statistics.median(r["times"])
    line = {"num_items": num_items, "method": name, "batch": batch, "dim": dim,
            "chunk_size": chunk_size if name.startswith("chunked") else None,
            "users_per_s": round(batch / sec, 1), "sec_per_batch": round(sec, 4),
            "times": [round(t, 4) for t in r["times"]], "compile_s": r["compile_s"],
            "temp_mib": r["temp_mib"], "dense_scores_mib": round(batch * vocab * 4 / 2**20, 1)}
    if ref is not None and name in ("chunked_ranks", "dense_argsort"):
      # Float data: two GEMM shapes round differently, so near-ties may flip.
      diff = np.abs(np.asarray(r["out"]) - np.asarray(ref))
      line["rank_agreement_vs_dense_count"] = float(np.mean(diff == 0))
      line["max_rank_diff_vs_dense_count"] = int(diff.max())
    lines.append(line)
    print(json.dumps(line), flush=True)
  if "dense_argsort" in results:
    base = statistics.median(results["dense_argsort"]["times"])
    summary = {"num_items": num_items, "summary": "speedup_vs_dense_argsort",
               "protocol": ranking.ranking_protocol(vocab, exclude_history=False),
               **{m: round(base / statistics.median(r["times"]), 2)
                  for m, r in results.items() if m != "dense_argsort"}}
    print(json.dumps(summary), flush=True)
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", default="12101,376000,1000000",
                      help="comma-separated catalog sizes (real items, PAD/MASK added)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--chunk_size", type=int, default=ranking.DEFAULT_CHUNK_SIZE)
  parser.add_argument("--k", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--methods", default="chunked_ranks,chunked_ranks_hist,chunked_top_k,"
                      "dense_count,dense_argsort")
  args = parser.parse_args(argv)
  print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "load_avg_1m": os.getloadavg()[0]}), flush=True)
  for n in (int(x) for x in args.items.split(",")):
    bench(n, args.batch, args.dim, args.chunk_size, args.k, args.repeats,
          args.methods.split(","))


if __name__ == "__main__":
  main()
