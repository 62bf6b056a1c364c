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
import difflib
import pathlib
import types
import typing

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"

ENTRYPOINTS = {
    "train": ("recjax.train.loop", "train", "train a model (gin/runs/train.gin)"),
    "evaluate": ("recjax.evaluation.evaluate", "evaluate",
                 "metrics of a checkpoint or export by the model's evaluator: full-catalogue ranking, "
                 "generative retrieval, preference axes (gin/runs/eval.gin)"),
    "infer": ("recjax.infer", "infer", "top-k recommendations per user as JSON lines, or one user's "
              "history and recommendations with and without a critique (gin/runs/infer.gin)"),
    "critique": ("recjax.evaluation.critiquing", "critique",
                 "critiquing evaluation: precise / broad / none and out-of-sequence Cat-nDCG "
                 "(gin/runs/critique.gin)"),
    "export": ("recjax.export", "export",
               "self-contained export: params, config, vocab, serialized scoring, constrained "
               "generation or LM generation (item + narrative) (gin/runs/export.gin)"),
    "fit": ("recjax.artifacts.fit", "fit",
            "build a derived artifact of a prepared dataset: semantic IDs, text embeddings, WALS "
            "vectors, the preference benchmark (gin/fits/*.gin)"),
}


class GinError(ValueError):
  """A gin problem (missing binding, unknown name) reported as one sentence."""


class Preempted(Exception):
  """A training stage stopped at SIGTERM with its checkpoint saved: a pipeline of stages
  (`recjax sweep`, `recjax main`) must stop there, not evaluate a half-trained model."""


def train_stage(args, gin_bindings: list[str]) -> dict:
  """`run_entrypoint("train", ...)` for commands that run more stages after it: raises
  Preempted when the run stopped at SIGTERM (running it again resumes)."""
  result = run_entrypoint("train", args, gin_bindings)
  if result.get("preempted"):
    raise Preempted(f"training was preempted at step {result['step']} (checkpoint saved)")
  return result


class Override(str):
  """A binding given on the command line (`flag` is how the user wrote it). Only these
  are checked for names nothing reads: gin silently accepts a macro no file uses."""

  flag: str = ""


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
      binding = Override(f"{name} = {_literal(value)}")
      binding.flag = f"--gin.{name}={value}"
      bindings.append(binding)
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


def check_files(files: list[str], search_paths: str) -> None:
  """The argument errors that need no import: no --gin_file, or one found on no search path."""
  if not files:
    raise GinError("no --gin_file given; e.g. --gin_file=gin/experiments/quickstart.gin")
  roots = [GIN_DIR, GIN_DIR.parent, pathlib.Path.cwd(), *map(pathlib.Path, filter(None, search_paths.split(",")))]
  for f in files:
    if not any((root / f).is_file() for root in roots) and not pathlib.Path(f).is_file():
      raise GinError(f"gin file {f!r} not found in {', '.join(str(r) for r in roots)}")


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
    raise GinError(message.rstrip(".") + _close_names(message)) from None
  _check_overrides([b for b in bindings if isinstance(b, Override)])


# --- checks gin does not make -------------------------------------------------------


def _gin_config():
  from gin import config as gin_config
  return gin_config


def _close_names(message: str) -> str:
  """' (did you mean ...?)' for gin's unknown-configurable / unknown-parameter errors."""
  C = _gin_config()
  if message.startswith("No configurable matching '"):
    wanted = message.split("'")[1]
    names = set()
    for selector, _ in C._REGISTRY.items():
      parts = selector.split(".")
      names.update(".".join(parts[i:]) for i in range(len(parts) - 1))
    close = difflib.get_close_matches(wanted, sorted(names), n=3, cutoff=0.75)
  elif "doesn't have a parameter named '" in message:
    configurable, wanted = message.split("'")[1], message.split("'")[-2]
    fn = _function(configurable)
    close = difflib.get_close_matches(wanted, list(_parameters(fn)), n=3) if fn else []
  else:
    return ""
  return f" (did you mean {' or '.join(close)}?)" if close else ""


def _function(selector: str):
  C = _gin_config()
  try:
    configurable = C._REGISTRY.get_match(selector)
  except (KeyError, ValueError):  # ambiguous
    configurable = None
  if configurable is None:  # dynamic registration: 'bert4rec.Bert4Rec' is a module alias
    configurable = next((c for key, c in C._REGISTRY.items() if key.endswith("." + selector)), None)
  return getattr(configurable, "wrapped", None)


def _parameters(fn) -> dict[str, typing.Any]:
  """{name: type hint or None} of a configurable function or class."""
  import inspect
  target = fn.__init__ if isinstance(fn, type) else fn
  try:
    names = list(inspect.signature(target).parameters)
  except (TypeError, ValueError):
    return {}
  try:
    hints = typing.get_type_hints(target)
  except Exception:  # unresolvable annotations: names only
    hints = {}
  return {n: hints.get(n) for n in names if n not in ("self", "args", "kwargs")}


def _macro_uses() -> tuple[dict[str, list[tuple[str, str]]], set[str]]:
  """({macro: [(selector, parameter) reading it directly]}, every macro name defined or read)."""
  C = _gin_config()
  uses: dict[str, list[tuple[str, str]]] = {}
  names = set()
  for (scope, selector), params in C._CONFIG.items():
    if selector == "gin.macro":
      names.add(scope)
    for param, value in params.items():
      for v in C._iterate_flattened_values(value):
        if isinstance(v, C.ConfigurableReference) and v.config_key[1] == "gin.macro":
          direct = v is value
          uses.setdefault(v.config_key[0], []).append((selector, param) if direct else (selector, ""))
  return uses, names | set(uses)


def _check_overrides(overrides: list[Override]) -> None:
  """Refuses an override of a macro no gin file reads (a typo gin would ignore) and a
  value whose type does not fit the parameter it reaches."""
  if not overrides:
    return
  C = _gin_config()
  uses, macros = _macro_uses()
  for b in overrides:
    name, value_text = (x.strip() for x in b.split("=", 1))
    if "." not in name and "/" not in name:
      if name not in uses:
        close = difflib.get_close_matches(name, sorted(macros - {name}), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "check the name against the gin files"
        raise GinError(f"{b.flag}: no gin file reads the macro {name}, so it would be ignored; {hint}")
      value = C._CONFIG.get((name, "gin.macro"), {}).get("value")
      targets = [t for t in uses[name] if t[1]]
    else:
      selector, _, param = name.rpartition(".")
      value = _literal_value(value_text)
      targets = [(selector, param)]
    for selector, param in targets:
      fn = _function(selector)
      hint = _parameters(fn).get(param) if fn else None
      problem = _type_problem(hint, value)
      if problem:
        short = ".".join(selector.split(".")[-2:])
        raise GinError(f"{b.flag}: {short}.{param} {problem}")


def _literal_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None  # a reference (@x, %X) or an expression: not checked


_SIMPLE = {int: "int", float: "float", bool: "bool", str: "str", type(None): "None"}


def _type_problem(hint, value) -> str | None:
  """'expects int, got str 'abc'' when `value` cannot be `hint` (simple types only)."""
  if hint is None or value is None and hint is not type(None):
    return None
  options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
  if not all(o in _SIMPLE for o in options):
    return None
  C = _gin_config()
  if isinstance(value, C.ConfigurableReference):
    return None
  for o in options:
    if (o is type(None) and value is None) or (o is bool and isinstance(value, bool)) or (
        o is int and isinstance(value, int) and not isinstance(value, bool)) or (
        o is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        o is str and isinstance(value, str)):
      return None
  return f"expects {' or '.join(_SIMPLE[o] for o in options)}, got {type(value).__name__} {value!r:.40}"


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
