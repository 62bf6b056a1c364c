"""SeqIO data sources over a prepared dataset: one example per user and split.

Split semantics (leave-one-out, see docs/data.md):
  train       items[:-2]   every user's training prefix
  validation  items[:-1]   ends with the validation target
  test        items        ends with the test target
Per-step columns (ratings, critiques, reviews, ...) are cut the same way, so position t of
every feature describes the same interaction.

Each example: `user_id` (int32), `example_id` (int64, = user_id; stable across runs, used
to seed stochastic preprocessing), and one 1-D tensor per requested per-step column.
Rows are materialised as ragged tensors (values + row lengths), so building the source
costs one columnar read, not a Python generator per user.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import seqio
import tensorflow as tf

from recjax.data import vocab as _vocab  # noqa: F401  (hides accelerators from TF)
from recjax.data.prepared import PreparedDataset

SPLITS = ("train", "validation", "test")


class _DropUncachedWarning(logging.Filter):
  """seqio warns on every epoch that an uncached FunctionDataSource shuffles poorly on
  restarts; recjax reshuffles each epoch from (seed, epoch) and resumes exactly, so the
  warning does not apply."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "uncached FunctionDataset" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUncachedWarning())
_DROP_LAST = {"train": 2, "validation": 1, "test": 0}
_NUMERIC = {"items": (np.int32, tf.int32), "ratings": (np.float32, tf.float32),
            "timestamps": (np.int64, tf.int64)}
_TEXT = ("reviews", "summaries", "critiques", "endorsements")


def _list_column(table: pa.Table, name: str, drop_last: int):
  """(values, row_lengths) of a list column with each row's last `drop_last` entries cut."""
  col = table.column(name).combine_chunks()
  offsets = np.asarray(col.offsets, np.int64)
  lengths = np.diff(offsets)
  if (lengths < drop_last + 1).any():
    raise ValueError(f"column {name!r}: some users have fewer than {drop_last + 1} steps")
  values = col.values
  if pa.types.is_string(values.type):
    values = np.asarray(values.fill_null("").to_numpy(zero_copy_only=False), object)
  else:
    values = values.to_numpy(zero_copy_only=False)
  if drop_last:
    pos_from_end = np.repeat(offsets[1:], lengths) - np.arange(offsets[-1])
    values = values[pos_from_end > drop_last]
    lengths = lengths - drop_last
  return values, lengths


def load_split(dataset: PreparedDataset, split: str, columns: Sequence[str]) -> dict[str, tf.Tensor]:
  """All users' rows of `split` as tensors: ragged per-step columns, dense per-user ones."""
  if split not in _DROP_LAST:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  missing = [c for c in columns if not dataset.has_field(c)]
  if missing:
    raise ValueError(f"{dataset.data_dir}: no column(s) {missing}; present: {dataset.manifest['fields']}")
  table = dataset.sequences(["user_id", *columns])
  user_id = table.column("user_id").to_numpy()
  out: dict[str, tf.Tensor] = {"user_id": tf.constant(user_id, tf.int32),
                               "example_id": tf.constant(user_id, tf.int64)}
  for name in columns:
    if table.schema.field(name).type == pa.string():  # per-user narratives
      out[name] = tf.constant(table.column(name).fill_null("").to_numpy(zero_copy_only=False)
                              .astype(object), tf.string)
      continue
    values, lengths = _list_column(table, name, _DROP_LAST[split])
    dtype = _NUMERIC[name][1] if name in _NUMERIC else tf.string
    if name in _NUMERIC:
      values = values.astype(_NUMERIC[name][0])
    out[name] = tf.RaggedTensor.from_row_lengths(tf.constant(values, dtype), lengths)
  return out


def prepared_source(data_dir, columns: Sequence[str] = ("items",)) -> seqio.DataSource:
  """A seqio source yielding one example per user for each split.

  `shuffle_files` is accepted but ignored: the source order is the user order, and
  seqio's `shuffle` after preprocessing does the shuffling, so a fixed seed gives a
  fixed order.
  """
  dataset = PreparedDataset(data_dir)

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed
    rows = _cached_split(str(dataset.data_dir), dataset.content_hash, split, tuple(columns))
    return tf.data.Dataset.from_tensor_slices(rows)

  counts = {s: dataset.num_users for s in SPLITS}
  return seqio.FunctionDataSource(dataset_fn, splits=SPLITS, num_input_examples=counts)


@functools.lru_cache(maxsize=16)
def _cached_split(data_dir: str, content_hash: str, split: str, columns: tuple[str, ...]):
  # Tasks over the same dataset (many per family) share one columnar read per split;
  # the content hash in the key keeps a re-prepared dataset from being served stale.
  del content_hash
  return load_split(PreparedDataset(data_dir), split, columns)


# --- next-item examples ---------------------------------------------------------------


def next_item_examples(dataset: PreparedDataset, split: str, max_history: int) -> dict[str, np.ndarray]:
  """(history -> next item) examples of a split, as flat numpy arrays.

  train: every prefix of every user's training items (items[:-2]): history s[:t] -> s[t]
  for t >= 1, as TIGER trains; validation / test: one example per user, the split's last
  item held out. A history keeps its most recent `max_history` items (an upper bound: the
  converter cuts to what the model reads).

  Returns "history" (flat item ids), "history_lengths", "target", "user_id" and
  "example_id" (train: the target's index among all training interactions; eval: the
  user id; stable across runs either way).
  """
  if split not in _DROP_LAST:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  table = dataset.sequences(["user_id", "items"])
  users = table.column("user_id").to_numpy().astype(np.int64)
  values, lengths = _list_column(table, "items", _DROP_LAST[split])
  values = values.astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  if split == "train":
    # Every position but each user's first is a target.
    is_target = np.ones(len(values), bool)
    is_target[offsets[:-1]] = False
    targets = np.flatnonzero(is_target)
  else:
    targets = offsets[1:] - 1
  owner = np.searchsorted(offsets, targets, side="right") - 1
  start = np.maximum(offsets[owner], targets - int(max_history))
  hist_len = targets - start
  # Flat indices of every history: start + 0..len-1 per example, without a Python loop.
  firsts = np.repeat(start - np.concatenate([[0], np.cumsum(hist_len)[:-1]]), hist_len)
  index = firsts + np.arange(int(hist_len.sum()))
  return {"history": values[index], "history_lengths": hist_len, "target": values[targets],
          "user_id": users[owner].astype(np.int32),
          "example_id": (targets if split == "train" else users[owner]).astype(np.int64)}


def next_item_source(data_dir, max_history: int = 200) -> seqio.DataSource:
  """A seqio source of (history -> next item) examples: "history" (int32 [n] item ids,
  oldest first), "target", "user_id", "example_id"; see `next_item_examples`."""
  dataset = PreparedDataset(data_dir)
  counts = {s: len(_cached_next_items(str(dataset.data_dir), dataset.content_hash, s, max_history)["target"])
            for s in SPLITS}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed
    ex = _cached_next_items(str(dataset.data_dir), dataset.content_hash, split, max_history)
    return tf.data.Dataset.from_tensor_slices({
        "history": tf.RaggedTensor.from_row_lengths(tf.constant(ex["history"]), ex["history_lengths"]),
        "target": tf.constant(ex["target"]), "user_id": tf.constant(ex["user_id"]),
        "example_id": tf.constant(ex["example_id"])})

  return seqio.FunctionDataSource(dataset_fn, splits=SPLITS, num_input_examples=counts)


@functools.lru_cache(maxsize=16)
def _cached_next_items(data_dir: str, content_hash: str, split: str, max_history: int):
  del content_hash  # part of the key: a re-prepared dataset is read again
  return next_item_examples(PreparedDataset(data_dir), split, max_history)
