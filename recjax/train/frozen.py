"""Fetching the frozen inputs a model names (`frozen_input_specs`, recjax/models/base.py).

The model says what it reads; this module knows where it comes from: arrays a task
provides by name (semantic-ID tokens, a benchmark's embeddings), and text-encoder token
states of the task's item texts, encoded once and cached on disk.
"""

from __future__ import annotations

import mmap
import pathlib

import numpy as np

from recjax.models import base


def fetch(model, task_name: str) -> dict:
  """{name: (numpy array, logical axes)} of everything `model` names for `task_name`."""
  specs = getattr(model, "frozen_input_specs", None)
  if specs is None:
    return {}
  arrays = {}
  for key, spec in specs().items():
    if isinstance(spec, base.TaskArray):
      import recjax.tasks as tasks
      arrays[key] = (tasks.frozen_array(task_name, spec.name), spec.axes)
    elif isinstance(spec, base.ItemTextStates):
      arrays.update(text_states(task_name, spec))
    elif isinstance(spec, base.StringStates):
      arrays[key], arrays[f"{key}_mask"] = string_states(task_name, spec)
    elif isinstance(spec, base.TrainItemCounts):
      import recjax.tasks  # noqa: F401  (registers the tasks)
      from recjax.data import pipeline
      arrays[key] = pipeline.train_item_counts(task_name, spec.rows)
    else:
      raise TypeError(f"{type(model).__name__}.frozen_input_specs()[{key!r}] is a {type(spec).__name__}; "
                      "expected a spec of recjax.models.base (TaskArray, ItemTextStates, StringStates, "
                      "TrainItemCounts)")
  finish = getattr(model, "finish_frozen", None)
  return finish(arrays) if finish is not None else arrays


def _cache_dir(task_name: str, cache_dir: str | None) -> str:
  import recjax.tasks as tasks
  data_dir = tasks.data_dir_of(task_name)
  if cache_dir is None and data_dir is None:
    raise ValueError(f"text states are cached beside the prepared dataset, but task {task_name!r} was not "
                     "registered from one: give the model a text_cache_dir")
  return cache_dir or str(pathlib.Path(data_dir) / "text_cache")


def string_states(task_name: str, spec: base.StringStates) -> tuple[np.ndarray, np.ndarray]:
  """(states [N, length, D], mask [N, length]) of the strings the task provides as `spec.name`."""
  import recjax.tasks as tasks
  from recjax.models import text as text_lib
  from recjax.models.text import cache
  strings = tasks.frozen_array(task_name, spec.name)
  enc = text_lib.load_text_encoder(spec.encoder)
  return cache.encode_strings_cached(enc, strings, spec.length, _cache_dir(task_name, spec.cache_dir))


def text_states(task_name: str, spec: base.ItemTextStates) -> dict[str, np.ndarray]:
  """The frozen encoder's token states for a task's item texts (row = item id, padded to
  `spec.rows`) and, when the task has a "critiques" feature, for its critique table (row =
  critique id). Encoded once per (strings, encoder, length), then read from the cache."""
  import seqio
  import recjax.tasks as tasks
  from recjax.models import text as text_lib
  from recjax.models.text import cache
  data_dir = tasks.data_dir_of(task_name)
  if data_dir is None:
    raise ValueError(f"item text states come from the prepared dataset, but task {task_name!r} was not "
                     "registered from one (recjax.tasks.register_dataset_tasks)")
  enc = text_lib.load_text_encoder(spec.encoder)
  cache_dir = spec.cache_dir or str(pathlib.Path(data_dir) / "text_cache")
  strings = cache.item_texts(data_dir, spec.item_fields)
  states, mask = cache.encode_strings_cached(enc, strings, spec.item_length, cache_dir)
  out = {"item_text": _pad_rows(states, spec.rows), "item_text_mask": _pad_rows(mask, spec.rows)}
  feature = seqio.get_mixture_or_task(task_name).output_features.get("critiques")
  if feature is not None:
    states, mask = cache.encode_strings_cached(enc, list(feature.vocabulary.table), spec.critique_length, cache_dir)
    mask = np.array(mask)
    mask[0] = False  # id 0 = no critique
    out["critique_text"], out["critique_text_mask"] = states, mask
  return out


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] > rows:
    raise ValueError(f"{x.shape[0]} text rows for a table of {rows}")
  out = aligned_zeros((rows, *x.shape[1:]), x.dtype)
  # (A whole memmap only: a slice of one keeps its parent's offset.)
  if isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.flags.c_contiguous and x.filename:
    # Read the cache file into the table rather than through the map: the mapped pages
    # would count as resident too while copied (another 6.5 GB at Clothing scale).
    with open(x.filename, "rb") as f:
      f.seek(x.offset)
      view = memoryview(out[:x.shape[0]].reshape(-1).view(np.uint8))
      while view.nbytes:
        n = f.readinto(view)
        if not n:
          raise ValueError(f"{x.filename}: ends before its {x.nbytes:,} bytes of states; delete it to rebuild")
        view = view[n:]
  else:
    out[:x.shape[0]] = x
  return out


# XLA's CPU client places a numpy array without copying it only if its data is 64-byte
# aligned; glibc's heap (recjax/host_memory.py serves large blocks from it) aligns to 16.
# A copied table costs its size twice at the peak and, as freed heap stays resident,
# for the rest of the process: 6.9 GB at Clothing scale.
ALIGNMENT = 64


def aligned_zeros(shape, dtype) -> np.ndarray:
  """np.zeros whose data starts on an ALIGNMENT-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
  start = (-raw.ctypes.data) % ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)
