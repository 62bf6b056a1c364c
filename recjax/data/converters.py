"""Feature converters for item sequences: Bert4Rec cloze masking, packing, eval.

Task features (what a recjax Task yields, one example per user / window):
  "items"       int32 [n]  chronological item ids (ending with the target at eval)
  "example_id"  int64 []   stable id of the example (e.g. user id); seeds masking
  "critiques"   int32 [n]  optional per-position critique-string ids (0 = none)
  "epoch"       int64 []   optional; overrides the converter's epoch for masking

Why not seqio's stock converters:
  * Long histories keep their most RECENT items. seqio trims from the end (and so
    does `Task.get_dataset(trim_output_features=True)`), which would drop exactly
    the items that matter; `recjax.data.pipeline` turns that trim off and the
    converters trim from the front instead.
  * Packing is first fit decreasing, ~0.99 full. seqio's `trim_and_pack_dataset`
    casts every feature to int32 and measures lengths by counting non-zeros (so
    float "weights" and sparse "critiques" break), and packs next fit in windows
    of L examples, wasting ~10% of every row on short sequences.
  * Speed: examples are converted `window` at a time as ragged batches, not one
    by one; per-example tf.data maps cost more than all the work they do. For
    the same reason seqio's per-example length assertions are off: lengths hold
    by construction (trimmed, then fixed static shapes).
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import numpy as np
import seqio
import tensorflow as tf

from recjax.data import vocab
from recjax.data.vocab import MASK_ID, PAD_ID

vocab.hide_accelerators_from_tf()

FeatureSpec = seqio.FeatureConverter.FeatureSpec
_AUTOTUNE = tf.data.AUTOTUNE
# Our dataset functions have no Python control flow on tensors; skipping
# autograph's source conversion makes building a pipeline several times faster.
_plain = tf.autograph.experimental.do_not_convert


# --- counter-based randomness --------------------------------------------------------
# Masks must be a pure function of (seed, epoch, example_id, position), drawn for
# a whole ragged batch at once. tf.random's stateless ops take one seed per call,
# so we use the splitmix64 generator: plain uint64 arithmetic, the same bits on
# every platform and TF version.

_GOLDEN = 0x9E3779B97F4A7C15


def _u64(x) -> tf.Tensor:
  if isinstance(x, int):
    return tf.constant(x & (2**64 - 1), tf.uint64)
  x = tf.convert_to_tensor(x)
  if x.dtype == tf.uint64:
    return x
  return tf.bitcast(tf.cast(x, tf.int64), tf.uint64)  # keeps the bits of negative ids


def _mix64(z: tf.Tensor) -> tf.Tensor:
  """splitmix64's finaliser: a bijective, well-mixing hash of uint64."""
  shift = lambda x, n: tf.bitwise.right_shift(x, tf.constant(n, tf.uint64))
  z = tf.bitwise.bitwise_xor(z, shift(z, 30)) * _u64(0xBF58476D1CE4E5B9)
  z = tf.bitwise.bitwise_xor(z, shift(z, 27)) * _u64(0x94D049BB133111EB)
  return tf.bitwise.bitwise_xor(z, shift(z, 31))


def _fold(key: tf.Tensor, data) -> tf.Tensor:
  return _mix64(tf.bitwise.bitwise_xor(key, _mix64(_u64(data) + _u64(_GOLDEN))))


def example_keys(seed: int, epoch, example_ids) -> tf.Tensor:
  """uint64 keys that depend only on (seed, epoch, example_id), broadcasting.

  Not on dataset order, sharding, packing or batch layout, so a re-run or a
  resumed job draws the same masks for an example in a given epoch.
  """
  key = _mix64(_u64(seed) + _u64(_GOLDEN))
  return _fold(_fold(key, epoch), example_ids)


def hash_uniform(keys: tf.Tensor, counters) -> tf.Tensor:
  """float64 in [0, 1): element `counter` of the splitmix64 stream of `key`."""
  z = _mix64(keys + (_u64(counters) + _u64(1)) * _u64(_GOLDEN))
  return tf.cast(tf.bitwise.right_shift(z, tf.constant(11, tf.uint64)), tf.float64) * 2.0**-53


def cloze_masks(items: tf.RaggedTensor, keys: tf.Tensor, mask_prob: float, last_item_prob: float) -> tf.RaggedTensor:
  """Bert4Rec cloze masks (ragged bool) for a batch of non-empty sequences.

  Per sequence: with probability `last_item_prob` only the last position is
  masked (the eval setting); otherwise each position independently with
  `mask_prob`, and if none was drawn the position with the smallest draw, so
  every sequence has a target without biasing which one. Draw 0 of a key's
  stream is the last-item coin, draw p+1 is position p's.
  """
  rows = items.value_rowids()
  num_rows = items.nrows()
  pos = tf.range(tf.size(rows, out_type=tf.int64), dtype=tf.int64) - tf.gather(items.row_starts(), rows)
  u = hash_uniform(tf.gather(keys, rows), pos + 1)
  mask = u < mask_prob
  any_masked = tf.math.unsorted_segment_max(tf.cast(mask, tf.int32), rows, num_rows) > 0
  smallest = tf.math.unsorted_segment_min(u, rows, num_rows)
  mask |= ~tf.gather(any_masked, rows) & tf.equal(u, tf.gather(smallest, rows))
  only_last = hash_uniform(keys, 0) < last_item_prob
  is_last = tf.equal(pos, tf.gather(items.row_lengths() - 1, rows))
  mask = tf.where(tf.gather(only_last, rows), is_last, mask)
  return items.with_flat_values(mask)


# numpy twins of the above (same bits), for masking rows on the host: see
# `ItemSequencePackingConverter.epoch_invariant_rows`.


def _np_mix64(z: np.ndarray) -> np.ndarray:
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _np_u64(x) -> np.ndarray:
  return np.asarray(x, np.int64).view(np.uint64) if not isinstance(x, int) else np.asarray(x & (2**64 - 1), np.uint64)


def _np_fold(key: np.ndarray, data) -> np.ndarray:
  return _np_mix64(key ^ _np_mix64(_np_u64(data) + np.uint64(_GOLDEN)))


def np_example_keys(seed: int, epoch, example_ids) -> np.ndarray:
  """`example_keys` in numpy."""
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
    key = _np_mix64(_np_u64(seed) + np.uint64(_GOLDEN))
    return _np_fold(_np_fold(key, epoch), example_ids)


def np_hash_uniform(keys: np.ndarray, counters) -> np.ndarray:
  """`hash_uniform` in numpy."""
  with np.errstate(over="ignore"):
    z = _np_mix64(keys + (_np_u64(counters) + np.uint64(1)) * np.uint64(_GOLDEN))
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def np_cloze_masks(segment_ids: np.ndarray, positions: np.ndarray, keys: np.ndarray, mask_prob: float,
                   last_item_prob: float) -> np.ndarray:
  """`cloze_masks` over packed rows: bool [rows, L].

  Segments are contiguous in row-major order and start at position 0 (as
  `pack_batch` lays them out); `keys` holds one key per segment in that order.
  """
  valid = segment_ids.reshape(-1) > 0
  pos = positions.reshape(-1)[valid].astype(np.int64)
  starts = np.flatnonzero(pos == 0)
  seg = np.cumsum(pos == 0) - 1  # each token's segment
  u = np_hash_uniform(keys[seg], pos + 1)
  mask = u < mask_prob
  any_masked = np.logical_or.reduceat(mask, starts)
  smallest = np.minimum.reduceat(u, starts)
  mask |= ~any_masked[seg] & (u == smallest[seg])
  lens = np.diff(np.append(starts, pos.size))
  only_last = np_hash_uniform(keys, 0) < last_item_prob
  mask = np.where(only_last[seg], pos == lens[seg] - 1, mask)
  out = np.zeros(segment_ids.size, bool)
  out[valid] = mask
  return out.reshape(segment_ids.shape)


# --- packing ----------------------------------------------------------------------------


def _first_fit_decreasing(lens: tf.Tensor, length: int):
  """Row, offset and 1-based segment number of each example; rows used.

  First fit decreasing, vectorised: for each length n (longest first) all
  examples of that length are placed at once. Rows are filled lowest first and
  row r takes floor(residual_r / n) of them, which is exactly what placing
  them one by one into the first row with room would do. Rows not yet used
  have residual `length`, so new rows need no special case. Cost: `length`
  loop steps of [B]-vector ops, not B sequential steps.
  """
  b = tf.shape(lens)[0]

  def body(n, res, nseg, row, off, seg):
    sel = tf.where(tf.equal(lens, n))  # [c, 1], in input order
    j = tf.range(tf.shape(sel)[0])
    k = res // n  # how many more length-n examples each row holds
    incl = tf.cumsum(k)
    excl = incl - k
    r = tf.searchsorted(incl, j, side="right")  # row of the j-th such example
    within = j - tf.gather(excl, r)
    row = tf.tensor_scatter_nd_update(row, sel, r)
    off = tf.tensor_scatter_nd_update(off, sel, length - tf.gather(res, r) + within * n)
    seg = tf.tensor_scatter_nd_update(seg, sel, tf.gather(nseg, r) + within + 1)
    taken = tf.clip_by_value(tf.shape(sel)[0] - excl, 0, k)
    return n - 1, res - taken * n, nseg + taken, row, off, seg

  zeros = tf.zeros([b], tf.int32)
  _, res, _, row, off, seg = tf.while_loop(
      lambda n, *_: n > 0, body, [tf.constant(length), tf.fill([b], length), zeros, zeros, zeros, zeros])
  # Rows are opened lowest first, so the used rows are a prefix.
  num_rows = tf.reduce_sum(tf.cast(res < length, tf.int32))
  return num_rows, row, off, seg


def pack_batch(batch: Mapping[str, tf.Tensor], lens: tf.Tensor, length: int,
               keys: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """Packs a padded batch ([B, length] features, example lengths [B]) into rows.

  First fit decreasing (see `_first_fit_decreasing`): only the last row or two
  of a batch come out partly empty (efficiency ~0.99 for Bert4Rec-length
  sequences in rows of 50, batches of ~1000). Examples are never split. Adds
  "segment_ids" (1..k along a row, 0 = padding) and "positions" (0-based per
  segment). Any dtype packs; lens must be in [1, length].

  FFD fills the first rows with the longest examples; given per-example `keys`
  (see `example_keys`), rows are put in an order drawn from the keys of their
  first examples instead, so consecutive rows (one training batch) do not
  share a length profile. Without keys, rows stay in FFD order.
  """
  # An example of another length would be silently left out of every row.
  check = tf.debugging.Assert(tf.reduce_all((lens >= 1) & (lens <= length)),
                              [f"pack_batch needs example lengths in [1, {length}], got", lens])
  with tf.control_dependencies([check]):
    lens = tf.identity(lens)
  num_rows, row, off, seg = _first_fit_decreasing(lens, length)
  if keys is not None:
    first = tf.where(tf.equal(seg, 1))
    draw = hash_uniform(tf.gather_nd(keys, first), 2**40)  # a counter no position uses
    unused = tf.fill(tf.shape(lens), tf.constant(2.0, tf.float64))  # sorts after every draw
    order_key = tf.tensor_scatter_nd_update(unused, tf.gather_nd(row, first)[:, None], draw)
    perm = tf.argsort(order_key, stable=True)
    rank = tf.scatter_nd(perm[:, None], tf.range(tf.size(perm)), tf.shape(perm))
    row = tf.gather(rank, row)
  src = tf.where(tf.sequence_mask(lens, length))  # [tokens, 2]: (example, position)
  ex, pos = src[:, 0], tf.cast(src[:, 1], tf.int32)
  dest = tf.stack([tf.gather(row, ex), tf.gather(off, ex) + pos], axis=1)
  shape = tf.stack([num_rows, length])
  out = {k: tf.scatter_nd(dest, tf.gather_nd(v, src), shape) for k, v in batch.items()}
  out["segment_ids"] = tf.scatter_nd(dest, tf.gather(seg, ex), shape)
  out["positions"] = tf.scatter_nd(dest, pos, shape)
  return out


def pack_examples(ds: tf.data.Dataset, length: int, window: int = 1024, order_key: str | None = None) -> tf.data.Dataset:
  """Packs a dataset of rank-1 examples (all features of one length n, 1 <= n <=
  length) into rows of `length`, first fit decreasing within windows of `window`.
  `order_key` names a uint64 scalar feature per example (`example_keys`): rows are then
  put in an order drawn from it (see `pack_batch`), not longest first; it is not output."""
  keys = sorted(k for k in ds.element_spec if k != order_key)

  @_plain
  def pack(batch):
    order = batch[order_key] if order_key else None
    return _static_rows(pack_batch({k: batch[k] for k in keys}, batch["_len"], length, order), length)

  ds = ds.map(_plain(lambda ex: {**ex, "_len": tf.size(ex[keys[0]], tf.int32)}))
  shapes = {**{k: [length] for k in keys}, "_len": [], **({order_key: []} if order_key else {})}
  ds = ds.padded_batch(window, padded_shapes=shapes)
  return ds.map(pack, num_parallel_calls=_AUTOTUNE).unbatch()


def _static_rows(batch: Mapping[str, tf.Tensor], length: int) -> dict[str, tf.Tensor]:
  """Pins a batch of rows to [None, length] (or [None]) so unbatched rows have static shapes."""
  return {k: tf.ensure_shape(v, [None, length] if v.shape.rank == 2 else [None]) for k, v in batch.items()}


# --- converters ---------------------------------------------------------------------------


class _ItemSequenceConverter(seqio.FeatureConverter):
  """Shared input handling: optional features, front trimming, batching.

  Subclasses implement `_convert_batch` over a ragged batch of up to `window`
  examples whose items are non-empty, PAD-free and trimmed to the most recent L.
  """

  TASK_FEATURES = {"items": FeatureSpec(dtype=tf.int32)}
  # Subclasses set MODEL_FEATURES for a dataset without the optional features;
  # a call's actual specs come from `_model_features` (see __call__).
  MODEL_FEATURES: Mapping[str, FeatureSpec] = {}
  PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}  # segment_ids/positions are model features
  prefixes = False  # every prefix of a sequence as its own example (ItemSequencePackingConverter)

  def __init__(self, pack: bool, window: int, example_id_key: str):
    # Lengths hold by construction; seqio's per-example assertions would cost
    # more than the conversion itself.
    super().__init__(pack=pack, apply_length_check=False)
    self.window = int(window)
    self._example_id_key = example_id_key

  @property
  def example_id_key(self) -> str:
    return self._example_id_key

  def _model_features(self, with_critiques: bool, with_example_id: bool) -> dict[str, FeatureSpec]:
    raise NotImplementedError

  def _needs_example_id(self) -> bool:
    return False

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    """seqio's validated conversion, with specs fitted to the optional features."""
    if "items" not in task_feature_lengths:
      raise ValueError(f"{type(self).__name__} needs task_feature_lengths['items'], got {dict(task_feature_lengths)}")
    lengths = dict(task_feature_lengths)
    length = int(lengths["items"])
    spec = ds.element_spec
    with_critiques = "critiques" in spec
    if with_critiques:
      if lengths.setdefault("critiques", length) != length:
        raise ValueError(f"critiques are per item: their length must equal items' ({length}), "
                         f"got {lengths['critiques']}")
    else:
      lengths.pop("critiques", None)
    eid = self._example_id_key
    with_example_id = eid in spec
    if with_example_id and (spec[eid].shape.rank != 0 or not spec[eid].dtype.is_integer):
      raise ValueError(f"'{eid}' must be an integer scalar per example, got {spec[eid]}")
    if self._needs_example_id() and not with_example_id:
      raise ValueError(
          f"{type(self).__name__} seeds masking by '{eid}', which the dataset lacks (it has "
          f"{sorted(spec)}). Tasks must yield it; Mixtures drop non-output features, so load them "
          "with recjax.data.pipeline.get_dataset, which passes it through.")
    conv = copy.copy(self)  # per call: the optional features decide the specs seqio validates
    conv.TASK_FEATURES = dict(self.TASK_FEATURES, **({"critiques": FeatureSpec(tf.int32)} if with_critiques else {}))
    conv.MODEL_FEATURES = conv._model_features(with_critiques, with_example_id)
    return seqio.FeatureConverter.__call__(conv, ds, lengths)

  def _convert_features(self, ds, task_feature_lengths):
    length = task_feature_lengths["items"]
    spec = ds.element_spec
    keep = [k for k in ("items", "critiques", self._example_id_key, "epoch") if k in spec]
    if set(spec) - set(keep) or not all(isinstance(spec[k], tf.TensorSpec) for k in keep):
      # Drop unused features; sources sliced from a RaggedTensor yield ragged specs.
      dense = lambda x: x.to_tensor() if isinstance(x, tf.RaggedTensor) else x
      ds = ds.map(_plain(lambda ex: {k: dense(ex[k]) for k in keep}))
    # padded_batch is a native op (ragged_batch runs a per-example map); the
    # PAD it adds is dropped below like any stored padding.
    ds = ds.padded_batch(self.window)

    def prepare(batch):
      # Drop padding (padded_batch's, or stored by a source), keep the most
      # recent items, drop empty sequences.
      real = tf.not_equal(batch["items"], PAD_ID)
      out = {"items": tf.ragged.boolean_mask(batch["items"], real)[:, -length:]}
      if "critiques" in batch:
        out["critiques"] = tf.ragged.boolean_mask(batch["critiques"], real)[:, -length:]
      for k in (self._example_id_key, "epoch"):
        if k in batch:
          out[k] = tf.cast(batch[k], tf.int64)
      nonempty = out["items"].row_lengths() > 0
      out = {k: tf.ragged.boolean_mask(v, nonempty) for k, v in out.items()}
      return self._expand_prefixes(out, length) if self.prefixes else out

    convert = _plain(lambda batch: _static_rows(self._convert_batch(prepare(batch), length), length))
    return ds.map(convert, num_parallel_calls=_AUTOTUNE).unbatch()

  def _convert_batch(self, batch: dict[str, tf.Tensor], length: int) -> dict[str, tf.Tensor]:
    raise NotImplementedError

  def _expand_prefixes(self, batch, length):
    """Every prefix of 2..n items of each (trimmed) sequence as its own example, the id
    made unique as id * (L + 1) + prefix length; an example's epoch is its prefixes'."""
    items = batch["items"]
    n = items.row_lengths()
    k = tf.ragged.range(2, n + 1)  # prefix lengths per sequence
    row = tf.repeat(tf.range(tf.shape(n, out_type=tf.int64)[0]), k.row_lengths())
    k = k.flat_values
    starts = tf.gather(items.row_splits, row)
    idx = tf.ragged.range(starts, starts + k).flat_values
    out = {key: tf.RaggedTensor.from_row_lengths(tf.gather(batch[key].flat_values, idx), k)
           for key in ("items", "critiques") if key in batch}
    eid = self._example_id_key
    if eid in batch:
      out[eid] = tf.gather(batch[eid], row) * (length + 1) + k
    if "epoch" in batch:
      out["epoch"] = tf.gather(batch["epoch"], row)
    return out

  def get_model_feature_lengths(self, task_feature_lengths):
    length = task_feature_lengths["items"]
    return {k: (length if spec.rank else 1) for k, spec in self.MODEL_FEATURES.items()}


class ItemSequencePackingConverter(_ItemSequenceConverter):
  """Bert4Rec training: cloze-mask each example, then pack (or pad) to rows of L.

  Model features (all [L]; int32 except float32 weights):
    "inputs"       item ids with MASK_ID at masked positions
    "targets"      the original item ids
    "weights"      1.0 at masked positions (the loss positions), else 0
    "segment_ids"  1..k per row for its k examples, 0 = padding (pack=False: 0/1)
    "positions"    0-based within each segment
    "critiques"    per-item critique ids, when the task has them; never masked, so
                   the critique of a masked step stays visible as its own signal

  Masks are drawn per example before packing from a key that depends only on
  (seed, epoch, example_id): identical on re-runs and resumes, fresh each epoch.
  The epoch comes from an "epoch" feature if the examples have one, else from
  the converter (`with_epoch`, which recjax.data.pipeline calls per epoch).
  Example ids must be unique within a split (a task that cuts several windows
  from one user gives each its own id). Histories longer than L keep their most
  recent L items.

  `epoch_invariant_rows()` splits the work in two for `recjax.data.pipeline`: rows
  packed once, unmasked, and the masks of any epoch drawn on them in numpy from
  the same keys (the same masks per example, in a different row layout).
  """

  MODEL_FEATURES = {
      "inputs": FeatureSpec(tf.int32),
      "targets": FeatureSpec(tf.int32),
      "weights": FeatureSpec(tf.float32),
      "segment_ids": FeatureSpec(tf.int32),
      "positions": FeatureSpec(tf.int32),
  }

  def __init__(
      self,
      pack: bool = True,
      mask_prob: float = 0.15,
      last_item_prob: float = 0.1,
      seed: int = 0,
      epoch: int = 0,
      window: int = 1024,
      example_id_key: str = "example_id",
      prefixes: bool = False,
  ):
    """Args:
      pack: pack several examples per row; False pads one example per row.
      mask_prob: per-position masking probability.
      last_item_prob: fraction of examples with only the last item masked.
      prefixes: train on every prefix (2..n items) of each sequence as its own example
        (the protocol of SASRec-family repositories such as BSARec); with
        last_item_prob=1 each is the history + MASK layout of evaluation.
      seed: masking seed.
      epoch: the epoch whose masks to draw (see `with_epoch`).
      window: examples converted (and packed, first fit) together.
      example_id_key: the per-example id feature.
    """
    if not 0.0 < mask_prob <= 1.0:
      raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if not 0.0 <= last_item_prob <= 1.0:
      raise ValueError(f"last_item_prob must be in [0, 1], got {last_item_prob}")
    super().__init__(pack=pack, window=window, example_id_key=example_id_key)
    self.mask_prob = float(mask_prob)
    self.last_item_prob = float(last_item_prob)
    self.prefixes = bool(prefixes)
    self.seed = int(seed)
    self.epoch = int(epoch)
    self._rows_only = False

  def with_epoch(self, epoch: int) -> "ItemSequencePackingConverter":
    """A copy that draws the masks of `epoch`."""
    out = copy.copy(self)
    out.epoch = int(epoch)
    return out

  def __repr__(self):
    return (f"{type(self).__name__}{'[rows]' if self._rows_only else ''}(pack={self.pack}, mask_prob={self.mask_prob}, "
            f"last_item_prob={self.last_item_prob}, prefixes={self.prefixes}, seed={self.seed}, epoch={self.epoch})")

  def epoch_invariant_rows(self) -> tuple["ItemSequencePackingConverter", Callable]:
    """(rows converter, mask_rows): what recjax.data.pipeline needs to pack once.

    The rows converter packs unmasked rows: "targets", "segment_ids", "positions",
    "critiques" when present, and int64 per-token "example_ids" and
    "example_epochs" (an example's "epoch" feature, -1 without one).
    `mask_rows(rows, epoch)` turns any batch of them into this converter's model
    features for `epoch`.
    """
    rows = copy.copy(self)
    rows._rows_only = True
    return rows, self.mask_rows

  def mask_rows(self, rows: Mapping[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
    """Model features of unmasked rows (see `epoch_invariant_rows`) for `epoch`."""
    seg, pos, items = rows["segment_ids"], rows["positions"], rows["targets"]
    starts = (seg > 0) & (pos == 0)  # each segment's first token, in row-major order
    epochs = rows["example_epochs"][starts]
    epochs = np.where(epochs < 0, epoch, epochs)  # an example's own "epoch" feature wins, as in _convert_batch
    keys = np_example_keys(self.seed, epochs, rows["example_ids"][starts])
    masked = np_cloze_masks(seg, pos, keys, self.mask_prob, self.last_item_prob)
    out = {"inputs": np.where(masked, np.int32(MASK_ID), items), "targets": items,
           "weights": masked.astype(np.float32), "segment_ids": seg, "positions": pos}
    if "critiques" in rows:
      out["critiques"] = rows["critiques"]
    return out

  def _needs_example_id(self) -> bool:
    return True

  def _model_features(self, with_critiques, with_example_id):
    del with_example_id  # it seeds the masks; a packed row has no single example id
    if self._rows_only:
      out = {k: ItemSequencePackingConverter.MODEL_FEATURES[k] for k in ("targets", "segment_ids", "positions")}
      out["example_ids"] = FeatureSpec(tf.int64)
      out["example_epochs"] = FeatureSpec(tf.int64)
    else:
      out = dict(ItemSequencePackingConverter.MODEL_FEATURES)
    if with_critiques:
      out["critiques"] = FeatureSpec(tf.int32)
    return out

  def _convert_batch(self, batch, length):
    items = batch["items"]
    dense = lambda x: x.to_tensor(shape=[None, length])
    if self._rows_only:
      # Rows are ordered by epoch-0 keys; mask_rows draws each epoch's masks.
      keys = example_keys(self.seed, 0, batch[self._example_id_key])
      per_token = lambda v: dense(tf.RaggedTensor.from_row_lengths(
          tf.repeat(v, items.row_lengths()), items.row_lengths()))
      epochs = batch.get("epoch", tf.fill(tf.shape(keys), tf.constant(-1, tf.int64)))  # -1: mask_rows' epoch
      out = {"targets": dense(items), "example_ids": per_token(batch[self._example_id_key]),
             "example_epochs": per_token(epochs)}
    else:
      keys = example_keys(self.seed, batch.get("epoch", self.epoch), batch[self._example_id_key])
      masked = cloze_masks(items, keys, self.mask_prob, self.last_item_prob)
      out = {
          "inputs": dense(tf.ragged.map_flat_values(tf.where, masked, MASK_ID, items)),
          "targets": dense(items),
          "weights": dense(tf.ragged.map_flat_values(tf.cast, masked, tf.float32)),
      }
    if "critiques" in batch:
      out["critiques"] = dense(batch["critiques"])
    lens = tf.cast(items.row_lengths(), tf.int32)
    if self.pack:
      return pack_batch(out, lens, length, keys)
    out["segment_ids"] = tf.cast(tf.sequence_mask(lens, length), tf.int32)
    out["positions"] = tf.range(length) * out["segment_ids"]
    return out


class NextItemPackingConverter(_ItemSequenceConverter):
  """SASRec-style training: every position predicts the item that follows it.

  An example of n items becomes n - 1 input positions (items[:-1]) whose targets
  are items[1:], all weighted 1, packed (or padded) into rows of L; examples of
  one item have no target and are dropped. With causal attention every prefix of
  every sequence is a training example in one pass, which is what makes the
  cross-entropy SASRec strong (Klenitskiy & Vasilev 2023, "Turning dross into gold
  loss"). Deterministic: no masks, so no example ids or epochs are needed.

  Model features: as `ItemSequencePackingConverter` ("inputs", "targets",
  "weights", "segment_ids", "positions", and "critiques" of the input steps when
  the task has them). Evaluation uses `ItemSequenceEvalConverter`, whose history
  positions match these (item j of a sequence at position j).
  """

  MODEL_FEATURES = ItemSequencePackingConverter.MODEL_FEATURES
  def epoch_invariant_rows(self) -> tuple["NextItemPackingConverter", None]:
    """Same input order -> same rows: recjax.data.pipeline may pack one epoch and
    reshuffle its rows for the next ones instead of converting again."""
    return self, None

  def __init__(self, pack: bool = True, window: int = 1024, example_id_key: str = "example_id"):
    super().__init__(pack=pack, window=window, example_id_key=example_id_key)

  def __repr__(self):
    return f"{type(self).__name__}(pack={self.pack})"

  def _model_features(self, with_critiques, with_example_id):
    del with_example_id
    out = dict(self.MODEL_FEATURES)
    if with_critiques:
      out["critiques"] = FeatureSpec(tf.int32)
    return out

  def _convert_batch(self, batch, length):
    keep = batch["items"].row_lengths() > 1
    items = tf.ragged.boolean_mask(batch["items"], keep)
    dense = lambda x: x.to_tensor(shape=[None, length])
    inputs = items[:, :-1]
    out = {"inputs": dense(inputs), "targets": dense(items[:, 1:]),
           "weights": dense(tf.ragged.map_flat_values(tf.ones_like, inputs, dtype=tf.float32))}
    if "critiques" in batch:
      out["critiques"] = dense(tf.ragged.boolean_mask(batch["critiques"], keep)[:, :-1])
    lens = tf.cast(inputs.row_lengths(), tf.int32)
    if self.pack:
      # Example ids, when the task has them, only decide the order of the packed rows
      # (see pack_batch); without them rows stay in first-fit order.
      eid = batch.get(self._example_id_key)
      keys = None if eid is None else example_keys(0, 0, tf.boolean_mask(eid, keep))
      return pack_batch(out, lens, length, keys)
    out["segment_ids"] = tf.cast(tf.sequence_mask(lens, length), tf.int32)
    out["positions"] = tf.range(length) * out["segment_ids"]
    return out


class ItemSequenceEvalConverter(_ItemSequenceConverter):
  """Next-item eval: the last item is held out and a MASK follows the history.

  Model features:
    "inputs"         int32 [L]  most recent L-1 history items, MASK_ID, padding
    "segment_ids"    int32 [L]  1 on the history and the MASK, 0 on padding
    "positions"      int32 [L]  0-based, 0 on padding
    "target"         int32 []   the held-out item id
    "mask_position"  int32 []   index of the MASK in "inputs" (= kept history length)
    "critiques"      int32 [L]  when present: history critiques, and at the MASK the
                                critique given with the target step (as in training,
                                where a masked step keeps its critique)
    "example_id"     int64 []   passed through when present, to report per example

  Never packed: one example per row keeps per-user scoring simple.
  """

  MODEL_FEATURES = {
      "inputs": FeatureSpec(tf.int32),
      "segment_ids": FeatureSpec(tf.int32),
      "positions": FeatureSpec(tf.int32),
      "target": FeatureSpec(tf.int32, rank=0),
      "mask_position": FeatureSpec(tf.int32, rank=0),
  }

  def __init__(self, window: int = 1024, example_id_key: str = "example_id"):
    super().__init__(pack=False, window=window, example_id_key=example_id_key)

  def _model_features(self, with_critiques, with_example_id):
    out = dict(ItemSequenceEvalConverter.MODEL_FEATURES)
    if with_critiques:
      out["critiques"] = FeatureSpec(tf.int32)
    if with_example_id:
      out[self._example_id_key] = FeatureSpec(tf.int64, rank=0)
    return out

  def _convert_batch(self, batch, length):
    # The most recent L items are L-1 history items and the target.
    items = batch["items"].to_tensor(shape=[None, length])
    last = tf.cast(batch["items"].row_lengths(), tf.int32) - 1
    is_last = tf.equal(tf.range(length)[None, :], last[:, None])
    out = {
        "inputs": tf.where(is_last, MASK_ID, items),
        "segment_ids": tf.cast(tf.sequence_mask(last + 1, length), tf.int32),
        "target": tf.gather(items, last, batch_dims=1),
        "mask_position": last,
    }
    out["positions"] = tf.range(length) * out["segment_ids"]
    if "critiques" in batch:
      out["critiques"] = batch["critiques"].to_tensor(shape=[None, length])
    if self._example_id_key in batch:
      out[self._example_id_key] = batch[self._example_id_key]
    return out


class EncoderDecoderConverter(seqio.FeatureConverter):
  """Encoder-decoder rows (TIGER and Mender over semantic IDs), one example per row.

  Task features: "inputs" int32 [n] (oldest first), "targets" int32 [m]; optionally
  "target_item", "user_id" (scalars, passed through: evaluators read them).

  Model features:
    "encoder_input_tokens"   int32 [E]  the most recent inputs, cut at whole units of
                                        `input_unit` tokens (an item's semantic ID), then 0
    "decoder_target_tokens"  int32 [T]
    "decoder_input_tokens"   int32 [T]  targets shifted right after `start_token`
    "decoder_loss_weights"   float32 [T] 1 on target tokens, 0 on padding

  `user_buckets` > 0 makes the first encoder token a hashed user token,
  `user_token_start + hash(user_id) % user_buckets` (TIGER's user token). Deterministic, so
  `recjax.data.pipeline` converts one epoch and reshuffles its rows for the next ones.
  Not packed: histories are short (TIGER reads at most 20 items) and rows stay per user,
  which the evaluators need.
  """

  TASK_FEATURES = {"inputs": FeatureSpec(tf.int32), "targets": FeatureSpec(tf.int32)}
  MODEL_FEATURES = {
      "encoder_input_tokens": FeatureSpec(tf.int32),
      "decoder_target_tokens": FeatureSpec(tf.int32),
      "decoder_input_tokens": FeatureSpec(tf.int32),
      "decoder_loss_weights": FeatureSpec(tf.float32),
  }
  PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}
  PASSTHROUGH = {"target_item": FeatureSpec(tf.int32, rank=0), "user_id": FeatureSpec(tf.int32, rank=0)}

  def __init__(self, *, input_unit: int = 1, start_token: int = 0, user_buckets: int = 0,
               user_token_start: int = 0):
    if input_unit < 1:
      raise ValueError(f"input_unit must be >= 1, got {input_unit}")
    super().__init__(pack=False, apply_length_check=False)
    self.input_unit, self.start_token = int(input_unit), int(start_token)
    self.user_buckets, self.user_token_start = int(user_buckets), int(user_token_start)

  def __repr__(self):
    return (f"{type(self).__name__}(input_unit={self.input_unit}, user_buckets={self.user_buckets}, "
            f"user_token_start={self.user_token_start})")

  def epoch_invariant_rows(self) -> tuple["EncoderDecoderConverter", None]:
    return self, None

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    _require_lengths(self, task_feature_lengths, ("inputs", "targets"))
    lengths = {k: int(task_feature_lengths[k]) for k in ("inputs", "targets")}
    room = lengths["inputs"] - (1 if self.user_buckets else 0)
    if room < self.input_unit:
      raise ValueError(f"task_feature_lengths['inputs'] = {lengths['inputs']} holds no whole input of "
                       f"{self.input_unit} tokens")
    spec = ds.element_spec
    if self.user_buckets and "user_id" not in spec:
      raise ValueError(f"user_buckets = {self.user_buckets} needs a 'user_id' feature; the task has {sorted(spec)}")
    conv = copy.copy(self)  # per call: the passthrough features present decide the specs
    conv.MODEL_FEATURES = {**self.MODEL_FEATURES, **{k: v for k, v in self.PASSTHROUGH.items() if k in spec}}
    return seqio.FeatureConverter.__call__(conv, ds, lengths)

  def _convert_features(self, ds, task_feature_lengths):
    enc_len, dec_len = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    return ds.map(_plain(lambda ex: self._convert_row(ex, enc_len, dec_len)), num_parallel_calls=_AUTOTUNE)

  def _convert_row(self, ex, enc_len: int, dec_len: int) -> dict[str, tf.Tensor]:
    has_user = 1 if self.user_buckets else 0
    keep = (enc_len - has_user) // self.input_unit * self.input_unit
    inputs = tf.cast(_dense(ex["inputs"]), tf.int32)
    inputs = inputs[tf.maximum(tf.shape(inputs)[0] - keep, 0):]  # the most recent whole units
    if has_user:
      bucket = _user_hash(tf.cast(ex["user_id"], tf.uint64)) % tf.constant(self.user_buckets, tf.uint64)
      inputs = tf.concat([[self.user_token_start + tf.cast(bucket, tf.int32)], inputs], 0)
    targets = _pad_to(tf.cast(_dense(ex["targets"]), tf.int32), dec_len)
    out = {"encoder_input_tokens": tf.ensure_shape(_pad_to(inputs, enc_len), [enc_len]),
           "decoder_target_tokens": tf.ensure_shape(targets, [dec_len]),
           "decoder_input_tokens": tf.ensure_shape(tf.concat([[self.start_token], targets[:-1]], 0), [dec_len]),
           "decoder_loss_weights": tf.cast(targets > 0, tf.float32)}
    for k in self.PASSTHROUGH:
      if k in self.MODEL_FEATURES:
        out[k] = tf.cast(ex[k], tf.int32)
    return out

  def get_model_feature_lengths(self, task_feature_lengths):
    enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    out = {"encoder_input_tokens": enc, "decoder_target_tokens": dec, "decoder_input_tokens": dec,
           "decoder_loss_weights": dec}
    return {**out, **{k: 1 for k in self.PASSTHROUGH if k in self.MODEL_FEATURES}}


def _require_lengths(converter, task_feature_lengths, keys) -> None:
  missing = set(keys) - set(task_feature_lengths)
  if missing:
    raise ValueError(f"{type(converter).__name__} needs task_feature_lengths for {sorted(missing)}, got "
                     f"{dict(task_feature_lengths)}")


def _dense(x):
  return x.to_tensor() if isinstance(x, tf.RaggedTensor) else x


def _pad_to(x: tf.Tensor, n: int, value: int = 0) -> tf.Tensor:
  """x[:n], padded at the end to n."""
  x = x[:n]
  return tf.pad(x, [[0, n - tf.shape(x)[0]]], constant_values=value)


def user_bucket(user_ids: np.ndarray, buckets: int) -> np.ndarray:
  """The hashed user bucket `EncoderDecoderConverter` computes, in numpy."""
  return ((np.asarray(user_ids, np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 32)
          % np.uint64(buckets)).astype(np.int64)


def _user_hash(u: tf.Tensor) -> tf.Tensor:
  # TIGER's fixed multiplicative hash, as `user_bucket` computes it.
  return (u * tf.constant(2654435761, tf.uint64)) % tf.constant(2 ** 32, tf.uint64)


class PreferenceConverter(EncoderDecoderConverter):
  """`EncoderDecoderConverter` rows + the preference-conditioning features (Mender_Emb).

  Extra task features: "history" (item ids, oldest first), "preferences" (statement ids + 1,
  0 = none), "sign". Extra model features:
    "history"      int32 [max_items]        the most recent items, oldest first, then 0
    "preferences"  int32 [num_preferences]  statement ids, -1 = empty slot
    "sign"         float32 []               +1, or -1 for a negative preference
    "text"         int32 []                 the row's preference text (its "text_id"), when
                                            the task has one (Mender_Tok)
  """

  EXTRA = {"history": FeatureSpec(tf.int32), "preferences": FeatureSpec(tf.int32),
           "sign": FeatureSpec(tf.float32, rank=0)}

  def __init__(self, *, max_items: int, num_preferences: int, **kwargs):
    super().__init__(**kwargs)
    self.max_items, self.num_preferences = int(max_items), int(num_preferences)

  def __repr__(self):
    return f"{super().__repr__()[:-1]}, max_items={self.max_items}, num_preferences={self.num_preferences})"

  def __call__(self, ds, task_feature_lengths):
    missing = set(self.EXTRA) - set(ds.element_spec)
    if missing:
      raise ValueError(f"{type(self).__name__} needs the task features {sorted(missing)} (a preference task, "
                       f"e.g. DS_pref_sid_NAME_recommendation); the task has {sorted(ds.element_spec)}")
    conv = copy.copy(self)
    conv.MODEL_FEATURES = {**self.MODEL_FEATURES, **self.EXTRA}
    if "text_id" in ds.element_spec:  # the row's preference text (Mender_Tok)
      conv.MODEL_FEATURES["text"] = FeatureSpec(tf.int32, rank=0)
    return EncoderDecoderConverter.__call__(conv, ds, task_feature_lengths)

  def _convert_row(self, ex, enc_len: int, dec_len: int) -> dict[str, tf.Tensor]:
    out = super()._convert_row(ex, enc_len, dec_len)
    m, p = self.max_items, self.num_preferences
    h = tf.cast(_dense(ex["history"]), tf.int32)
    h = h[tf.maximum(tf.shape(h)[0] - m, 0):]  # the most recent items
    prefs = tf.cast(_dense(ex["preferences"]), tf.int32)
    prefs = (tf.boolean_mask(prefs, prefs > 0) - 1)[:p]
    out.update(history=tf.ensure_shape(_pad_to(h, m), [m]),
               preferences=tf.ensure_shape(_pad_to(prefs, p, -1), [p]), sign=tf.cast(ex["sign"], tf.float32))
    if "text" in self.MODEL_FEATURES:
      out["text"] = tf.cast(ex["text_id"], tf.int32)
    return out

  def get_model_feature_lengths(self, task_feature_lengths):
    out = super().get_model_feature_lengths(task_feature_lengths)
    out = {**out, "history": self.max_items, "preferences": self.num_preferences, "sign": 1}
    return {**out, "text": 1} if "text" in self.MODEL_FEATURES else out


# --- decoder-only (prefix-LM) rows of text tasks with item slots: LUMEN, FLARE + LLM ---------


MAX_ID_PREFIX = 8  # target tokens before the ID slot ("ID:") an evaluation prompt may carry


class PrefixLMConverter(seqio.FeatureConverter):
  """Decoder-only training rows of the REGEN text tasks (seqio's prefix-LM layout), packed.

  Task features: "inputs", "targets" (token ids, EOS last), and optionally
  "inputs_item_ids" / "targets_item_ids": the items of the `<item>` placeholder tokens
  (`placeholder_id`) of inputs / targets, in order. An example is the sequence
  x = inputs + targets; the prompt is cut from the front to `inputs` tokens (its oldest
  placeholders go with their items) and the targets to `targets` tokens (EOS kept last).

  Model features, each [L] with L = inputs + targets:
    "decoder_target_tokens"    x: slot t predicts x_t
    "decoder_input_tokens"     x shifted right within its example (0 first): slot t reads x_{t-1}
    "decoder_input_item_ids"   the item of x_{t-1} where it is a placeholder, else 0
    "decoder_target_item_ids"  the item of x_t where it is a target placeholder (the ID the
                               item softmax predicts), else 0
    "decoder_loss_weights"     float32: 1 on the other target tokens (the text softmax)
    "decoder_segment_ids"      1..k along a packed row (1 unpacked), 0 on padding
    "decoder_positions"        0-based per example

  Soft prompts ("Beyond Retrieval", `soft_tokens` S > 0): the newest k = min(S, len(history))
  interactions of the example's window come first, as k slots of token 0 whose inputs are
  soft vectors; "decoder_input_soft_items" / "_soft_users" / "_soft_positions" give the item,
  the user and the interaction's position in the user's sequence of each (0 elsewhere;
  needs the task's "history", "user_id" and "position"), and rows are S tokens longer.

  Packing is first fit decreasing over windows of `window` examples (`pack_examples`);
  unpacked, each example is right-padded to L. A placeholder count that differs from its
  item ids is an error naming the counts. Deterministic: the pipeline may pack a Task's
  epoch once and reshuffle its rows.
  """

  TASK_FEATURES = {"inputs": FeatureSpec(tf.int32), "targets": FeatureSpec(tf.int32)}
  MODEL_FEATURES = {
      "decoder_target_tokens": FeatureSpec(tf.int32),
      "decoder_input_tokens": FeatureSpec(tf.int32),
      "decoder_input_item_ids": FeatureSpec(tf.int32),
      "decoder_target_item_ids": FeatureSpec(tf.int32),
      "decoder_loss_weights": FeatureSpec(tf.float32),
      "decoder_segment_ids": FeatureSpec(tf.int32),
      "decoder_positions": FeatureSpec(tf.int32),
  }
  PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}

  SOFT = ("soft_items", "soft_users", "soft_positions")
  SOFT_NEEDS = ("history", "user_id", "position")

  def __init__(self, *, placeholder_id: int, pack: bool = True, window: int = 1024, soft_tokens: int = 0):
    super().__init__(pack=pack, apply_length_check=False)
    self.placeholder_id, self.window, self.soft_tokens = int(placeholder_id), int(window), int(soft_tokens)
    # This converter's features without passthrough ones (each call adds those its data has).
    self.MODEL_FEATURES = self._model_features({})

  def __repr__(self):
    return (f"{type(self).__name__}(placeholder_id={self.placeholder_id}, pack={self.pack}, "
            f"soft_tokens={self.soft_tokens})")

  def epoch_invariant_rows(self) -> tuple["PrefixLMConverter", None]:
    return self, None

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    _require_lengths(self, task_feature_lengths, ("inputs", "targets"))
    missing = [k for k in self.SOFT_NEEDS if k not in ds.element_spec] if self.soft_tokens else []
    if missing:
      raise ValueError(f"{type(self).__name__}: soft_tokens = {self.soft_tokens} needs the features "
                       f"{list(self.SOFT_NEEDS)}; the dataset lacks {missing}")
    conv = copy.copy(self)  # per call: the passthrough features present decide the specs
    conv.MODEL_FEATURES = conv._model_features(ds.element_spec)
    lengths = {k: int(task_feature_lengths[k]) for k in ("inputs", "targets")}
    return seqio.FeatureConverter.__call__(conv, ds, lengths)

  def _model_features(self, spec) -> dict[str, FeatureSpec]:
    del spec
    soft = {f"decoder_input_{k}": FeatureSpec(tf.int32) for k in self.SOFT} if self.soft_tokens else {}
    return {**PrefixLMConverter.MODEL_FEATURES, **soft}

  def _sequence(self, ex, inputs_length: int, targets_length: int) -> dict[str, tf.Tensor]:
    """One example's unshifted sequence: tokens, items (at placeholders), prompt length."""
    ph = self.placeholder_id
    inputs, targets = tf.cast(_dense(ex["inputs"]), tf.int32), tf.cast(_dense(ex["targets"]), tf.int32)
    in_items = tf.cast(_dense(ex["inputs_item_ids"]), tf.int32) if "inputs_item_ids" in ex else tf.zeros([0], tf.int32)
    tg_items = tf.cast(_dense(ex["targets_item_ids"]), tf.int32) if "targets_item_ids" in ex else tf.zeros([0], tf.int32)
    cut = tf.maximum(tf.shape(inputs)[0] - inputs_length, 0)
    gone = tf.reduce_sum(tf.cast(tf.equal(inputs[:cut], ph), tf.int32))  # their items go too
    inputs, in_items = inputs[cut:], in_items[gone:]
    n_t = tf.shape(targets)[0]
    targets = tf.cond(n_t > targets_length, lambda: tf.concat([targets[:targets_length - 1], targets[-1:]], 0),
                      lambda: targets)
    tokens = tf.concat([inputs, targets], 0)
    ids = tf.concat([in_items, tg_items], 0)
    slots = tf.cast(tf.where(tf.equal(tokens, ph)), tf.int32)
    check = tf.debugging.assert_equal(
        tf.shape(slots)[0], tf.shape(ids)[0],
        message=f"{type(self).__name__}: the number of item placeholder tokens (id {ph}) of an example's "
                "kept inputs + targets differs from its inputs_item_ids + targets_item_ids")
    with tf.control_dependencies([check]):
      items = tf.scatter_nd(slots, ids, tf.shape(tokens))
    out = {"tokens": tokens, "items": items, "prompt": tf.shape(inputs)[0]}
    if self.soft_tokens:
      history = tf.cast(_dense(ex["history"]), tf.int32)
      k = tf.minimum(tf.size(history), self.soft_tokens)
      n = tf.shape(tokens)[0]
      pad = lambda x: tf.concat([x, tf.zeros([n], tf.int32)], 0)
      position = tf.cast(ex["position"], tf.int32)
      out = {"tokens": tf.concat([tf.zeros([k], tf.int32), tokens], 0),
             "items": tf.concat([tf.zeros([k], tf.int32), items], 0), "prompt": out["prompt"] + k,
             "soft_items": pad(history[tf.size(history) - k:]),
             "soft_users": pad(tf.fill([k], tf.cast(ex["user_id"], tf.int32))),
             "soft_positions": pad(position - k + tf.range(k))}
    return out

  def _convert_features(self, ds, task_feature_lengths):
    il, tl = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    length = self.soft_tokens + il + tl

    def row(ex):
      s = self._sequence(ex, il, tl)
      tokens, items = s["tokens"], s["items"]
      in_target = tf.range(tf.shape(tokens)[0]) >= s["prompt"]
      shift = lambda x: tf.concat([[0], x[:-1]], 0)
      out = {"decoder_target_tokens": tokens, "decoder_input_tokens": shift(tokens),
             "decoder_input_item_ids": shift(items),
             "decoder_target_item_ids": tf.where(in_target, items, 0),
             "decoder_loss_weights": tf.cast(in_target & tf.equal(items, 0), tf.float32)}
      for k in self.SOFT if self.soft_tokens else ():
        out[f"decoder_input_{k}"] = shift(s[k])
      return out

    ds = ds.map(_plain(row), num_parallel_calls=_AUTOTUNE)
    if self.pack:
      # Rows in an order drawn from their examples' content, not longest first (a batch of
      # consecutive rows then has no length profile), the same on every run.
      def keyed(ex):
        text = tf.strings.reduce_join(tf.strings.as_string(ex["decoder_target_tokens"]), separator=",")
        return {**ex, "_key": example_keys(0, 0, tf.strings.to_hash_bucket_fast(text, 2**62))}

      rename = {"segment_ids": "decoder_segment_ids", "positions": "decoder_positions"}
      ds = pack_examples(ds.map(_plain(keyed)), length, self.window, order_key="_key")
      return ds.map(_plain(lambda r: {rename.get(k, k): v for k, v in r.items()}))

    def pad(ex):
      n = tf.shape(ex["decoder_target_tokens"])[0]
      out = {k: tf.ensure_shape(_pad_to(v, length), [length]) for k, v in ex.items()}
      out["decoder_segment_ids"] = tf.cast(tf.range(length) < n, tf.int32)
      out["decoder_positions"] = tf.range(length) * out["decoder_segment_ids"]
      return out

    return ds.map(_plain(pad), num_parallel_calls=_AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    length = self.soft_tokens + task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    return {k: (length if spec.rank else 1) for k, spec in self.MODEL_FEATURES.items()}


class PrefixLMEvalConverter(PrefixLMConverter):
  """Evaluation / generation rows of the same tasks: one example per row, the prompt
  left-padded so that every row continues at the same slot.

  The prompt is 0 (the first slot's input, as in training), the kept inputs, and the
  target tokens before its item placeholder, if it has one ("ID:" of a LUMEN target; at
  most MAX_ID_PREFIX tokens). Model features:
    "prompt_tokens", "prompt_item_ids", "prompt_mask"  [1 + inputs + MAX_ID_PREFIX]
    "item_target"  int32 []  the target's item (0: the target names none)
    "user_id" and "targets_pretokenized" (the reference text) pass through when present.
  """

  PASSTHROUGH = {"user_id": FeatureSpec(tf.int32, rank=0), "targets_pretokenized": FeatureSpec(tf.string, rank=0)}
  # Without the passthrough features (each call adds those its dataset has).
  MODEL_FEATURES = {"prompt_tokens": FeatureSpec(tf.int32), "prompt_item_ids": FeatureSpec(tf.int32),
                    "prompt_mask": FeatureSpec(tf.int32), "item_target": FeatureSpec(tf.int32, rank=0)}

  def __init__(self, *, placeholder_id: int, soft_tokens: int = 0):
    super().__init__(placeholder_id=placeholder_id, pack=False, soft_tokens=soft_tokens)

  def epoch_invariant_rows(self):
    raise NotImplementedError("evaluation rows are not trained on")

  def _model_features(self, spec) -> dict[str, FeatureSpec]:
    out = dict(PrefixLMEvalConverter.MODEL_FEATURES)
    if self.soft_tokens:
      out.update({f"prompt_{k}": FeatureSpec(tf.int32) for k in self.SOFT})
    return {**out, **{k: v for k, v in self.PASSTHROUGH.items() if k in spec}}

  def _convert_features(self, ds, task_feature_lengths):
    il, tl = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    width = 1 + self.soft_tokens + il + MAX_ID_PREFIX
    ph = self.placeholder_id

    def row(ex):
      s = self._sequence(ex, il, tl)
      tokens, items, prompt = s["tokens"], s["items"], s["prompt"]
      in_target = tf.where(tf.equal(tokens[prompt:], ph))[:, 0]
      has_item = tf.size(in_target) > 0
      stop = prompt + tf.cond(has_item, lambda: tf.cast(in_target[0], tf.int32), lambda: 0)
      check = tf.debugging.assert_less_equal(
          stop - prompt, MAX_ID_PREFIX, message=f"the target's item placeholder comes after more than "
                                                f"{MAX_ID_PREFIX} tokens (MAX_ID_PREFIX)")
      with tf.control_dependencies([check]):
        keep_tokens = tf.concat([[0], tokens[:stop]], 0)
      keep_items = tf.concat([[0], items[:stop]], 0)
      pad = lambda x: tf.ensure_shape(tf.pad(x, [[width - tf.shape(x)[0], 0]]), [width])  # left
      out = {"prompt_tokens": pad(keep_tokens), "prompt_item_ids": pad(keep_items),
             "prompt_mask": pad(tf.ones_like(keep_tokens)),
             "item_target": tf.where(has_item, items[stop], 0)}
      for k in self.SOFT if self.soft_tokens else ():
        out[f"prompt_{k}"] = pad(tf.concat([[0], s[k][:stop]], 0))
      for k in self.PASSTHROUGH:
        if k in ex:
          out[k] = tf.cast(ex[k], self.PASSTHROUGH[k].dtype)
      return out

    return ds.map(_plain(row), num_parallel_calls=_AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    width = 1 + self.soft_tokens + task_feature_lengths["inputs"] + MAX_ID_PREFIX
    return {k: (width if spec.rank else 1) for k, spec in self.MODEL_FEATURES.items()}


class TextEvalConverter(seqio.FeatureConverter):
  """Text-to-text evaluation rows (ReAT), one example per row, never packed.

  Model features: seqio's unpacked `EncDecFeatureConverter` ones ("encoder_input_tokens",
  "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"; prompts keep
  their beginning and targets end with EOS, since the preprocessors fit both to the
  task_feature_lengths they are given), plus what the evaluator reads: "target_item" (the
  task's "target", 0 if none) and "candidates" int32 [num_candidates] (a ranking task's
  candidate items, 0-padded; zeros for tasks without candidates).
  """

  TASK_FEATURES = {"inputs": FeatureSpec(tf.int32), "targets": FeatureSpec(tf.int32)}
  MODEL_FEATURES = {
      "encoder_input_tokens": FeatureSpec(tf.int32),
      "decoder_target_tokens": FeatureSpec(tf.int32),
      "decoder_input_tokens": FeatureSpec(tf.int32),
      "decoder_loss_weights": FeatureSpec(tf.int32),
      "target_item": FeatureSpec(tf.int32, rank=0),
      "candidates": FeatureSpec(tf.int32),
  }
  PACKING_FEATURE_DTYPES: Mapping[str, tf.dtypes.DType] = {}

  def __init__(self, num_candidates: int):
    super().__init__(pack=False, apply_length_check=False)
    self.num_candidates = int(num_candidates)

  def __repr__(self):
    return f"{type(self).__name__}(num_candidates={self.num_candidates})"

  def _convert_features(self, ds, task_feature_lengths):
    enc_len, dec_len = task_feature_lengths["inputs"], task_feature_lengths["targets"]

    def convert(ex):
      targets = _pad_to(tf.cast(_dense(ex["targets"]), tf.int32), dec_len)
      candidates = ex["candidates"] if "candidates" in ex else tf.zeros([0], tf.int32)
      return {"encoder_input_tokens": tf.ensure_shape(_pad_to(tf.cast(_dense(ex["inputs"]), tf.int32), enc_len),
                                                      [enc_len]),
              "decoder_target_tokens": tf.ensure_shape(targets, [dec_len]),
              "decoder_input_tokens": tf.ensure_shape(tf.concat([[0], targets[:-1]], 0), [dec_len]),
              "decoder_loss_weights": tf.cast(targets > 0, tf.int32),
              "target_item": tf.cast(ex["target"], tf.int32) if "target" in ex else tf.constant(0, tf.int32),
              "candidates": tf.ensure_shape(_pad_to(tf.cast(candidates, tf.int32), self.num_candidates),
                                            [self.num_candidates])}

    return ds.map(_plain(convert), num_parallel_calls=_AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    return {"encoder_input_tokens": enc, "decoder_target_tokens": dec, "decoder_input_tokens": dec,
            "decoder_loss_weights": dec, "target_item": 1, "candidates": self.num_candidates}
