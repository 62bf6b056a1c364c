"""SeqIO task and mixture registrations (installed as `recjax.tasks`).

Importing this registers every task family for every prepared dataset the registry knows:
those discovered under $RECJAX_DATA_DIR (else runs/default/prepared), plus any added by
name. Task names start with the dataset name (catalogue: docs/tasks.md):

  item_sequences.py  families 1 and 3: DS_items, DS_critique_{precise,broad,none,regen},
                     DS_critique_mix, DS_critique_mix_precise
  text.py            families 2, 4 and 5: text-to-text tasks and mixtures
  preferences.py     the preference-discerning benchmark, once built: DS_pref_<axis>, DS_pref_mix
  semantic_ids.py    next item over semantic IDs, once built: DS_sid_<name> (TIGER, Mender)

A dataset prepared anywhere becomes tasks without writing Python:

  recjax.tasks.register_dataset_tasks("mybeauty", "/data/beauty")   # Python
  recjax.tasks.register_datasets.datasets = {"mybeauty": "/data/beauty"}  # gin
  recjax tasks list --dataset mybeauty=/data/beauty                   # command line

Only registrations live here; the logic they use is in `recjax.data`.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Mapping

import gin
import seqio

from recjax.data import registry

# In a source checkout this package is importable as `tasks`; alias it so that
# `recjax.tasks` names the same module (two copies would register every task twice).
if __name__ == "tasks":
  sys.modules.setdefault("recjax.tasks", sys.modules[__name__])
  import recjax as _recjax  # pylint: disable=g-import-not-at-top
  _recjax.tasks = sys.modules[__name__]

from . import item_sequences  # pylint: disable=g-import-not-at-top
from . import text  # pylint: disable=g-import-not-at-top
from . import preferences  # pylint: disable=g-import-not-at-top
from . import semantic_ids  # pylint: disable=g-import-not-at-top

FAMILIES = (item_sequences, text, preferences, semantic_ids)

# dataset name -> ((resolved dir, content hash, artifacts), registered task and mixture names)
_REGISTERED: dict[str, tuple[tuple, list[str]]] = {}


def _artifacts_key(data_dir: pathlib.Path) -> tuple:
  """What the artifact-dependent families see: their files' names and times."""
  files = list(data_dir.glob("artifacts/*/*/manifest.json"))
  return tuple(sorted((str(p.relative_to(data_dir)), p.stat().st_mtime_ns) for p in files))


def register_dataset_tasks(name: str, data_dir=None) -> list[str]:
  """Registers every task family for dataset `name`; returns the task and mixture names.

  Args:
    name: dataset name (a lowercase identifier; it prefixes the task names).
    data_dir: a directory written by `recjax prepare`; None uses the registry's entry.

  Idempotent: the same name, directory, content and artifacts is a no-op. A name
  re-pointed to another directory (or re-prepared in place, or given a new artifact such
  as semantic IDs) replaces its tasks.
  """
  if data_dir is not None:
    registry.register_dataset(name, data_dir)
  ds = registry.get(name)
  key = (str(ds.data_dir.resolve()), ds.content_hash, _artifacts_key(ds.data_dir))
  if name in _REGISTERED and _REGISTERED[name][0] == key:
    return list(_REGISTERED[name][1])
  unregister_dataset_tasks(name)
  before = _all_names()
  names: list[str] = []
  try:
    for family in FAMILIES:
      names += family.register(name, ds.data_dir)
  except Exception:
    # All or nothing: a failing family leaves no half-registered dataset behind.
    _remove(sorted(_all_names() - before))
    raise
  _REGISTERED[name] = (key, names)
  return list(names)


# Gin sees the registration functions as recjax.tasks.*; Python callers get the
# undecorated one, whose errors gin would otherwise wrap in a second line.
gin.external_configurable(register_dataset_tasks, module="recjax.tasks")


@gin.configurable(module="recjax.tasks")
def register_datasets(datasets: Mapping[str, str] | None = None) -> list[str]:
  """Registers the tasks of several {name: data_dir} datasets (the gin entry point)."""
  return [t for name, path in (datasets or {}).items() for t in register_dataset_tasks(name, path)]


def unregister_dataset_tasks(name: str) -> None:
  """Removes the tasks and mixtures registered for dataset `name` (if any)."""
  if name in _REGISTERED:
    _remove(_REGISTERED.pop(name)[1])


def _all_names() -> set[str]:
  return set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())


def _remove(names) -> None:
  for n in names:
    if n in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(n)
    elif n in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(n)


def tasks_by_dataset() -> dict[str, list[str]]:
  """{dataset name: its registered task and mixture names}."""
  return {name: list(names) for name, (_, names) in sorted(_REGISTERED.items())}


def dataset_of(task_name: str) -> str | None:
  """The dataset whose tasks include `task_name`, or None for tasks registered elsewhere."""
  for name, (_, names) in _REGISTERED.items():
    if task_name in names:
      return name
  return None


def data_dir_of(task_name: str) -> pathlib.Path | None:
  name = dataset_of(task_name)
  return pathlib.Path(_REGISTERED[name][0][0]) if name else None


def semantic_ids_of(task_name: str):
  """The semantic IDs (codes, tokens, decoding trie) a semantic-ID task decodes to."""
  return semantic_ids.semantic_ids_of(task_name)


def preference_axes(task_name: str) -> dict[str, str]:
  """{axis: task} of the preference benchmark (over semantic IDs) `task_name` belongs to."""
  return semantic_ids.axis_tasks(task_name)


def frozen_array(task_name: str, name: str):
  """A frozen model input a task provides by name (e.g. "item_embeddings", "wals_item_vectors")."""
  got = text.frozen_array(task_name, name)
  return got if got is not None else semantic_ids.frozen_array(task_name, name)


def train_item_counts(task_name: str):
  """The train split's item counts of a task, when its dataset already holds them (None:
  count them from the task's examples, `recjax.data.pipeline.train_item_counts`)."""
  return item_sequences.train_item_counts(task_name)


def describe(task_name: str) -> str:
  """One line about a task or mixture: its family's description, else its features."""
  for family in FAMILIES:
    text_ = getattr(family, "describe", lambda _: None)(task_name)
    if text_:
      return text_
  provider = seqio.get_mixture_or_task(task_name)
  if isinstance(provider, seqio.Mixture):
    return "mixture of " + ", ".join(t.name for t in provider.tasks)
  return "features: " + ", ".join(
      f"{k} ({type(f.vocabulary).__name__})" for k, f in provider.output_features.items())


def _register_known() -> None:
  registry.discover()
  for name in registry.names():
    try:
      register_dataset_tasks(name)
    except Exception as e:
      raise ValueError(f"cannot register the tasks of dataset {name!r} ({registry.path(name)}): {e}") from e


_register_known()
