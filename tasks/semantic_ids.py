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
  """Semantic-ID artifacts of a dataset (names, metadata, load). TEMPORARY adapter."""

  @staticmethod
  def names(data_dir):
    import pathlib
    d = pathlib.Path(data_dir) / "semantic_ids"
    return sorted(p.stem for p in d.glob("*.npz") if not p.name.startswith(".")) if d.is_dir() else []

  @staticmethod
  def metadata(data_dir, name):
    import json, pathlib
    return json.loads((pathlib.Path(data_dir) / "semantic_ids" / f"{name}.json").read_text())

  @staticmethod
  def load(data_dir, name):
    from recjax.models import rqvae
    return rqvae.load_semantic_ids(data_dir, name)


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
    added.append(task)
  return added
