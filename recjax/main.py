"""The `recjax` command line.

  recjax main      the README's main job on the embedded synthetic data
  recjax synth     write a synthetic dataset in public raw formats
  recjax prepare   turn raw files in a public format into a prepared dataset
  recjax tasks     list the registered SeqIO tasks and mixtures, show decoded examples
  recjax train     train a model (gin: --gin_file, --gin.NAME=VALUE, --gin_search_paths)
  recjax evaluate  full-catalog ranking metrics of a checkpoint (or --exported DIR)
  recjax infer     top-k recommendations per user as JSON lines
  recjax export    a self-contained directory: params, config, vocab, serialized scoring
  recjax bench     measure parts of the system (`bench pipeline`: the input pipeline)
  recjax fit       build a derived artifact of a prepared dataset (gin/fits/: semantic IDs,
                   item text embeddings, WALS vectors, the preference benchmark)

Errors in the input (a malformed line, a missing file, a bad option) print one sentence
naming the file/line/field or the option at fault and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from recjax.data.formats.common import FormatError

FORMATS = ("s3rec", "recbole", "lcrec", "amazon2014", "amazon2018", "steam", "regen")

# The embedded default: small enough for the main job to run in seconds on a laptop CPU.
DEFAULT_SYNTH = {"num_users": 3000, "num_items": 800, "seed": 0}


class UsageError(Exception):
  """A bad command-line value; reported as one sentence, exit status 2."""


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--format", required=True, choices=FORMATS, help="format of the raw input")
  p.add_argument("--input", required=True, help="interaction file (sequences, reviews, REGEN jsonl)")
  p.add_argument("--item_text", help="item metadata file (RecBole .item, LC-Rec .item.json, Amazon "
                 "meta_*.json.gz, steam_games.json.gz); found next to --input when omitted")
  p.add_argument("--datamaps", help="P5 datamaps.json mapping s3rec ids to ASINs (s3rec only)")
  p.add_argument("--output", required=True, help="directory for the prepared dataset")
  p.add_argument("--kcore", type=int, default=0,
                 help="keep users and items with at least K interactions, to a fixed point (0 = off)")
  p.add_argument("--min_seq_len", type=int, default=3,
                 help="drop users with fewer interactions (>= 3: train, valid and test items)")
  p.add_argument("--dedupe_consecutive", action="store_true",
                 help="drop an item that repeats the user's previous item")
  p.add_argument("--max_seq_len", type=int, default=0,
                 help="keep each user's most recent N interactions (0 = all)")
  p.add_argument("--short_ids", action="store_true",
                 help="random short item ids (I123) for text tasks instead of I<item_id>")
  p.add_argument("--seed", type=int, default=0, help="seed of the short-id permutation")
  p.add_argument("--category_root", default="",
                 help="top-level category put first in every item's category path that lacks it "
                      "(e.g. 'Office Products' for LC-Rec's Office files, which start one level below)")
  p.add_argument("--skip_bad_lines", action="store_true",
                 help="skip malformed lines, counting them in the manifest, instead of failing")


def _add_synth_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--output", required=True, help="directory for the raw files")
  p.add_argument("--num_users", type=int, default=DEFAULT_SYNTH["num_users"])
  p.add_argument("--num_items", type=int, default=DEFAULT_SYNTH["num_items"])
  p.add_argument("--seed", type=int, default=DEFAULT_SYNTH["seed"])
  p.add_argument("--formats", default="amazon2018,regen",
                 help="comma-separated raw formats to write: amazon2018, regen")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="recjax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("main", help="the main job: synthesize, prepare, train, evaluate, export",
                     description="Generates the embedded synthetic dataset (Amazon 2018 + REGEN raw "
                     "formats), prepares both, trains Bert4Rec (gin/experiments/quickstart.gin), "
                     "evaluates it against a popularity baseline with full ranking, exports it and "
                     "re-evaluates the export; then trains FLARE with critiques "
                     "(gin/experiments/quickstart_flare.gin), runs the critiquing evaluation and "
                     "shows one user's recommendations with and without a critique; last, a small "
                     "LUMEN model (recommends and writes the endorsement) and one conversation from it. "
                     "--gin.NAME=VALUE overrides apply to every step of the first model (not to FLARE).")
  p.add_argument("--workdir", default="runs/default", help="where data, checkpoints and exports go")
  p.add_argument("--num_users", type=int, default=DEFAULT_SYNTH["num_users"])
  p.add_argument("--num_items", type=int, default=DEFAULT_SYNTH["num_items"])
  p.add_argument("--seed", type=int, default=DEFAULT_SYNTH["seed"])
  p.add_argument("--gin_file", help="experiment gin file (default experiments/quickstart.gin)")
  p.add_argument("--flare_gin_file", default="experiments/quickstart_flare.gin",
                 help="gin file of the FLARE-with-critiques part")
  p.add_argument("--flare_steps", type=int, default=None,
                 help="FLARE training steps (default: the gin file's TRAIN_STEPS); 0 skips FLARE")
  p.add_argument("--flare_batch_size", type=int, default=None,
                 help="FLARE batch size (default: the gin file's BATCH_SIZE)")
  p.add_argument("--lumen_steps", type=int, default=300,
                 help="training steps of the small LUMEN model (0 skips the conversational example)")
  p.set_defaults(func=cmd_main)

  p = sub.add_parser("synth", help="write a synthetic dataset in Amazon 2018 and REGEN formats",
                     description="Writes raw files generated from a learnable world model "
                     "(category tree, users with preferences and sequential habits, reviews, "
                     "critiques, narratives). Deterministic by --seed.")
  _add_synth_args(p)
  p.set_defaults(func=cmd_synth)

  p = sub.add_parser("prepare", help="raw public-format files -> prepared dataset directory",
                     description="Reads one public format and writes items.parquet, "
                     "sequences.parquet and manifest.json (k-core, chronological order, "
                     "dense ids with PAD=0/MASK=1, leave-one-out split).")
  _add_prepare_args(p)
  p.set_defaults(func=cmd_prepare)

  p = sub.add_parser("tasks", help="list the registered SeqIO tasks and mixtures, or show examples",
                     description="Tasks are registered for every prepared dataset found under "
                     "$RECJAX_DATA_DIR (default runs/default/prepared) and every --dataset NAME=DIR.")
  tasks_sub = p.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
  q = tasks_sub.add_parser("list", help="every registered task and mixture, grouped by dataset")
  _add_dataset_arg(q)
  q.set_defaults(func=cmd_tasks_list)
  q = tasks_sub.add_parser("show", help="decoded examples of a task or mixture")
  q.add_argument("task", help="task or mixture name (see `recjax tasks list`)")
  q.add_argument("--split", default="train", help="train, validation or test")
  q.add_argument("-n", "--num_examples", type=int, default=3, help="examples to show")
  q.add_argument("--max_items", type=int, default=20,
                 help="show at most the last N positions of an item sequence")
  _add_dataset_arg(q)
  q.set_defaults(func=cmd_tasks_show)

  p = sub.add_parser("bench", help="benchmarks that print one JSON object per line")
  bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
  q = bench_sub.add_parser("pipeline", help="input-pipeline throughput and packing efficiency, packed vs padded",
                           description="Examples/s and items/s of the input pipeline alone (task -> "
                           "packing converter -> numpy batches) and the non-padding fraction "
                           "(packing_efficiency) of packed and of padded rows. Defaults to Beauty "
                           "(prepared once into runs/bench/beauty from ../shared/data) when present, "
                           "else the synthetic set.")
  _add_dataset_arg(q)
  q.add_argument("--task", help="an item-sequence task (default: DATASET_items of --dataset's first "
                 "name, or of Beauty / synthetic)")
  q.add_argument("--split", default="train")
  q.add_argument("--batch_size", type=int, default=128, help="rows per batch")
  q.add_argument("--length", type=int, default=50, help="row length (items per row)")
  q.add_argument("--steps", type=int, default=100, help="batches timed per mode, after a warm-up batch")
  q.add_argument("--seed", type=int, default=0)
  q.set_defaults(func=cmd_bench_pipeline)
  q = bench_sub.add_parser("step", help="the jitted train step alone vs the input pipeline alone",
                           description="Times the pipeline on N prefetched batches, then the jitted "
                           "train step on the same batches; one JSON line.")
  _add_dataset_arg(q)
  q.add_argument("--task", default="beauty_items", help="an item-sequence task")
  q.add_argument("--batch_size", type=int, default=128)
  q.add_argument("--length", type=int, default=50)
  q.add_argument("--dim", type=int, default=64)
  q.add_argument("--steps", type=int, default=20)
  q.add_argument("--model", default="bert4rec", choices=["bert4rec", "sasrec", "flare", "flare_pooled", "flare_id"],
                 help="flare*: also times encoding the batch's item texts with the frozen encoder, "
                 "i.e. what the step would cost without the token-state cache")
  q.add_argument("--padded", action="store_true", help="one sequence per row instead of packed rows")
  q.add_argument("--project_tables", default="auto", choices=["auto", "always", "never"],
                 help="flare: project text tables once per step, or gather token states per position")
  q.set_defaults(func=cmd_bench_step)
  q = bench_sub.add_parser("loop", help="what the input pipeline costs the training loop (A/B)",
                           description="Times the jitted step alone, in the loop with epoch-0 rows "
                           "reused, and in the loop converting every epoch, interleaved in rounds; one "
                           "JSON line per mode.")
  _add_dataset_arg(q)
  q.add_argument("--task", default="beauty_items", help="an item-sequence task")
  q.add_argument("--model", default="sasrec", choices=["sasrec", "bert4rec"])
  q.add_argument("--batch_size", type=int, default=128)
  q.add_argument("--length", type=int, default=50)
  q.add_argument("--steps", type=int, default=25, help="steps per mode per round")
  q.add_argument("--rounds", type=int, default=4)
  q.set_defaults(func=cmd_bench_loop)
  q = bench_sub.add_parser("train", help="train under a wall-clock budget, evaluating the test split as it goes",
                           description="Trains SASRec or Bert4Rec (2 layers, 2 heads, --dim) for --budget_s "
                           "seconds of training (evaluation pauses the clock), evaluating full-ranking "
                           "test metrics every --eval_every_s; one JSON line per evaluation, in the "
                           "schema of the RecBole peer runner. Defaults to Beauty when present.")
  _add_dataset_arg(q)
  q.add_argument("--task", help="an item-sequence task (default: DATASET_items, Beauty or synthetic)")
  q.add_argument("--model", default="sasrec", choices=["sasrec", "bert4rec"])
  q.add_argument("--budget_s", type=float, default=900.0, help="training seconds (evaluation excluded)")
  q.add_argument("--eval_every_s", type=float, default=150.0)
  q.add_argument("--max_steps", type=int, help="stop after this many steps as well (smoke runs)")
  q.add_argument("--batch_size", type=int, default=128, help="packed rows per batch")
  q.add_argument("--length", type=int, default=50)
  q.add_argument("--dim", type=int, default=64)
  q.add_argument("--dropout", type=float, default=0.3)
  q.add_argument("--learning_rate", type=float, default=1e-3)
  q.add_argument("--num_negatives", type=int, default=0,
                 help="SASRec: sampled softmax over this many shared uniform negatives (0 = full catalog)")
  q.add_argument("--negatives", default="uniform", choices=["uniform", "popularity", "mixed"],
                 help="how the sampled negatives are drawn")
  q.add_argument("--in_batch_negatives", type=int, default=0, help="the step's own targets as negatives too")
  q.add_argument("--sparse_rows", type=int, default=0,
                 help="> 0: lazy row-wise Adam for the item tables with this row capacity per step")
  q.add_argument("--peak_gflops", type=float, default=125.0,
                 help="the machine's float32 matmul peak, for model-FLOPs utilisation")
  q.set_defaults(func=cmd_bench_train)
  q = bench_sub.add_parser("scale", help="train-step time and per-device memory vs catalog size and device count",
                           description="Random packed batches at catalogs of --items, one process; then "
                           "the same step on 1..8 CPU devices (subprocesses) with the item table sharded "
                           "over 'model'.")
  q.add_argument("--items", default="12101,100000,376000,1000000", help="comma-separated catalog sizes")
  q.add_argument("--devices", default="1,2,4,8", help="comma-separated CPU device counts")
  q.add_argument("--device_items", type=int, default=376_000, help="catalog size of the device sweep")
  q.add_argument("--model", default="bert4rec", choices=["bert4rec", "sasrec"])
  q.add_argument("--batch_size", type=int, default=32)
  q.add_argument("--losses", default="full", help="comma-separated output losses: full,chunked,sampled")
  q.add_argument("--optimizers", default="dense", help="comma-separated item-table updates: dense,sparse,sparse_dense_grads")
  q.add_argument("--num_negatives", type=int, default=1024, help="negatives of the sampled loss")
  q.add_argument("--isolate", action="store_true", help="each catalog point in a fresh process (peak RSS)")
  q.add_argument("--steps", type=int, default=5, help="timed steps per point (the median is reported)")
  q.add_argument("--results", help="also append the points to this JSON-lines file")
  q.add_argument("--plot", help="write the catalogue sweep (step time, peak RSS per loss and update) "
                 "to this PNG; with --results, every point in that file")
  q.set_defaults(func=cmd_bench_scale)
  q = bench_sub.add_parser("all", help="every benchmark in turn (JSON lines in --results), then the report",
                           description="Runs pipeline, step (packed/padded), ranking, scale and train (recjax "
                           "SASRec, then RecBole SASRec and BERT4Rec in a virtualenv the command creates) "
                           "one after another, appending JSON lines to RESULTS/<bench>.jsonl, then rewrites "
                           "the generated part of docs/performance.md. Run it on an otherwise idle machine.")
  _add_dataset_arg(q)
  q.add_argument("--results", default="runs/bench/results")
  q.add_argument("--budget_s", type=float, default=900.0, help="training seconds per trainer")
  q.add_argument("--eval_every_s", type=float, default=150.0)
  q.add_argument("--only", help="comma-separated subset of pipeline,step,loop,ranking,scale,train")
  q.add_argument("--no_peers", action="store_true", help="skip the RecBole peers (no virtualenv)")
  q.add_argument("--venv_root", default="runs/bench", help="where the RecBole virtualenv is built (once)")
  q.add_argument("--doc", default="docs/performance.md")
  q.set_defaults(func=cmd_bench_all)
  q = bench_sub.add_parser("packing", help="packed vs padded rows of a gin experiment's model (decoder-only "
                           "text models: LUMEN): packing efficiency and train-step tokens/s side by side")
  from recjax import gin_cli  # pylint: disable=g-import-not-at-top
  gin_cli.add_gin_args(q)
  _add_dataset_arg(q)
  q.add_argument("--steps", type=int, default=20, help="timed train steps per layout")
  q.set_defaults(func=cmd_bench_packing)
  q = bench_sub.add_parser("report", help="tables and plots of docs/performance.md from --results")
  q.add_argument("--results", default="runs/bench/results")
  q.add_argument("--doc", default="docs/performance.md")
  q.set_defaults(func=cmd_bench_report)
  from recjax import gin_cli
  for command, (_, _, help_text) in gin_cli.ENTRYPOINTS.items():
    q = sub.add_parser(command, help=help_text, description=gin_cli.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_cli.add_gin_args(q)
    _add_dataset_arg(q)
    if command == "evaluate":
      q.add_argument("--exported", help="evaluate an export directory instead of a checkpoint")
    q.set_defaults(func=cmd_gin, gin_command=command)
  q = sub.add_parser("sweep", help="train + evaluate one gin experiment once per seed; mean ± std "
                     "(MODEL_DIR/seed_N, MODEL_DIR/sweep.json)")
  gin_cli.add_gin_args(q)
  _add_dataset_arg(q)
  q.add_argument("--seeds", default="0,1,2", help="seeds: 0,1,2 or 0-4 (default 0,1,2)")
  q.add_argument("--evaluation", choices=("evaluate", "critique"), default="evaluate",
                 help="the evaluation each seed gets: the experiment's ranking evaluation (runs/eval.gin) or "
                 "the critiquing evaluation (runs/critique.gin); default evaluate")
  q.set_defaults(func=cmd_sweep)
  return parser


def cmd_sweep(args) -> None:
  from recjax import gin_cli, sweep  # pylint: disable=g-import-not-at-top
  seeds = sweep.parse_seeds(args.seeds)  # before TensorFlow / JAX load: a bad flag answers at once
  gin_cli.check_files(args.gin_file, args.gin_search_paths)
  _load_tasks(args)
  sweep.sweep(args, args.gin_bindings, seeds)


def cmd_gin(args) -> None:
  from recjax import gin_cli
  gin_cli.check_files(args.gin_file, args.gin_search_paths)  # before TensorFlow / JAX load: answers at once
  if args.gin_command == "fit":
    cmd_fit(args)
    return
  _load_tasks(args)
  gin_cli.run_entrypoint(args.gin_command, args, args.gin_bindings)


def cmd_fit(args) -> None:
  """`recjax fit`: registers the --dataset names (no tasks: a fit reads the prepared files),
  runs the gin file's fit and prints its summary as JSON."""
  import json  # pylint: disable=g-import-not-at-top
  from recjax import gin_cli  # pylint: disable=g-import-not-at-top
  from recjax.artifacts import checkpoints  # pylint: disable=g-import-not-at-top
  from recjax.data import registry  # pylint: disable=g-import-not-at-top
  _import_tasks()  # gin parsing imports recjax.tasks (its configurables); a source checkout has `tasks`
  for spec in args.dataset:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise UsageError(f"--dataset {spec!r}: expected NAME=DIR")
    registry.register_dataset(name, path)
  try:
    result = gin_cli.run_entrypoint("fit", args, args.gin_bindings)
  except checkpoints.FitInterrupted as e:
    print(json.dumps({"stopped_at": e.step, "message": str(e).splitlines()[0]}), flush=True)
    return
  print(json.dumps(result, default=str), flush=True)


def _add_dataset_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR",
                 help="register the prepared dataset in DIR as NAME (repeatable)")


def _import_tasks():
  """The task registrations (`recjax.tasks`; `tasks` in a source checkout not pip-installed)."""
  try:
    from recjax import tasks  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "recjax.tasks":
      raise
    import tasks  # pylint: disable=g-import-not-at-top
  return tasks


def _load_tasks(args):
  """Imports the registrations and registers every --dataset NAME=DIR; returns the module."""
  specs = []
  for spec in args.dataset:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise UsageError(f"--dataset {spec!r}: expected NAME=DIR")
    specs.append((name, path))
  tasks = _import_tasks()
  for name, path in specs:
    tasks.register_dataset_tasks(name, path)
  return tasks


def _provider(name: str):
  import difflib  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  known = sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})
  if name not in known:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"unknown task or mixture {name!r}; {hint}`recjax tasks list` shows them all")
  return seqio.get_mixture_or_task(name)


def cmd_tasks_list(args) -> None:
  import seqio  # pylint: disable=g-import-not-at-top
  from recjax.data import registry  # pylint: disable=g-import-not-at-top
  tasks = _load_tasks(args)
  groups = tasks.tasks_by_dataset()
  if not groups:
    print(f"no datasets registered: prepare one into {registry.data_root()}/NAME, set RECJAX_DATA_DIR, "
          "or pass --dataset NAME=DIR")
  ours = {t for names in groups.values() for t in names}
  others = sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()} - ours)
  if others:
    groups["(registered elsewhere)"] = others
  width = max([len(t) for names in groups.values() for t in names] + [10])
  for dataset, names in groups.items():
    if dataset in registry.names():
      ds = registry.get(dataset)
      print(f"{dataset}  {ds.data_dir}  ({ds.num_users:,} users, {ds.num_items:,} items)")
    else:
      print(dataset)
    for name in names:
      kind = "mixture" if name in seqio.MixtureRegistry.names() else "task"
      print(f"  {name:<{width}}  {kind:<7}  {tasks.describe(name)}")
    print()


def cmd_tasks_show(args) -> None:
  import seqio  # pylint: disable=g-import-not-at-top
  tasks = _load_tasks(args)
  provider = _provider(args.task)
  if args.split not in provider.splits:
    raise UsageError(f"{args.task} has no split {args.split!r}; it has {', '.join(provider.splits)}")
  if args.num_examples < 1:
    raise UsageError(f"-n must be >= 1, got {args.num_examples}")
  kwargs = dict(split=args.split, shuffle=False, num_epochs=1, trim_output_features=False, try_in_mem_cache=False)
  if isinstance(provider, seqio.Mixture):
    kwargs.update(seed=0, passthrough_features=["example_id", "user_id"])
  ds = provider.get_dataset(None, **kwargs).take(args.num_examples)
  titles = _item_titles(tasks.data_dir_of(args.task))
  for i, ex in enumerate(ds.as_numpy_iterator()):
    print(f"--- {args.task} {args.split} example {i + 1}")
    print(_render_example(ex, provider.output_features, titles, args.max_items))


def _clip(text: str, width: int) -> str:
  return text if len(text) <= width else text[:width - 3] + "..."


def _text(value):
  """A numpy value as text: bytes decoded, arrays as lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  if hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, list):
    return [_text(v) for v in value]
  return value


def _item_titles(data_dir) -> dict[int, str]:
  if data_dir is None:
    return {}
  from recjax.data.prepared import PreparedDataset  # pylint: disable=g-import-not-at-top
  return PreparedDataset(data_dir).item_titles()


def _render_example(ex, features, titles: dict[int, str], max_items: int) -> str:
  """Every feature decoded through its vocabulary; item sequences one item per line, with
  titles and the per-position (critique) features that align with them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from recjax.data.vocab import ItemVocabulary, SemanticIdVocabulary  # pylint: disable=g-import-not-at-top
  lines = []
  item_keys = [k for k, f in features.items() if k in ex and isinstance(f.vocabulary, ItemVocabulary)
               and not isinstance(f.vocabulary, SemanticIdVocabulary)]
  per_position = {k: [c for c in features if c in ex and c not in item_keys and np.ndim(ex[c]) == 1
                      and np.ndim(ex[k]) == 1 and len(ex[c]) == len(ex[k])
                      and hasattr(features[c].vocabulary, "lookup")] for k in item_keys}
  shown = set(item_keys) | {c for cols in per_position.values() for c in cols}
  decoded = {k: f.vocabulary.decode(np.atleast_1d(ex[k]).tolist()) for k, f in features.items()
             if k in ex and k not in shown}
  for k, v in ex.items():  # features without a vocabulary: ids, positions, raw text
    if k in features or decoded.get(k.removesuffix("_pretokenized")) == _text(v):
      continue  # a "_pretokenized" copy that decodes identically adds nothing
    lines.append(f"{k}: {_text(v)}")
  for k, text in decoded.items():
    lines.append(f"{k}: {text!r}" + (f"  ({np.size(ex[k])} ids)" if np.ndim(ex[k]) else ""))
  for k in item_keys:
    ids = np.atleast_1d(ex[k]).tolist()
    cols = per_position[k]
    head = f"{k}: {len(ids)} items" + (f" (+ {', '.join(cols)})" if cols else "")
    if len(ids) > max_items:
      head += f", first {len(ids) - max_items} not shown"
    lines.append(head)
    for pos in range(max(0, len(ids) - max_items), len(ids)):
      i = ids[pos]
      token = features[k].vocabulary.decode([i]) if i else "[PAD]"
      row = f"  {pos:>4}  {token:>7}  {_clip(titles.get(i, ''), 60)}"
      for c in cols:
        crit = features[c].vocabulary.lookup(int(ex[c][pos]))
        row += f"  | {c}: {crit or '-'}"
      lines.append(row)
  return "\n".join(lines)


def cmd_bench_step(args) -> None:
  from recjax.bench import step
  _load_tasks(args)
  _provider(args.task)
  step.run(args.task, batch_size=args.batch_size, length=args.length, steps=args.steps, dim=args.dim,
           model=args.model, pack=not args.padded, project_tables=args.project_tables)


def cmd_bench_loop(args) -> None:
  from recjax.bench import loop as loop_bench  # pylint: disable=g-import-not-at-top
  _load_tasks(args)
  _provider(args.task)
  if args.steps < 1 or args.rounds < 1:
    raise UsageError(f"--steps and --rounds must be >= 1, got {args.steps}, {args.rounds}")
  loop_bench.run(args.task, model=args.model, batch_size=args.batch_size, length=args.length,
                 steps=args.steps, rounds=args.rounds)




def _bench_task(args) -> str:
  """--task, else DATASET_items of the first --dataset, else Beauty (prepared once) or synthetic."""
  from recjax.bench import pipeline as bench  # pylint: disable=g-import-not-at-top
  tasks = _load_tasks(args)
  task = getattr(args, "task", None)
  if task is None:
    dataset = args.dataset[0].partition("=")[0] if args.dataset else bench.default_dataset(tasks)
    task = f"{dataset}_items"
  _provider(task)
  return task


def cmd_bench_train(args) -> None:
  from recjax.bench import train  # pylint: disable=g-import-not-at-top
  task = _bench_task(args)
  if args.budget_s <= 0 or args.eval_every_s <= 0:
    raise UsageError(f"--budget_s and --eval_every_s must be > 0, got {args.budget_s}, {args.eval_every_s}")
  train.run(task, model=args.model, budget_s=args.budget_s, eval_every_s=args.eval_every_s,
            batch_size=args.batch_size, length=args.length, dim=args.dim, dropout=args.dropout,
            learning_rate=args.learning_rate, peak_gflops=args.peak_gflops, max_steps=args.max_steps,
            num_negatives=args.num_negatives, negatives=args.negatives,
            in_batch_negatives=args.in_batch_negatives, sparse_rows=args.sparse_rows)


def cmd_bench_scale(args) -> None:
  import json  # pylint: disable=g-import-not-at-top
  from recjax.bench import scale  # pylint: disable=g-import-not-at-top
  rows = scale.run(vocab_sizes=[int(x) for x in args.items.split(",") if x],
                   device_counts=[int(x) for x in args.devices.split(",") if x],
                   device_vocab_size=args.device_items, model=args.model, batch_size=args.batch_size,
                   losses=args.losses.split(","), optimizers=args.optimizers.split(","), isolate=args.isolate,
                   num_negatives=args.num_negatives, steps=args.steps)
  if args.results:
    path = pathlib.Path(args.results)
    with path.open("a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if args.plot:
    scale.plot([r for r in rows if r.get("model") == args.model], args.plot)
    print(f"plot: {args.plot}")


def cmd_bench_all(args) -> None:
  from recjax.bench import pipeline as bench  # pylint: disable=g-import-not-at-top
  from recjax.bench import suite  # pylint: disable=g-import-not-at-top
  task = _bench_task(args)
  only = args.only.split(",") if args.only else None
  suite.run_all(pathlib.Path(args.results), task, budget_s=args.budget_s, eval_every_s=args.eval_every_s,
                raw_beauty=bench.shared_data_dir() / "amazon-beauty", peers=not args.no_peers, only=only,
                venv_root=pathlib.Path(args.venv_root))
  suite.report(pathlib.Path(args.results), pathlib.Path(args.doc))
  print(f"wrote {args.doc}")


def cmd_bench_packing(args) -> None:
  from recjax import gin_cli  # pylint: disable=g-import-not-at-top
  gin_cli.check_files(args.gin_file, args.gin_search_paths)
  _load_tasks(args)
  import gin  # pylint: disable=g-import-not-at-top
  from recjax.bench import packing  # pylint: disable=g-import-not-at-top
  gin_cli.parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths)
  import recjax.tasks  # pylint: disable=g-import-not-at-top
  recjax.tasks.register_datasets()
  model = gin.query_parameter("%MODEL").scoped_configurable_fn
  packing.packing(model=model, mixture_or_task_name=gin.query_parameter("%MIXTURE_OR_TASK_NAME"),
                  task_feature_lengths=gin.query_parameter("%TASK_FEATURE_LENGTHS"),
                  batch_size=gin.query_parameter("%BATCH_SIZE"), steps=args.steps,
                  seed=gin.query_parameter("%SEED"))


def cmd_bench_report(args) -> None:
  from recjax.bench import suite  # pylint: disable=g-import-not-at-top
  if not pathlib.Path(args.results).is_dir():
    raise UsageError(f"--results {args.results}: no such directory; run `recjax bench all` first")
  suite.report(pathlib.Path(args.results), pathlib.Path(args.doc))
  print(f"wrote {args.doc}")


def cmd_bench_pipeline(args) -> None:
  import json  # pylint: disable=g-import-not-at-top
  from recjax.bench import pipeline as bench  # pylint: disable=g-import-not-at-top
  task = _bench_task(args)
  for arg in ("batch_size", "length", "steps"):
    if getattr(args, arg) < 1:
      raise UsageError(f"--{arg} must be >= 1, got {getattr(args, arg)}")
  for row in bench.run(task, split=args.split, batch_size=args.batch_size, length=args.length,
                       steps=args.steps, seed=args.seed):
    print(json.dumps(row), flush=True)


def _prepare_options(args):
  from recjax.data.prepare import PrepareOptions
  return PrepareOptions(kcore=args.kcore, min_seq_len=args.min_seq_len,
                        dedupe_consecutive=args.dedupe_consecutive, max_seq_len=args.max_seq_len,
                        short_ids=args.short_ids, seed=args.seed, skip_bad_lines=args.skip_bad_lines,
                        category_root=args.category_root)


def cmd_prepare(args) -> None:
  from recjax.data import prepare, prepared
  for flag in ("input", "item_text", "datamaps"):
    value = getattr(args, flag)
    if value and not pathlib.Path(value).exists():
      raise UsageError(f"--{flag} {value}: no such file")
  manifest = prepare.prepare(args.format, args.input, args.output, item_text=args.item_text,
                             datamaps=args.datamaps, options=_prepare_options(args))
  print(prepared.format_table(prepared.summary_rows(manifest), f"prepared {args.output}"))
  if manifest["bad_lines"]["skipped"]:
    print(f"warning: skipped {manifest['bad_lines']['skipped']} bad lines; first: "
          f"{manifest['bad_lines']['examples'][0]}", file=sys.stderr)


def cmd_synth(args) -> None:
  from recjax.data import synthetic
  formats = tuple(f for f in args.formats.split(",") if f)
  summary = synthetic.write_synthetic(args.output, num_users=args.num_users,
                                      num_items=args.num_items, seed=args.seed, formats=formats)
  print(f"wrote {summary['num_interactions']:,} interactions of {summary['num_users']:,} users "
        f"over {summary['num_items']:,} items to {args.output}")


SHARED_DATA = pathlib.Path(os.environ.get(
    "RECJAX_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


def _prepare_shared_datasets(root: pathlib.Path) -> None:
  """Prepares the real datasets in ../shared/data (when present) so they register as tasks."""
  from recjax.data import prepare
  beauty, office = SHARED_DATA / "amazon-beauty", SHARED_DATA / "amazon-office"
  jobs = []
  if beauty.is_dir():
    jobs.append(("beauty", "s3rec", beauty / "Beauty.txt",
                 {"datamaps": str(beauty / "datamaps.json"), "item_text": str(beauty / "Amazon_Beauty.item")}))
  if office.is_dir():
    # LC-Rec's Office paths start below Amazon's root category (docs/data.md, --category_root).
    jobs.append(("office", "lcrec", office / "Office.inter.json",
                 {"options": prepare.PrepareOptions(category_root="Office Products")}))
  for name, fmt, src, extra in jobs:
    if not (root / name / prepare.MANIFEST).is_file():
      m = prepare.prepare(fmt, src, root / name, **extra)
      print(f"prepared {name} from {src.parent}: {m['num_users']:,} users, {m['num_items']:,} items")


def cmd_main(args) -> None:
  """synthesize -> prepare -> train -> evaluate -> export -> evaluate the export."""
  from recjax import gin_cli
  from recjax.data import prepare, prepared, synthetic
  work = pathlib.Path(args.workdir)
  start = time.time()
  raw = work / "raw"
  size = {"num_users": args.num_users, "num_items": args.num_items, "seed": args.seed}
  synthetic.write_synthetic(raw, formats=("amazon2018", "regen"), **size)
  print(f"synthesized {args.num_users:,} users x {args.num_items:,} items into {raw} "
        f"({time.time() - start:.1f}s)\n")
  jobs = [("amazon2018", raw / "amazon2018" / "Synthetic.json.gz", work / "prepared" / "synthetic"),
          ("regen", raw / "regen" / "synthetic.jsonl.gz", work / "prepared" / "synthetic_regen")]
  for fmt, src, dst in jobs:
    manifest = prepare.prepare(fmt, src, dst, options=prepare.PrepareOptions(kcore=5))
    print(prepared.format_table(prepared.summary_rows(manifest), f"{dst} ({manifest['seconds']}s)"))
    print()
  _prepare_shared_datasets(work / "prepared")
  os.environ["RECJAX_DATA_DIR"] = str(work / "prepared")
  tasks = _import_tasks()
  for name in ("synthetic", "synthetic_regen"):
    tasks.register_dataset_tasks(name, work / "prepared" / name)
  args.gin_file = [args.gin_file or "experiments/quickstart.gin"]
  args.gin_search_paths = ""
  bindings = [f"MODEL_DIR = {str(work / 'model')!r}", f"EXPORT_DIR = {str(work / 'export')!r}",
              *args.gin_bindings]
  print(f"training {args.gin_file[0]}")
  gin_cli.train_stage(args, bindings)
  print("\nevaluating the checkpoint: full ranking, test and validation splits")
  result = gin_cli.run_entrypoint("evaluate", args, bindings)
  gin_cli.run_entrypoint("export", args, bindings)
  args.exported = str(work / "export")
  exported = gin_cli.run_entrypoint("evaluate", args, bindings)
  same = exported["results"] == result["results"]
  print(f"\nexport re-evaluated from {args.exported}: metrics {'identical' if same else 'DIFFER'}")
  test = result["results"]["test/model"], result["results"]["test/popularity"]
  print(f"test NDCG@10: model {test[0]['ndcg@10']:.4f} vs popularity {test[1]['ndcg@10']:.4f}; "
        f"Recall@10: {test[0]['recall@10']:.4f} vs {test[1]['recall@10']:.4f}")
  if not same:
    raise ValueError("the export did not reproduce the checkpoint's metrics")
  if args.flare_steps != 0:
    _main_flare(args, work)
  if args.lumen_steps:
    _main_lumen(args, work)
  print(f"main job done in {time.time() - start:.1f}s")


def _main_flare(args, work: pathlib.Path) -> None:
  """The main job's second part: FLARE trained on the precise / broad / none critique
  mixture, the critiquing evaluation, and one user's top items with and without a critique."""
  from recjax import gin_cli
  args.gin_file, args.exported = [args.flare_gin_file], None
  bindings = [f"MODEL_DIR = {str(work / 'flare')!r}", f"EXPORT_DIR = {str(work / 'flare' / 'export')!r}"]
  if args.flare_steps is not None:
    bindings.append(f"TRAIN_STEPS = {args.flare_steps}")
  if args.flare_batch_size is not None:
    bindings.append(f"BATCH_SIZE = {args.flare_batch_size}")
  print(f"\ntraining FLARE with critiques: {args.flare_gin_file}")
  gin_cli.train_stage(args, bindings)
  print("\ncritiquing evaluation: the target's own category path (precise: 4 levels, broad: 2) "
        "or none at the [MASK]")
  gin_cli.run_entrypoint("critique", args, bindings)
  # The first test user, whatever its recommendations: a sample, not a showcase.
  print()
  gin_cli.run_entrypoint("infer", args, [*bindings, "infer_lib.infer.user = 0", "infer_lib.infer.top_k = 5"])


def _main_lumen(args, work: pathlib.Path) -> None:
  """The main job's conversational example: a small LUMEN (gin/experiments/quickstart_lumen.gin)
  trained on the REGEN endorsements with critiques, evaluated on 200 test users, and one
  test user whose last request was a critique: history and critique, the recommended
  items, the generated endorsement."""
  import json  # pylint: disable=g-import-not-at-top
  from recjax import gin_cli  # pylint: disable=g-import-not-at-top
  args.gin_file, args.exported = ["experiments/quickstart_lumen.gin"], None
  bindings = [f"MODEL_DIR = {str(work / 'lumen')!r}", f"TRAIN_STEPS = {args.lumen_steps}"]
  print(f"\ntraining LUMEN ({args.lumen_steps} steps): next item + endorsement in one LM, critiques in the prompt")
  gin_cli.train_stage(args, bindings)
  result = gin_cli.run_entrypoint("evaluate", args, bindings)
  path = gin_cli.run_entrypoint("infer", args, bindings)
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  # A critique of the target comes after the last history item, right before the instruction.
  asked = [r for r in rows if "User:" in r["prompt"][r["prompt"].rfind("Item:"):]]
  record = (asked or rows)[0]
  print(f"\nuser {record['user_id']} (test split), one conversation:")
  from recjax.evaluation import text_generation  # pylint: disable=g-import-not-at-top
  print(text_generation.conversation(record, _item_titles(work / "prepared" / "synthetic_regen")))
  items = next(m for k, m in result["results"].items() if k.endswith("/items"))
  print(f"LUMEN test items ({items['count']} users): Recall@10 {items['recall@10']:.4f}, "
        f"NDCG@10 {items['ndcg@10']:.4f}")


def main(argv=None) -> int:
  from recjax import gin_cli
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv, gin_bindings = gin_cli.split_gin_overrides(argv)
  except gin_cli.GinError as e:
    parser.error(str(e))
  args = parser.parse_args(argv)
  if gin_bindings and args.command not in (*gin_cli.ENTRYPOINTS, "main", "sweep") and not (
      args.command == "bench" and getattr(args, "func", None) is cmd_bench_packing):
    parser.error(f"--gin.* overrides apply only to {', '.join(gin_cli.ENTRYPOINTS)}, sweep, main and bench packing")
  args.gin_bindings = gin_bindings
  try:
    args.func(args)
  except gin_cli.Preempted as e:
    # As `recjax train` after a SIGTERM: exit 0, the checkpoint kept; running again resumes.
    print(f"recjax {args.command}: stopped: {e}; run the same command again to resume", flush=True)
    return 0
  except (FormatError, UsageError, FileNotFoundError, ValueError, KeyError) as e:
    # KeyError's str() is the repr of its message; print the sentence itself.
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    # gin appends "In call to configurable ..." lines; the first line is the sentence.
    print(f"recjax {args.command}: error: {str(message).splitlines()[0]}", file=sys.stderr)
    return 2
  except OSError as e:  # an unwritable / wrong-kind path: name it and the cause, no traceback
    where = f"{e.filename}: " if e.filename else ""
    print(f"recjax {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
