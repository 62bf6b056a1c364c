"""Input pipeline: SeqIO task/mixture -> per-process batches -> global jax.Arrays.

Each process reads its own shard (seqio.ShardInfo(jax.process_index(),
jax.process_count()) by default) and batches `batch_size // process_count`
examples; `to_global` assembles the global batch on the mesh.

Epochs are built one by one: epoch e shuffles with a seed derived from
(seed, e) and runs the feature converter for epoch e (`with_epoch`), so
stochastic steps (masking) are fresh every epoch yet a pure function of
(seed, epoch, example). That is what lets `DataIterator` save a two-number
state (epoch, batches consumed) and resume on exactly the next batch.

When the feature converter can split off an epoch-invariant part
(`epoch_invariant_rows()`: SASRec's next-item packing entirely; Bert4Rec's packing, with
its masks drawn per epoch on the packed rows in numpy) and nothing random runs after the
task's cache placeholder, `DataIterator` converts epoch 0 once, keeps its rows in host
memory, and serves every later epoch as a seeded permutation of those rows: no tf.data
work competes with the train step after the first epoch (on a 2-core host the
pipeline's CPU time is otherwise taken from the step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from recjax.data import vocab

vocab.hide_accelerators_from_tf()

# Non-output features our converters read; Mixtures drop them unless told.
_PASSTHROUGH = ("example_id", "critiques", "epoch", "history", "sign", "target_item", "user_id",
                "text_id", "position")
_STATE_VERSION = 1


def _provider(mixture_or_task_name_or_obj) -> seqio.DatasetProviderBase:
  if isinstance(mixture_or_task_name_or_obj, seqio.DatasetProviderBase):
    return mixture_or_task_name_or_obj
  try:
    return seqio.get_mixture_or_task(mixture_or_task_name_or_obj)
  except ValueError as e:
    raise ValueError(f"Unknown SeqIO task or mixture {mixture_or_task_name_or_obj!r}; is the module that "
                     "registers it (e.g. recjax.tasks) imported?") from e


def train_item_counts(mixture_or_task_name: str, rows: int) -> np.ndarray:
  """Item counts [rows] (int64) over the training split of a task, or of a mixture's first
  task (a mixture's tasks share one item-sequence source); PAD and MASK count 0. The
  popularity baseline's scores and a popularity sampler's source."""
  provider = _provider(mixture_or_task_name)
  task = provider.tasks[0] if isinstance(provider, seqio.Mixture) else provider
  import recjax.tasks as tasks  # pylint: disable=g-import-not-at-top
  counts = np.zeros(rows, np.int64)
  known = tasks.train_item_counts(task.name)  # counted by `recjax prepare`: Clothing's 1.2M
  if known is not None:  # users take ~10 min through the task, this a fraction of a second
    if len(known) > rows:
      raise ValueError(f"{task.name}: {len(known)} item ids for a table of {rows} rows")
    counts[:len(known)] = known
  else:
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, trim_output_features=False)
    for ex in ds.as_numpy_iterator():
      np.add.at(counts, ex["items"], 1)
  counts[:vocab.NUM_RESERVED] = 0
  return counts


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle / preprocessing seed of one epoch, well mixed and < 2**31."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


def default_shard_info() -> seqio.ShardInfo:
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything that determines the stream of batches."""

  provider: seqio.DatasetProviderBase
  split: str
  feature_converter: seqio.FeatureConverter
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  shuffle: bool
  seed: int
  shard_info: seqio.ShardInfo
  use_cached: bool

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.shard_info.num_shards

  def identity(self) -> dict[str, Any]:
    """The JSON-able part a saved state must agree with to be resumable."""
    return {
        "task": self.provider.name,
        "split": self.split,
        "task_feature_lengths": {k: int(v) for k, v in sorted(self.task_feature_lengths.items())},
        "batch_size": self.batch_size,
        "shuffle": self.shuffle,
        "seed": self.seed,
        "shard": [self.shard_info.index, self.shard_info.num_shards],
    }

  def epoch_dataset(self, epoch: int, drop_remainder: bool = True,
                    converter: seqio.FeatureConverter | None = None) -> tf.data.Dataset:
    """Batches of one epoch, a pure function of (this spec, epoch); `converter`
    replaces the spec's (as is, not re-seeded per epoch)."""
    kwargs = dict(split=self.split, use_cached=self.use_cached, shuffle=self.shuffle,
                  seed=epoch_seed(self.seed, epoch), shard_info=self.shard_info, num_epochs=1,
                  trim_output_features=False)  # the converters keep the MOST RECENT items
    if isinstance(self.provider, seqio.Mixture):
      key = getattr(self.feature_converter, "example_id_key", "example_id")
      kwargs["passthrough_features"] = sorted({*_PASSTHROUGH, key})
    ds = self.provider.get_dataset(dict(self.task_feature_lengths), **kwargs)
    if converter is None:
      converter = self.feature_converter
      if hasattr(converter, "with_epoch"):
        converter = converter.with_epoch(epoch)
    ds = converter(ds, task_feature_lengths=self.task_feature_lengths)
    return ds.batch(self.local_batch_size, drop_remainder=drop_remainder)

  def reusable_rows(self) -> bool:
    """Whether every epoch's rows can come from epoch 0's: a converter with an
    epoch-invariant part (`epoch_invariant_rows`) over a Task (a Mixture re-draws
    its sampling each epoch) whose preprocessors all precede a cache placeholder
    (later ones may be random per epoch)."""
    if not (self.shuffle and hasattr(self.feature_converter, "epoch_invariant_rows")):
      return False
    if not isinstance(self.provider, seqio.Task):
      return False
    preps = list(self.provider.preprocessors)
    cache = [i for i, p in enumerate(preps) if isinstance(p, seqio.CacheDatasetPlaceholder)]
    return not preps or (bool(cache) and cache[-1] == len(preps) - 1)


def _make_spec(mixture_or_task_name_or_obj, *, split, feature_converter, task_feature_lengths, batch_size,
               shuffle, seed, shard_info, use_cached) -> _Spec:
  shard_info = shard_info or default_shard_info()
  if batch_size % shard_info.num_shards:
    raise ValueError(f"global batch_size {batch_size} is not divisible by the {shard_info.num_shards} "
                     "data shards (processes)")
  if not isinstance(feature_converter, seqio.FeatureConverter):
    raise TypeError(f"feature_converter must be a seqio.FeatureConverter, got {type(feature_converter).__name__}")
  return _Spec(_provider(mixture_or_task_name_or_obj), split, feature_converter, dict(task_feature_lengths),
               int(batch_size), bool(shuffle), int(seed), shard_info, use_cached)


def get_dataset(
    mixture_or_task_name_or_obj,
    *,
    split: str,
    feature_converter: seqio.FeatureConverter,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int = 1,
    start_epoch: int = 0,
    shard_info: seqio.ShardInfo | None = None,
    use_cached: bool = False,
) -> tf.data.Dataset:
  """This process's batches for epochs [start_epoch, num_epochs), in order.

  Args:
    mixture_or_task_name_or_obj: a registered name, or a seqio Task / Mixture.
    split: dataset split.
    feature_converter: converts task features to model features; one with a
      `with_epoch(epoch)` method (our training converters) is re-seeded per epoch.
    task_feature_lengths: e.g. {"items": 50}.
    batch_size: GLOBAL batch size; each process gets batch_size // num_shards.
    shuffle: shuffle examples (per epoch, seeded).
    seed: base seed of shuffling and stochastic steps.
    num_epochs: epochs to end at (exclusive). Open-ended training uses
      `DataIterator(num_epochs=None)`, which also resumes exactly.
    start_epoch: first epoch.
    shard_info: this process's shard; default from jax.process_index/count.
    use_cached: read the task's offline cache.

  Returns:
    A tf.data.Dataset of fixed-shape batches (remainders dropped per epoch).
  """
  if num_epochs is None:
    raise ValueError("get_dataset needs a finite num_epochs (each epoch is re-seeded); "
                     "use DataIterator(num_epochs=None) to repeat indefinitely")
  if not start_epoch < num_epochs:
    raise ValueError(f"start_epoch {start_epoch} must be < num_epochs {num_epochs}")
  spec = _make_spec(mixture_or_task_name_or_obj, split=split, feature_converter=feature_converter,
                    task_feature_lengths=task_feature_lengths, batch_size=batch_size, shuffle=shuffle,
                    seed=seed, shard_info=shard_info, use_cached=use_cached)
  epochs = [spec.epoch_dataset(e) for e in range(start_epoch, num_epochs)]
  return functools.reduce(tf.data.Dataset.concatenate, epochs)


class DataIterator:
  """Resumable iterator of numpy batches over (possibly endless) epochs.

  `state()` is a small JSON-able dict; `restore(state)` on a fresh iterator
  built with the same arguments continues with exactly the batch that would
  have come next. Restoring replays the current epoch up to that batch through
  tf.data (cost: part of one epoch of input work, once), which is what keeps
  the state two integers rather than a tf.data checkpoint.

  Epochs are chained `epochs_per_chunk` at a time in one tf.data pipeline so
  prefetching runs across epoch boundaries.
  """

  def __init__(
      self,
      mixture_or_task_name_or_obj,
      *,
      split: str,
      feature_converter: seqio.FeatureConverter,
      task_feature_lengths: Mapping[str, int],
      batch_size: int,
      shuffle: bool = True,
      seed: int = 0,
      num_epochs: int | None = None,
      shard_info: seqio.ShardInfo | None = None,
      use_cached: bool = False,
      epochs_per_chunk: int = 4,
      reuse_rows: bool | None = None,
  ):
    self._spec = _make_spec(mixture_or_task_name_or_obj, split=split, feature_converter=feature_converter,
                            task_feature_lengths=task_feature_lengths, batch_size=batch_size, shuffle=shuffle,
                            seed=seed, shard_info=shard_info, use_cached=use_cached)
    self._num_epochs = num_epochs
    self._epochs_per_chunk = max(1, int(epochs_per_chunk))
    self._epoch = 0  # epoch of the next batch
    self._step = 0  # batches of self._epoch already returned
    self._it: Iterator | None = None
    self._chunk_end = 0
    self._chunk_yielded = False
    # Epoch-0 rows reused by later epochs (see the module docstring); None = auto.
    self._reuse = self._spec.reusable_rows() if reuse_rows is None else bool(reuse_rows)
    if self._reuse and not self._spec.shuffle:
      raise ValueError("reuse_rows needs shuffle=True: later epochs are permutations of epoch 0's rows")
    # What epoch 0 is converted with, and what turns its rows into each epoch's batches.
    # reuse_rows=True on a converter without the split asserts it is epoch-invariant.
    split = getattr(self._spec.feature_converter, "epoch_invariant_rows", None)
    self._rows_converter, self._finish = split() if (self._reuse and split) else (None, None)
    self._rows: dict[str, np.ndarray] | None = None
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, its row permutation)
    self._recorded: list | None = None  # epoch-0 batches seen so far, when recording from its start

  # --- iteration ---------------------------------------------------------------

  def _open_chunk(self) -> None:
    start = self._epoch
    end = start + self._epochs_per_chunk
    if self._num_epochs is not None:
      end = min(end, self._num_epochs)
    if self._reuse:
      end = start + 1  # only epoch 0 comes from tf.data
      self._recorded = [] if self._step == 0 else None

    def tag(epoch):  # batches carry their epoch, so state() knows where it is
      epoch = tf.constant(epoch, tf.int64)
      return tf.autograph.experimental.do_not_convert(lambda batch: (epoch, batch))

    parts = []
    for e in range(start, end):
      ds = self._spec.epoch_dataset(e, drop_remainder=not self._reuse, converter=self._rows_converter)
      if e == start and self._step:
        ds = ds.skip(self._step)
      parts.append(ds.map(tag(e)))
    ds = functools.reduce(tf.data.Dataset.concatenate, parts).prefetch(tf.data.AUTOTUNE)
    self._it = ds.as_numpy_iterator()
    self._chunk_end = end
    self._chunk_yielded = False

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._num_epochs is not None and self._epoch >= self._num_epochs:
        raise StopIteration
      if self._reuse and self._epoch >= 1:
        batch = self._reused_batch()
        if batch is None:
          self._epoch, self._step = self._epoch + 1, 0
          continue
        self._step += 1
        return batch
      if self._it is None:
        self._open_chunk()
      try:
        epoch, batch = next(self._it)
        if self._reuse:
          if self._recorded is not None:
            self._recorded.append(batch)
          if len(next(iter(batch.values()))) < self._spec.local_batch_size:
            continue  # epoch 0's last, partial batch: kept for later epochs, not served
          if self._finish is not None:
            batch = self._finish(batch, 0)
      except StopIteration:
        if not self._chunk_yielded and self._step == 0:
          raise ValueError(f"epochs {self._epoch}..{self._chunk_end - 1} of {self._spec.provider.name!r} gave no "
                           f"full batch of {self._spec.local_batch_size}: the split is smaller than one batch "
                           "per process") from None
        self._it = None
        if self._reuse and self._recorded is not None:
          self._rows = _concat(self._recorded)
        self._recorded = None
        self._epoch, self._step = self._chunk_end, 0
        continue
      self._chunk_yielded = True
      if epoch != self._epoch:
        self._epoch, self._step = int(epoch), 0
      self._step += 1
      return batch

  def _reused_batch(self) -> dict[str, np.ndarray] | None:
    """Batch `step` of epoch `epoch` (>= 1): a seeded permutation of epoch 0's rows."""
    if self._rows is None:  # resumed past epoch 0: convert it once more, serving nothing
      ds = self._spec.epoch_dataset(0, drop_remainder=False, converter=self._rows_converter)
      self._rows = _concat(list(ds.as_numpy_iterator()))
    n = len(next(iter(self._rows.values()))) if self._rows else 0
    b = self._spec.local_batch_size
    if n < b:
      raise ValueError(f"epoch 0 of {self._spec.provider.name!r} gave {n} rows, fewer than one batch of {b}")
    if (self._step + 1) * b > n:
      return None
    if self._order is None or self._order[0] != self._epoch:
      self._order = (self._epoch, np.random.default_rng(epoch_seed(self._spec.seed, self._epoch)).permutation(n))
    take = np.sort(self._order[1][self._step * b:(self._step + 1) * b])  # sorted: cheaper gathers, same set
    batch = {k: v[take] for k, v in self._rows.items()}
    return batch if self._finish is None else self._finish(batch, self._epoch)

  # --- checkpointing -------------------------------------------------------------

  def state(self) -> dict[str, Any]:
    """JSON-able position: the next batch is batch `step` of `epoch`."""
    state = {"version": _STATE_VERSION, "epoch": self._epoch, "step": self._step, **self._spec.identity()}
    if self._reuse:  # later epochs differ from re-converted ones; absent = not reused
      state["reuse_rows"] = True
    return state

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state`; the iterator must be built like the saved one."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} is not {_STATE_VERSION}")
    mine = self._spec.identity()
    mine["reuse_rows"] = True if self._reuse else None
    diff = {k: (state.get(k), v) for k, v in mine.items() if _jsonish(state.get(k)) != _jsonish(v)}
    if diff:
      hint = (" (the saved run converted every epoch: build the iterator with reuse_rows=False, e.g. "
              "--gin.loop.train.reuse_rows=False)" if set(diff) == {"reuse_rows"} and not state.get("reuse_rows")
              else "")
      raise ValueError("cannot resume the data iterator: it is configured differently from the saved state "
                       f"(saved, now): {diff}{hint}")
    self._epoch, self._step = int(state["epoch"]), int(state["step"])
    self._it = None

  # --- shapes --------------------------------------------------------------------

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a GLOBAL batch (what a jitted step sees), e.g. to init a model."""
    spec = self._spec.epoch_dataset(0).element_spec
    shards = self._spec.shard_info.num_shards
    return {k: jax.ShapeDtypeStruct((v.shape[0] * shards, *v.shape[1:]), v.dtype.as_numpy_dtype)
            for k, v in spec.items()}


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if not batches:
    return {}
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _jsonish(x):
  """Normalises tuples to lists, so a state that went through JSON compares equal."""
  if isinstance(x, (list, tuple)):
    return [_jsonish(v) for v in x]
  if isinstance(x, Mapping):
    return {k: _jsonish(v) for k, v in x.items()}
  return x


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles per-process batches into global jax.Arrays (leading axis = batch)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def packing_efficiency(batch: Mapping[str, Any]) -> float:
  """Fraction of positions holding a real token (segment_ids != 0)."""
  seg = np.asarray(batch["segment_ids"])
  return float(np.mean(seg != 0)) if seg.size else 0.0
