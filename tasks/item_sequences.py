"""Task families 1 and 3 over one prepared dataset: item sequences and critiques.

For a dataset named DS (splits train / validation / test, one example per user: the
training prefix items[:-2], then items[:-1] and items, so evaluation examples end with
the held-out item):

  DS_items               family 1, Bert4Rec / FLARE: "items", plus "critiques_precise"
                         and "critiques_broad" (the category critique of every item)
                         when the dataset has category paths
  DS_critique_precise    family 3, FLARE critiquing: "items" and "critiques", the
  DS_critique_broad      category path of each item cut to 4 / 2 levels (at evaluation
  DS_critique_none       the converter puts the target's critique at the MASK); "none"
                         has every critique id 0 (the same model without critiques)
  DS_critique_mix        mixture of the three, equal rates (one critique table)
  DS_critique_mix_precise  the same at rates 2 : 1 : 1 (precise : broad : none)
  DS_critique_regen      family 3, REGEN: "critiques" = the user's critique that led to
                         each item (0 = none), when the dataset has a critiques column

Every example also carries "example_id" and "user_id" (int, = user id), which seed the
converter's masking. Critique ids index `sequence_preprocessors.critique_table(dir, kind)`,
also reachable as `task.output_features["critiques"].vocabulary.table`.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import seqio
import tensorflow as tf

from recjax.data import sequence_preprocessors as sp
from recjax.data.prepared import PreparedDataset
from recjax.data.sources import prepared_source
from recjax.data.vocab import ItemVocabulary

# Task name -> one-line description, filled by `register`.
DESCRIPTIONS: dict[str, str] = {}


def describe(name: str) -> str | None:
  return DESCRIPTIONS.get(name)


def _critique_feature(data_dir, kind: str) -> seqio.Feature:
  return seqio.Feature(sp.CritiqueVocabulary(data_dir, kind), add_eos=False, dtype=tf.int32)


# Tasks whose "items" are the prepared dataset's sequences as `recjax prepare` wrote them (their
# preprocessors only add features): the train split's item counts are the dataset's
# `train_count` (`train_item_counts`).
SOURCE_ITEMS: dict[str, pathlib.Path] = {}


def train_item_counts(task_name: str) -> np.ndarray | None:
  """int64 [vocab_size] counts of each item id in the train split (PAD and MASK 0), read
  from the prepared dataset; None for a task not in SOURCE_ITEMS."""
  if task_name not in SOURCE_ITEMS:
    return None
  ds = PreparedDataset(SOURCE_ITEMS[task_name])
  t = ds.items(["item_id", "train_count"]).to_pydict()
  counts = np.zeros(ds.vocab_size, np.int64)
  counts[np.asarray(t["item_id"], np.int64)] = t["train_count"]
  return counts


def register(name: str, data_dir) -> list[str]:
  """Registers the item-sequence and critique tasks of dataset `name`; returns their names."""
  ds = PreparedDataset(data_dir)
  data_dir = ds.data_dir
  items = seqio.Feature(ItemVocabulary(ds.num_items), add_eos=False, dtype=tf.int32)
  has_categories = ds.manifest.get("max_category_depth", 0) > 0
  added: list[str] = []

  def add_task(suffix, description, columns, preprocessors, extra_features):
    task = f"{name}_{suffix}"
    seqio.TaskRegistry.add(
        task,
        source=prepared_source(data_dir, columns),
        # Deterministic lookups only; the cloze masking is the converter's (seeded by
        # seed, epoch and example_id), after this placeholder.
        preprocessors=[*preprocessors, seqio.CacheDatasetPlaceholder()],
        output_features={"items": items, **extra_features},
    )
    DESCRIPTIONS[task] = description
    SOURCE_ITEMS[task] = data_dir
    added.append(task)

  # Family 1: item sequences.
  crit = {}
  preps = []
  if has_categories:
    for g in sp.LEVELS:
      crit[f"critiques_{g}"] = _critique_feature(data_dir, "category")
      preps.append(functools.partial(sp.add_category_critiques, data_dir=data_dir, granularity=g,
                                     output_key=f"critiques_{g}"))
  add_task("items", "item-id sequences (Bert4Rec / FLARE)"
           + (", with precise and broad category-critique ids per item" if has_categories else ""),
           ("items",), preps, crit)

  # Family 3: history + critique of the target -> next item.
  if has_categories:
    category = {"critiques": _critique_feature(data_dir, "category")}
    for g, levels in sp.LEVELS.items():
      add_task(f"critique_{g}", f"FLARE {g} critiques: each item's category path cut to {levels} levels",
               ("items",), [functools.partial(sp.add_category_critiques, data_dir=data_dir, granularity=g)],
               category)
    add_task("critique_none", "FLARE no-critique baseline: the critique tasks' features, every id 0",
             ("items",), [sp.no_critiques], category)
    mix = f"{name}_critique_mix"
    seqio.MixtureRegistry.add(mix, [f"{name}_critique_{g}" for g in (*sp.LEVELS, "none")], default_rate=1.0)
    DESCRIPTIONS[mix] = "mixture: critique_precise + critique_broad + critique_none, equal rates"
    added.append(mix)
    # Half of the examples precise: more signal for the finest (level-4) critiques.
    rates = {"precise": 2.0, "broad": 1.0, "none": 1.0}
    seqio.MixtureRegistry.add(f"{mix}_precise", [(f"{name}_critique_{g}", r) for g, r in rates.items()])
    DESCRIPTIONS[f"{mix}_precise"] = "mixture: critique_precise 2 : critique_broad 1 : critique_none 1"
    added.append(f"{mix}_precise")
  if ds.has_field("critiques"):
    add_task("critique_regen", "REGEN critiques: the user's critique that led to each item (0 = none)",
             ("items", "critiques"), [functools.partial(sp.encode_critique_strings, data_dir=data_dir)],
             {"critiques": _critique_feature(data_dir, "regen")})
  return added
