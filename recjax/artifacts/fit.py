"""`recjax fit --gin_file=fits/X.gin [--dataset NAME=DIR] [--gin.K=V]`: build one artifact.

The gin file binds `fit.fit.fitter` to a fit function (`semantic_ids.fit`, `wals.fit`,
`text_embeddings.fit`, `preference_benchmark.fit`) and its hyper-parameters; the dataset
is the one `--dataset NAME=DIR` given (or DATASET = a registered name or a directory).
The artifact's manifest records the gin file and the operative config.
"""

from __future__ import annotations

import inspect
import pathlib
from typing import Callable


class FitUsageError(ValueError):
  """A fit invoked without a usable dataset; one sentence."""


def resolve_dataset(dataset: str | None, cli_datasets=()) -> pathlib.Path:
  """The prepared directory of `dataset` (a registered name or a path), else of the one
  --dataset NAME=DIR given on the command line."""
  from recjax.data import registry
  if dataset is None:
    if len(cli_datasets) != 1:
      raise FitUsageError("recjax fit needs exactly one dataset: pass --dataset NAME=DIR"
                          + (", or pick one with --gin.DATASET=NAME" if cli_datasets else ""))
    dataset = cli_datasets[0].partition("=")[0]
  if dataset in registry.names():
    return registry.get(dataset).data_dir
  path = pathlib.Path(dataset)
  if path.is_dir():
    return path
  raise FitUsageError(f"dataset {dataset!r} is neither a registered dataset nor a directory; "
                      "pass --dataset NAME=DIR")


def fit(fitter: Callable, dataset: str | None = None, stop_after_steps: int | None = None,
        cli_datasets=(), gin_files=(), cli_bindings=()) -> dict:
  """Runs `fitter(data_dir, ...)` on the dataset; returns its summary (printed as JSON).
  cli_datasets, gin_files, cli_bindings: what the command line gave (the manifest records them)."""
  from recjax.artifacts import manifest
  data_dir = resolve_dataset(dataset, cli_datasets)
  kwargs = {"gin_file": ",".join(gin_files) or None}
  if stop_after_steps is not None:
    params = inspect.signature(fitter).parameters
    if "stop_after_steps" not in params:
      raise FitUsageError(f"{getattr(fitter, '__name__', fitter)} cannot stop part-way (no stop_after_steps)")
    kwargs["stop_after_steps"] = stop_after_steps
  token = manifest.CLI_BINDINGS.set(tuple(cli_bindings))
  try:
    return fitter(data_dir, **kwargs)
  finally:
    manifest.CLI_BINDINGS.reset(token)
