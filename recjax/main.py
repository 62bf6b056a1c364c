"""The `recjax` command line.

  recjax main      the README's main job on the embedded synthetic data
  recjax synth     write a synthetic dataset in public raw formats
  recjax prepare   turn raw files in a public format into a prepared dataset

Errors in the input (a malformed line, a missing file, a bad option) print one sentence
naming the file/line/field or the option at fault and exit with status 2.
"""

from __future__ import annotations

import argparse
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

  p = sub.add_parser("main", help="the main job: synthesize the default data, prepare it, summarize",
                     description="Generates the embedded synthetic dataset (Amazon 2018 + REGEN raw "
                     "formats), prepares both, and prints their summary tables.")
  p.add_argument("--workdir", default="runs/default", help="where raw and prepared data go")
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
  return parser


def _prepare_options(args):
  from recjax.data.prepare import PrepareOptions
  return PrepareOptions(kcore=args.kcore, min_seq_len=args.min_seq_len,
                        dedupe_consecutive=args.dedupe_consecutive, max_seq_len=args.max_seq_len,
                        short_ids=args.short_ids, seed=args.seed, skip_bad_lines=args.skip_bad_lines)


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


def cmd_main(args) -> None:
  from recjax.data import prepare, prepared, synthetic
  work = pathlib.Path(args.workdir)
  start = time.time()
  raw = work / "raw"
  synthetic.write_synthetic(raw, formats=("amazon2018", "regen"), **DEFAULT_SYNTH)
  print(f"synthesized {DEFAULT_SYNTH['num_users']:,} users x {DEFAULT_SYNTH['num_items']:,} items "
        f"into {raw} ({time.time() - start:.1f}s)\n")
  jobs = [("amazon2018", raw / "amazon2018" / "Synthetic.json.gz", work / "prepared" / "synthetic"),
          ("regen", raw / "regen" / "synthetic.jsonl.gz", work / "prepared" / "synthetic_regen")]
  for fmt, src, dst in jobs:
    manifest = prepare.prepare(fmt, src, dst, options=prepare.PrepareOptions(kcore=5))
    print(prepared.format_table(prepared.summary_rows(manifest), f"{dst} ({manifest['seconds']}s)"))
    print()
  print(f"main job done in {time.time() - start:.1f}s")


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    args.func(args)
  except (FormatError, UsageError, FileNotFoundError, ValueError) as e:
    print(f"recjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
