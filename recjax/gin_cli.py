"""gin-configured entrypoints: `recjax train | evaluate | infer | critique | export | fit`.

As in t5x: `--gin_file` (repeatable) names gin files, `--gin.NAME=VALUE` overrides one
binding (`--gin.TRAIN_STEPS=100`, `--gin.MODEL_DIR="'runs/x'"`; bare strings that are not
Python literals are quoted for you), `--gin_search_paths` adds directories to resolve
relative gin file names and `include`s. The repository's `gin/` directory and the working
directory are always searched. The operative config is written to MODEL_DIR.
"""

from __future__ import annotations

import argparse
import ast
import pathlib

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"

ENTRYPOINTS = {
    "train": ("recjax.train.loop", "train", "train a model (gin/runs/train.gin)"),
    "evaluate": ("recjax.evaluation.evaluate", "evaluate",
                 "full-catalog ranking metrics of a checkpoint or export (gin/runs/eval.gin)"),
    "infer": ("recjax.infer", "infer", "top-k recommendations per user as JSON lines, or one user's "
              "history and recommendations with and without a critique (gin/runs/infer.gin)"),
    "critique": ("recjax.evaluation.critiquing", "critique",
                 "critiquing evaluation: precise / broad / none and out-of-sequence Cat-nDCG "
                 "(gin/runs/critique.gin)"),
    "export": ("recjax.export", "export",
               "self-contained export: params, config, vocab, serialized scoring (gin/runs/export.gin)"),
    "fit": ("recjax.artifacts.fit", "fit",
            "build a derived artifact of a prepared dataset: semantic IDs, text embeddings, WALS "
            "vectors, the preference benchmark (gin/fits/*.gin)"),
}


class GinError(ValueError):
  """A gin problem (missing binding, unknown name) reported as one sentence."""


def add_gin_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  p.add_argument("--gin_search_paths", default="",
                 help="comma-separated directories searched for gin files and includes")
  p.epilog = ("Override any binding with --gin.NAME=VALUE, e.g. --gin.TRAIN_STEPS=100 "
              "--gin.MODEL_DIR=runs/x --gin.bert4rec.Bert4Rec.dim=128")


def split_gin_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--gin.NAME=VALUE` / `--gin.NAME VALUE` overrides from the other arguments."""
  rest, bindings = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and not arg.startswith("--gin_"):
      if "=" in arg:
        name, value = arg[len("--gin."):].split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise GinError(f"{arg} needs a value (--gin.NAME=VALUE)")
        name, value = arg[len("--gin."):], argv[i + 1]
        i += 1
      bindings.append(f"{name} = {_literal(value)}")
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def _literal(value: str) -> str:
  """Keeps gin syntax (numbers, quoted strings, %MACROS, @refs, dicts); quotes bare words."""
  text = value.strip()
  if text[:1] in ("%", "@", "'", '"', "{", "[", "(") or text in ("True", "False", "None"):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def _plain_files_only() -> None:
  """Drops gin's package-resource reader: recjax resolves gin files through search paths
  only. That reader reads 'runs/train.gin' as package 'runs', crashes on a plain `runs/`
  directory in the working directory, and logs an error for every search-path miss."""
  from gin import config as gin_config
  gin_config._FILE_READERS[:] = [(r, e) for r, e in gin_config._FILE_READERS
                                 if getattr(r, "__module__", "") != "gin.resource_reader"]


def parse_gin(files: list[str], bindings: list[str], search_paths: str) -> None:
  import gin
  import recjax.tasks  # noqa: F401  (its gin configurables must exist before the config locks)
  _plain_files_only()
  gin.clear_config()  # unlocks too: one process may run several entrypoints (the main job)
  for path in [GIN_DIR, GIN_DIR.parent, pathlib.Path.cwd(), *filter(None, search_paths.split(","))]:
    gin.add_config_file_search_path(str(path))
  if not files:
    raise GinError("no --gin_file given; e.g. --gin_file=gin/experiments/quickstart.gin")
  try:
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
  except (ValueError, NameError, IOError, OSError) as e:
    message = str(e).splitlines()[0]
    if "set to `%gin.REQUIRED`" in message:
      name = message.split("/")[0]
      message = f"missing gin binding {name}: set it in a gin file or with --gin.{name}=VALUE"
    raise GinError(message) from None


def run_entrypoint(command: str, args, gin_bindings: list[str]):
  """Parses gin, runs the command's configurable function, returns its result."""
  import importlib

  import gin
  from recjax.train import distributed
  distributed.initialize()  # before any JAX work; a no-op unless a launcher asked for it
  module_name, fn_name, _ = ENTRYPOINTS[command]
  module = importlib.import_module(module_name)
  parse_gin(args.gin_file, gin_bindings, args.gin_search_paths)
  import recjax.tasks
  recjax.tasks.register_datasets()  # datasets named in gin: register_datasets.datasets = {...}
  fn = gin.get_configurable(getattr(module, fn_name))
  kwargs = {}
  if command == "evaluate" and getattr(args, "exported", None):
    kwargs["exported_dir"] = args.exported
  if command == "fit":  # the dataset to fit on, and the gin files the manifest records
    kwargs.update(cli_datasets=tuple(getattr(args, "dataset", ())), gin_files=tuple(args.gin_file),
                  cli_bindings=tuple(gin_bindings))
  try:
    result = fn(**kwargs)
  except ValueError as e:
    if "Required bindings" in str(e) or "No Task or Mixture" in str(e):
      raise GinError(str(e).splitlines()[0]) from None
    raise
  distributed.finish()
  return result
