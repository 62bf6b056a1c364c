"""Semantic-ID family: next-item generative retrieval over semantic IDs (TIGER, Mender_Emb).

For a dataset DS with semantic IDs NAME (an artifact built by
`recjax fit --gin_file=fits/rqvae.gin`), one task `DS_sid_NAME`:

  train       every prefix of every user's training items: history -> next item
  validation  items[:-2] -> items[-2]
  test        items[:-1] -> items[-1]

Features: "inputs" (the history's semantic-ID tokens, oldest item first, flattened),
"targets" (the next item's tokens), "target_item" (its item id), "user_id",
"example_id". `recjax.data.converters.EncoderDecoderConverter` makes the model rows.
The semantic IDs are read when a dataset is built, not at registration.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import seqio
import tensorflow as tf

from recjax.data import sequence_preprocessors as sp
from recjax.data.sources import next_item_source
from recjax.data.vocab import SemanticIdVocabulary

DESCRIPTIONS: dict[str, str] = {}
# task name -> (data_dir, semantic-ID name): evaluators find the decoding trie here.
SEMANTIC_IDS: dict[str, tuple[str, str]] = {}
MAX_HISTORY = 200  # items a source example keeps; converters cut to what the model reads


def describe(name: str) -> str | None:
  return DESCRIPTIONS.get(name)


class _Store:
  """The semantic-ID artifacts of a dataset (recjax.artifacts.semantic_ids): their names and
  metadata at registration (no hash check: a stale artifact is refused when read), the IDs
  when a dataset is built."""

  @staticmethod
  def names(data_dir) -> list[str]:
    from recjax.artifacts import manifest  # pylint: disable=g-import-not-at-top
    return manifest.find(data_dir, "semantic_ids")

  @staticmethod
  def metadata(data_dir, name) -> dict:
    import json  # pylint: disable=g-import-not-at-top
    from recjax.artifacts import manifest, semantic_ids  # pylint: disable=g-import-not-at-top
    with np.load(manifest.artifact_dir(data_dir, semantic_ids.KIND, name) / semantic_ids.FILE) as f:
      return json.loads(str(f["metadata"]))

  @staticmethod
  def load(data_dir, name):
    from recjax.artifacts import semantic_ids  # pylint: disable=g-import-not-at-top
    return semantic_ids.load(data_dir, name)


def _semantic_ids():
  return _Store


def semantic_ids_of(task_name: str):
  """The SemanticIds (codes, tokens, trie) a `*_sid_*` task (or its mixture) decodes to."""
  provider = seqio.get_mixture_or_task(task_name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  for task in tasks:
    if task.name in SEMANTIC_IDS:
      return _semantic_ids().load(*SEMANTIC_IDS[task.name])
  raise ValueError(f"task {task_name!r} is not over semantic IDs (no *_sid_* task in it)")


def register(name: str, data_dir) -> list[str]:
  added = []
  for ids in _semantic_ids().names(data_dir):
    meta = _semantic_ids().metadata(data_dir, ids)
    vocab = SemanticIdVocabulary(int(meta["vocab_size"]))
    task = f"{name}_sid_{ids}"
    seqio.TaskRegistry.add(
        task,
        source=next_item_source(data_dir, MAX_HISTORY),
        preprocessors=[functools.partial(sp.to_semantic_ids, tokens_fn=functools.partial(
                           lambda d, n: _semantic_ids().load(d, n).tokens, str(data_dir), ids)),
                       seqio.CacheDatasetPlaceholder()],
        output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                         "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)})
    DESCRIPTIONS[task] = (f"semantic IDs {ids!r} ({meta['levels']} tokens an item): history -> next item's "
                          "tokens; train on every prefix (TIGER)")
    SEMANTIC_IDS[task] = (str(data_dir), ids)
    FROZEN[task] = {"semantic_id_tokens": functools.partial(lambda d, n: _semantic_ids().load(d, n).tokens,
                                                            str(data_dir), ids)}
    added.append(task)
  return added + register_preferences(name, data_dir)


# --- preference discerning over semantic IDs (TIGER, Mender_Emb) -------------------------
#
# For a benchmark B (tasks/preferences.py) and semantic IDs NAME of the same dataset, one
# task per axis, PREFIX_sid_NAME_AXIS (PREFIX = DS_pref, or DS_pref_B), with the splits of
# the axis tasks, and the training mixture PREFIX_sid_NAME_mix (every training split, rates
# by rows: the "+ extras" setting; the recommendation task alone is the plain one).
# Features: the semantic-ID ones above, plus "history" (item ids, oldest first),
# "preferences" (statement ids + 1, 0 = empty), "sign" (-1: a negative preference whose
# item must not be recommended) and "text_id" (the row's text in the task's
# "preference_texts": "Preference: ... History: newest title; ...", read by Mender_Tok).

# task name -> {frozen input name: loader}: the arrays a model names (`frozen_input_names`)
FROZEN: dict[str, dict] = {}
# task or mixture name -> {axis: task} of its benchmark and semantic IDs
AXIS_TASKS: dict[str, dict[str, str]] = {}


def axis_tasks(task_name: str) -> dict[str, str]:
  """{axis: task} of the preference benchmark a preference task (or mixture) belongs to."""
  if task_name not in AXIS_TASKS:
    raise ValueError(f"{task_name!r} is not a preference task over semantic IDs (DS_pref*_sid_NAME_*)")
  return dict(AXIS_TASKS[task_name])


@functools.lru_cache(maxsize=4)
def _preference_texts(path: str, mtime_ns: int, data_dir: str) -> tuple[list[str], dict]:
  """(the distinct texts of every row of every axis split, sorted; {(axis, split): row ->
  text index}). Texts: `sequence_preprocessors.preference_text` over the benchmark's history
  and preferences (Mender_Tok reads them through a frozen encoder)."""
  del mtime_ns  # part of the key: a rebuilt benchmark is read again
  from . import preferences  # pylint: disable=g-import-not-at-top
  from recjax.data.prepared import PreparedDataset  # pylint: disable=g-import-not-at-top
  ds = PreparedDataset(data_dir)
  titles = [""] * ds.vocab_size
  for r in ds.items(["item_id", "title"]).to_pylist():
    titles[r["item_id"]] = " ".join((r["title"] or "").split())
  statements = preferences.preference_vocabulary(pathlib.Path(path)).table[1:]
  rows = {}
  for axis, splits in preferences.AXES.items():
    for split in splits:
      a = preferences.split_arrays(pathlib.Path(path), axis, split)
      hist = [row[:n - 1] for row, n in zip(a["items"], a["lengths"])]
      rows[(axis, split)] = [sp.preference_text(h, p - 1, statements, titles) for h, p in zip(hist, a["preferences"])]
  table = sorted({t for texts in rows.values() for t in texts})
  index = {t: i for i, t in enumerate(table)}
  return table, {k: np.array([index[t] for t in v], np.int32) for k, v in rows.items()}


def _preference_source(path, axis: str, data_dir, bench: str):
  from . import preferences  # pylint: disable=g-import-not-at-top
  splits = list(preferences.AXES[axis])

  def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed
    preferences.require(data_dir, bench)  # a stale benchmark is refused here, in one sentence
    a = preferences.split_arrays(path, axis, split)
    _, text_ids = _preference_texts(str(path), path.stat().st_mtime_ns, str(data_dir))
    lengths = a["lengths"] - 1  # items = history, then the target
    history = tf.RaggedTensor.from_tensor(tf.constant(a["items"], tf.int32), lengths=tf.constant(lengths))
    target = a["items"][np.arange(len(lengths)), lengths]
    prefs = tf.constant(a["preferences"], tf.int32)
    prefs = tf.RaggedTensor.from_tensor(prefs, lengths=tf.reduce_sum(tf.cast(prefs > 0, tf.int32), 1))
    return tf.data.Dataset.from_tensor_slices({
        "history": history, "target": tf.constant(target, tf.int32), "preferences": prefs,
        "sign": tf.constant(a["sign"], tf.float32), "user_id": tf.constant(a["user_id"], tf.int32),
        "text_id": tf.constant(text_ids[(axis, split)]), "example_id": tf.range(len(lengths), dtype=tf.int64)})

  sizes = preferences.split_sizes(path)
  counts = {s: sum(sizes.get(p, 0) for p in preferences.AXES[axis][s]) for s in splits}
  return seqio.FunctionDataSource(dataset_fn, splits=splits, num_input_examples=counts)


def frozen_array(task_name: str, name: str) -> np.ndarray:
  """A frozen input of a task (or of the first task of a mixture that has it)."""
  provider = seqio.get_mixture_or_task(task_name)
  for task in (provider.tasks if isinstance(provider, seqio.Mixture) else [provider]):
    if name in FROZEN.get(task.name, {}):
      return FROZEN[task.name][name]()
  raise ValueError(f"task {task_name!r} provides no frozen input {name!r}; tasks over semantic IDs provide "
                   "'semantic_id_tokens', preference tasks also 'item_embeddings' and 'preference_embeddings', "
                   "the REGEN LUMEN / narrative tasks 'wals_item_vectors', 'interaction_content', "
                   "'interaction_offsets'")


def _benchmark_array(path, key):
  with np.load(path) as f:
    return np.asarray(f[key], np.float32)


def register_preferences(name: str, data_dir) -> list[str]:
  from . import preferences  # pylint: disable=g-import-not-at-top
  added = []
  for ids in _semantic_ids().names(data_dir):
    meta = _semantic_ids().metadata(data_dir, ids)
    vocab = SemanticIdVocabulary(int(meta["vocab_size"]))
    tokens_fn = functools.partial(lambda d, n: _semantic_ids().load(d, n).tokens, str(data_dir), ids)
    for bench, path in preferences.benchmarks(data_dir).items():
      prefix = f"{preferences.task_prefix(name, bench)}_sid_{ids}"
      pref_vocab = preferences.preference_vocabulary(path)
      frozen = {"semantic_id_tokens": tokens_fn,
                "item_embeddings": functools.partial(_benchmark_array, path, "item_embeddings"),
                "preference_embeddings": functools.partial(_benchmark_array, path, "pref_embeddings"),
                "preference_texts": functools.partial(lambda p, d: _preference_texts(str(p), p.stat().st_mtime_ns,
                                                                                     str(d))[0], path, data_dir)}
      rates = []
      for axis in preferences.AXES:
        task = f"{prefix}_{axis}"
        seqio.TaskRegistry.add(
            task, source=_preference_source(path, axis, data_dir, bench),
            preprocessors=[functools.partial(sp.to_semantic_ids, tokens_fn=tokens_fn),
                           seqio.CacheDatasetPlaceholder()],
            output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                             "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
                             "preferences": seqio.Feature(pref_vocab, add_eos=False, dtype=tf.int32)})
        DESCRIPTIONS[task] = f"preference discerning ({bench}) over semantic IDs {ids!r}: {axis.replace('_', ' ')}"
        SEMANTIC_IDS[task] = (str(data_dir), ids)
        FROZEN[task] = frozen
        added.append(task)
        rows = preferences.train_rows(path, axis)
        if rows:
          rates.append((task, float(rows)))
      axes = {axis: f"{prefix}_{axis}" for axis in preferences.AXES}
      AXIS_TASKS.update({t: axes for t in axes.values()})
      if rates:
        AXIS_TASKS[f"{prefix}_mix"] = axes
        seqio.MixtureRegistry.add(f"{prefix}_mix", rates)
        DESCRIPTIONS[f"{prefix}_mix"] = (f"preference discerning ({bench}) over semantic IDs {ids!r}: every "
                                         "training split, rates by rows")
        added.append(f"{prefix}_mix")
  return added
