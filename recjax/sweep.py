"""`recjax sweep`: one gin experiment over several seeds, reported as mean +- std.

Each seed trains in MODEL_DIR/seed_N (SEED = N: parameter initialisation, dropout and the
order of the training batches) and is then evaluated by the experiment's own evaluation
(runs/eval.gin; with runs/validation.gin, its best checkpoint), or, with `--evaluation
critique`, by the critiquing evaluation (runs/critique.gin: the in-sequence rows and
Cat-nDCG@10 per level). The runs share this process, one after another, as `recjax main`
runs its stages; a seed whose run finished is not trained again (training resumes from
MODEL_DIR/seed_N), so a sweep interrupted at any point continues where it stopped when run
again. A SIGTERM ends the sweep after the running seed's checkpoint: that seed is not
evaluated and the sweep goes no further. MODEL_DIR/sweep.json holds every seed's metrics
and their mean, sample standard deviation (n - 1), min and max.
On a pod, launch each seed as its own job with --gin.SEED and --gin.MODEL_DIR instead.
"""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Sequence


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' or '0-4' -> [0, 1, 2] / [0, 1, 2, 3, 4]."""
  seeds: list[int] = []
  try:
    for part in text.split(","):
      lo, dash, hi = part.strip().partition("-")
      seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
  except ValueError:
    raise ValueError(f"--seeds {text!r}: expected integers like 0,1,2 or 0-4") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds {text!r}: expected distinct seeds, e.g. 0,1,2")
  return seeds


def aggregate(runs: Sequence[dict]) -> dict[str, dict[str, dict]]:
  """{"split/name": {metric: {mean, std, min, max, values}}} over the runs' results (the
  metrics every run reports; "count" and "skipped", user counts that are the same in all of
  them, are kept as is)."""
  out: dict[str, dict[str, dict]] = {}
  for row in runs[0]["results"]:
    metrics = set.intersection(*(set(r["results"].get(row, {})) for r in runs))
    out[row] = {}
    for m in sorted(metrics):
      values = [float(r["results"][row][m]) for r in runs]
      if m in ("count", "skipped"):  # user counts: the same in every run
        out[row][m] = int(values[0])
        continue
      out[row][m] = {"mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "values": values}
  return out


def format_summary(summary: dict, columns: Sequence[str] | None = None) -> str:
  """A text table of mean +- std per row and metric."""
  present = [m for m in dict.fromkeys(m for row in summary.values() for m in row) if m != "count"]
  columns = [c for c in (columns or present) if c in present]
  header = ["", *columns]
  rows = [[name, *(f"{row[c]['mean']:.4f} ± {row[c]['std']:.4f}" if c in row else "-" for c in columns)]
          for name, row in summary.items()]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(r, widths)))
           for r in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def sweep(args, gin_bindings: list[str], seeds: Sequence[int]) -> dict:
  """Trains and evaluates the experiment once per seed; writes and returns the summary."""
  import gin
  from recjax import gin_cli
  gin_cli.parse_gin(args.gin_file, gin_bindings, args.gin_search_paths)
  base = pathlib.Path(gin.query_parameter("%MODEL_DIR"))
  runs = []
  for seed in seeds:
    model_dir = base / f"seed_{seed}"
    bindings = [*gin_bindings, f"SEED = {seed}", f"MODEL_DIR = '{model_dir}'"]
    print(f"=== seed {seed}: {model_dir}", flush=True)
    trained = gin_cli.train_stage(args, bindings)  # Preempted: no evaluation, no sweep.json
    payload = gin_cli.run_entrypoint(args.evaluation, args, bindings)
    runs.append({"seed": seed, "model_dir": str(model_dir), "step": payload["step"],
                 "source": payload["source"], "results": payload["results"],
                 "train": {k: v for k, v in trained.items() if isinstance(v, (int, float, bool, str))}})
  summary = {"seeds": list(seeds), "protocol": payload["protocol"], "mean_std": aggregate(runs), "runs": runs}
  base.mkdir(parents=True, exist_ok=True)
  (base / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
  present = {m for row in summary["mean_std"].values() for m in row} - {"count", "skipped"}
  columns = [c for k in (5, 10, 20) for c in (f"recall@{k}", f"ndcg@{k}") if c in present]
  columns += sorted(present - set(columns))  # mrr, an evaluator's own (sentiment m@k, ...)
  print(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± sample std:")
  print(format_summary(summary["mean_std"], columns))
  print(f"({payload['protocol']})\nper-seed results: {base / 'sweep.json'}", flush=True)
  return summary
