"""Full-catalog ranking evaluation: chunked target ranks, top-k and metrics.

Protocol (the S3-Rec / RecBole "full sort" one, see ../shared/data/README.md):
every query is ranked against ALL real items, never a sample of negatives. Item
ids follow the prepared-dataset convention: 0 = PAD, 1 = MASK, real items are
2 .. vocab_size - 1; PAD and MASK are never scored, ranked or recommended.

  score(b, v) = <query[b], item_table[v]> (+ bias[v]), computed in float32
  rank(b)     = #{valid v != target[b] : score(b, v) >= score(b, target[b])}
                (0-based, ties broken pessimistically: a tie counts as a loss)

The catalog is scored in chunks inside a `lax.fori_loop`, so the peak
intermediate is [batch, chunk] and `batch x |items|` never materialises. Chunk
j holds the strided items {j, j + n, j + 2n, ...} of a free [C, n, D] view of
the table: with the table sharded over its item axis, every device then works
on its own rows of every chunk (plain jnp ops; jit/GSPMD partitions them).
The view needs some n in [V / chunk_size, 2 V / chunk_size] to divide the row
count V; otherwise chunk rows are gathered (fine on one device; see
`chunk_layout` for sharded tables). The table is never copied.

History exclusion (`exclude`): the ids in exclude[b] are dropped from query b's
candidates, as S3-Rec and RecBole do for already-seen items. The target is
never excluded, even when it appears in the history (a repeat purchase): the
rank always answers "where does the true next item land", and dropping it
would turn a correct prediction into an undefined one.

Exact ties need the target's score exactly as the catalog matmul computes it
(a per-row dot product rounds differently); see `_count_ge` for how.

Metrics: Recall@K (= HR@K with one target per query), NDCG@K =
1 / log2(rank + 2) for rank < K, and full (untruncated) MRR, averaged over valid
examples. Report `ranking_protocol(...)` next to every number.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

# PAD (0) and MASK (1). Mirrors recjax.data.vocab.NUM_RESERVED, defined here
# because importing that module pulls in TensorFlow, which evaluation must not.
NUM_RESERVED = 2

DEFAULT_CHUNK_SIZE = 8192

# float32 scores, whatever the storage dtype: HIGHEST keeps f32 matmuls exact
# f32 on TPU (DEFAULT is one bf16 pass) and on GPU (no TF32).
_PRECISION = lax.Precision.HIGHEST
_LOWEST = float(np.finfo(np.float32).min)
_INT_MAX = int(np.iinfo(np.int32).max)


# --- catalog layout ----------------------------------------------------------


def chunk_layout(num_rows: int, chunk_size: int) -> tuple[int, int]:
  """Returns (num_chunks n, chunk rows C): n * C >= num_rows, C <= chunk_size.

  Chunk j holds rows {j, j + n, j + 2n, ...}. If n divides num_rows (searched
  for in [ceil(V / chunk_size), 2 ceil(V / chunk_size)]) the chunks are slices
  of a free [C, n, D] view of the table, which keeps an item-sharded table's
  rows on their devices; otherwise each chunk's rows are gathered (no copy of
  the table either, but GSPMD then all-reduces every chunk across the item
  shards). Sharded tables should therefore have a row count that some n
  divides, e.g. a multiple of chunk_size (pass the real `vocab_size`).
  """
  if num_rows < 1 or chunk_size < 1:
    raise ValueError(f"need num_rows >= 1 and chunk_size >= 1, got {num_rows}, {chunk_size}")
  n0 = -(-num_rows // chunk_size)
  for n in range(n0, min(2 * n0, num_rows) + 1):
    if num_rows % n == 0:
      return n, num_rows // n
  return n0, -(-num_rows // n0)


def _operand_dtype(x: jax.Array, y: jax.Array):
  # 16-bit floats stay 16-bit: their products are exact in f32 and the matmul
  # accumulates in f32. Anything else is cast to f32.
  dtype = jnp.promote_types(x.dtype, y.dtype)
  return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _dot_f32(x: jax.Array, y: jax.Array) -> jax.Array:
  """x [B, D] . y [N, D]^T -> [B, N] float32."""
  dtype = _operand_dtype(x, y)
  return lax.dot_general(
      x.astype(dtype), y.astype(dtype), (((1,), (1,)), ((), ())),
      precision=_PRECISION, preferred_element_type=jnp.float32)


def _sanitize(s: jax.Array) -> jax.Array:
  # NaN -> -inf: a model emitting NaN ranks its target last (never first), and
  # -0.0 -> 0.0 so sorting (total order) agrees with `==` on ties.
  s = jnp.where(jnp.isnan(s), -jnp.inf, s)
  return jnp.where(s == 0, 0.0, s)


class _Catalog:
  """The chunked view of (item_table, bias) and per-chunk scoring."""

  def __init__(self, query, item_table, bias, chunk_size, vocab_size):
    if query.ndim != 2 or item_table.ndim != 2 or query.shape[1] != item_table.shape[1]:
      raise ValueError(f"need query [B, D] and item_table [V, D], got {query.shape} and "
                       f"{item_table.shape}")
    rows = item_table.shape[0]
    self.vocab_size = rows if vocab_size is None else int(vocab_size)
    if not NUM_RESERVED < self.vocab_size <= rows:
      raise ValueError(f"vocab_size {self.vocab_size} must be in ({NUM_RESERVED}, {rows}]")
    if bias is not None and bias.shape != (rows,):
      raise ValueError(f"bias must have shape ({rows},), got {bias.shape}")
    self.n, self.c = chunk_layout(rows, chunk_size)
    self.view = self.n * self.c == rows
    self.query = query
    self.table_rows, self.bias_rows = item_table, bias
    self.table = self._layout(item_table)
    self.bias = None if bias is None else self._layout(bias)

  def _layout(self, x):
    return x.reshape((self.c, self.n) + x.shape[1:]) if self.view else x

  def _chunk(self, x, j):
    """Rows {i * n + j} of the table / bias (zeros past the end)."""
    if self.view:
      return lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)
    ids = jnp.arange(self.c, dtype=jnp.int32) * self.n + j
    return jnp.take(x, ids, axis=0, mode="fill", fill_value=0)

  def ids(self, j):
    """Item ids of chunk j [C] and whether each is a real, rankable item."""
    ids = jnp.arange(self.c, dtype=jnp.int32) * self.n + j
    return ids, (ids >= NUM_RESERVED) & (ids < self.vocab_size)

  def scores(self, j, rows=None, use_rows=False) -> jax.Array:
    """Sanitized float32 scores [B, C] of chunk j, or of `rows` if `use_rows`.

    `rows` = ([C, D] embeddings, [C] bias or None) go through the very same
    dot as the chunks (selected, not a second dot), so they round alike.
    """
    emb = self._chunk(self.table, j)
    if rows is not None:
      emb = jnp.where(use_rows, rows[0].astype(emb.dtype), emb)
    s = _dot_f32(self.query, emb)
    if self.bias is not None:
      b = self._chunk(self.bias, j)
      if rows is not None:
        b = jnp.where(use_rows, rows[1].astype(b.dtype), b)
      s = s + b.astype(jnp.float32)[None, :]
    return _sanitize(s)

  def exclusion(self, exclude, keep=None):
    """Per-chunk [B, C] mask of the `exclude` [B, H] ids, except ids `keep` [B]."""
    if exclude is None:
      return lambda j: None
    exclude = jnp.asarray(exclude, jnp.int32)
    if exclude.ndim != 2 or exclude.shape[0] != self.query.shape[0]:
      raise ValueError(f"exclude must be [B, H] with B = {self.query.shape[0]}, "
                       f"got {exclude.shape}")
    ok = (exclude >= NUM_RESERVED) & (exclude < self.vocab_size)
    if keep is not None:
      ok &= exclude != keep[:, None]
    chunk, pos = exclude % self.n, exclude // self.n
    rows = jnp.arange(exclude.shape[0])[:, None]
    b, c = exclude.shape[0], self.c

    def mask(j):
      # A scatter of B x H entries: cheaper than comparing [B, C, H].
      p = jnp.where(ok & (chunk == j), pos, c)  # c is out of bounds: dropped.
      return jnp.zeros((b, c), bool).at[rows, p].set(True, mode="drop")

    return mask


def history_exclusion(history: jax.Array, targets: jax.Array) -> jax.Array:
  """`history` [B, H] with entries equal to the target set to PAD (0).

  Pass the result as `top_k(..., exclude=...)` to get the candidates that
  `target_ranks(..., exclude=history)` ranks the target among.
  """
  history = jnp.asarray(history, jnp.int32)
  return jnp.where(history == jnp.asarray(targets, jnp.int32)[:, None], 0, history)


def _auto_sharded(fn, args, num_outputs):
  """`fn(*args)` with any Explicit mesh axes of the query (args[0]) made Auto.

  Under explicit sharding every op must have an unambiguous output sharding,
  which the chunk loop's gathers, scatters and top-k over the item axis do not;
  in Auto mode GSPMD partitions them. Outputs keep `query`'s batch sharding.
  """
  sharding = jax.typeof(args[0]).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.explicit_axes:
    return fn(*args)
  batch = sharding.spec[0] if len(sharding.spec) else None
  out = [NamedSharding(mesh, P(batch, *[None] * (ndim - 1))) for ndim in num_outputs]
  return jax.sharding.auto_axes(fn, out_sharding=out[0] if len(out) == 1 else tuple(out))(*args)


# --- ranks -----------------------------------------------------------------


def _count_ge(cat, targets, excluded, threshold=None):
  """Per query: #{valid, non-excluded v != target : score(v) >= threshold}.

  The threshold must be the target's score exactly as the chunk matmul computes
  it: a per-row dot product or a differently shaped GEMM rounds differently
  (on CPU, 'bd,bd->b' differs in the last bit for most rows), which would break
  exact ties, e.g. with duplicate items. So by default the loop first runs
  ceil(B / C) extra steps whose "chunk" is the targets' own rows, through the
  same dot instruction, and reads the target scores off the diagonal.

  Returns (counts, threshold used, target scores as found in the catalog).
  """
  b, c = targets.shape[0], cat.c
  m = 0 if threshold is not None else -(-b // c)
  if m:
    pad = m * c - b
    rows = jnp.pad(jnp.take(cat.table_rows, targets, axis=0), ((0, pad), (0, 0)))
    rows = rows.reshape(m, c, rows.shape[1])
    rows_bias = None
    if cat.bias is not None:
      rows_bias = jnp.pad(jnp.take(cat.bias_rows, targets), (0, pad)).reshape(m, c)
    threshold = jnp.full((b,), -jnp.inf, jnp.float32)
  col = jnp.arange(b, dtype=jnp.int32)

  def body(step, carry):
    n_ge, thr, found = carry
    j = jnp.maximum(step - m, 0)  # Catalog chunk (steps < m: target rows).
    if m:
      i = jnp.minimum(step, m - 1)
      s = cat.scores(j, rows=(rows[i], None if rows_bias is None else rows_bias[i]),
                     use_rows=step < m)
      own = col - i * c
      mine = (step < m) & (own >= 0) & (own < c)
      thr = jnp.where(mine, jnp.take_along_axis(s, jnp.clip(own, 0, c - 1)[:, None], 1)[:, 0],
                      thr)
    else:
      s = cat.scores(j)
    _, valid = cat.ids(j)
    counted_ok = valid[None, :]
    ex = excluded(j)
    if ex is not None:
      counted_ok = counted_ok & ~ex
    counted = jnp.sum(counted_ok & (s >= thr[:, None]), axis=1, dtype=jnp.int32)
    # The target (valid, never excluded) was counted iff its own score >= thr;
    # take it back out via a B-element gather rather than a [B, C] compare.
    in_chunk = (step >= m) & (targets % cat.n == j)
    own_score = jnp.take_along_axis(s, (targets // cat.n)[:, None], axis=1)[:, 0]
    counted -= (in_chunk & (own_score >= thr)).astype(jnp.int32)
    n_ge += jnp.where(step >= m, counted, 0)
    found = jnp.where(in_chunk, own_score, found)
    return n_ge, thr, found

  init = (jnp.zeros((b,), jnp.int32), threshold, jnp.full((b,), -jnp.inf, jnp.float32))
  return lax.fori_loop(0, cat.n + m, body, init)


@functools.partial(jax.jit, static_argnames=("chunk_size", "vocab_size"))
def target_ranks(query: jax.Array,
                 item_table: jax.Array,
                 targets: jax.Array,
                 bias: jax.Array | None = None,
                 *,
                 exclude: jax.Array | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 vocab_size: int | None = None) -> jax.Array:
  """Pessimistic 0-based rank of each target among all valid items.

  Args:
    query: [B, D] query vectors (any float dtype).
    item_table: [V, D] item embeddings; rows 0 and 1 (PAD, MASK) are ignored.
    targets: int [B] target item ids. A target that is not a real item
      (PAD padding a final batch, MASK, >= vocab_size) gets rank -1, which
      `metrics_from_ranks` treats as "no example".
    bias: optional [V] per-item score bias.
    exclude: optional int [B, H] item ids (0-padded) to drop from query b's
      candidates, e.g. the user's history; the target itself is never dropped.
    chunk_size: max items scored per loop step; peak memory ~ B x chunk_size.
    vocab_size: number of leading table rows that are items (default: all
      rows); rows beyond it are padding, e.g. to make chunks divide the table.

  Returns:
    int32 [B]: #{valid, non-excluded v != target : score(v) >= score(target)}.
  """
  def run(query, item_table, targets, bias, exclude):
    cat = _Catalog(query, item_table, bias, chunk_size, vocab_size)
    real = (targets >= NUM_RESERVED) & (targets < cat.vocab_size)
    safe = jnp.where(real, targets, NUM_RESERVED)
    excluded = cat.exclusion(exclude, keep=safe)
    ranks, threshold, actual = _count_ge(cat, safe, excluded)
    # Safety net: if the target scores did not come out bit-identical to the
    # ones the catalog chunks give the targets (they do with any sane GEMM, as
    # both come from one dot instruction), recount against the latter.
    ranks = lax.cond(jnp.any(real & (actual != threshold)),
                     lambda: _count_ge(cat, safe, excluded, actual)[0],
                     lambda: ranks)
    return jnp.where(real, ranks, -1)

  args = (query, item_table, jnp.asarray(targets, jnp.int32), bias, exclude)
  return _auto_sharded(run, args, (1,))


# --- top-k -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "vocab_size"))
def top_k(query: jax.Array,
          item_table: jax.Array,
          bias: jax.Array | None = None,
          *,
          k: int,
          exclude: jax.Array | None = None,
          chunk_size: int = DEFAULT_CHUNK_SIZE,
          vocab_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The k best valid items per query, best first; ties go to the lower id.

  A running top-k is merged with each chunk's top-k, so memory stays
  ~ B x (chunk_size + k). PAD, MASK, ids >= vocab_size and `exclude`d ids are
  never returned (all listed ids are excluded; use `history_exclusion` to
  keep targets). Scores are float32 with NaN read as -inf and -inf clamped to
  the lowest finite float32 (so that real items outrank empty slots).

  Sharding: XLA's SPMD partitioner does not split TopK, so with the table
  sharded over items each chunk's [B, C] scores are all-gathered per step.
  `target_ranks` (counts only) has no such cost; use it for metrics.

  Returns:
    (scores float32 [B, k], ids int32 [B, k]); slots beyond the number of
    candidates hold score -inf and id -1.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")

  def run(query, item_table, bias, exclude):
    cat = _Catalog(query, item_table, bias, chunk_size, vocab_size)
    excluded = cat.exclusion(exclude)
    b = query.shape[0]

    def body(j, carry):
      best_s, best_id = carry
      _, valid = cat.ids(j)
      ok = jnp.broadcast_to(valid[None, :], (b, cat.c))
      ex = excluded(j)
      if ex is not None:
        ok &= ~ex
      s = jnp.where(ok, jnp.maximum(cat.scores(j), _LOWEST), -jnp.inf)
      s, pos = lax.top_k(s, min(k, cat.c))  # Ties: lower index (= id) first.
      cid = jnp.where(s > -jnp.inf, pos * cat.n + j, _INT_MAX)
      # Merge by (score desc, id asc): chunks are strided, so "running first"
      # would not mean "lower id first".
      neg, ids_all = lax.sort((-jnp.concatenate([best_s, s], 1),
                               jnp.concatenate([best_id, cid], 1)), num_keys=2)
      return -neg[:, :k], ids_all[:, :k]

    # Derived from `query` so that GSPMD keeps the carry batch-sharded.
    zero = jnp.zeros_like(query[:, :1], jnp.float32)
    init = (jnp.full((b, k), -jnp.inf) + zero,
            jnp.full((b, k), _INT_MAX, jnp.int32) + zero.astype(jnp.int32))
    scores, ids = lax.fori_loop(0, cat.n, body, init)
    return scores, jnp.where(ids == _INT_MAX, -1, ids)

  return _auto_sharded(run, (query, item_table, bias, exclude), (2, 2))


# --- metrics ---------------------------------------------------------------


def _metric_names(ks: Sequence[int]) -> list[str]:
  return ([f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"])


@functools.partial(jax.jit, static_argnames=("ks",))
def _metric_sums(ranks, valid, ks):
  """[len(names) + 1] float32: per-metric sums over valid examples, then count."""
  ranks = jnp.asarray(ranks)
  ok = ranks >= 0
  if valid is not None:
    ok &= jnp.asarray(valid, bool)
  r = jnp.where(ok, ranks, 0).astype(jnp.float32)
  w = ok.astype(jnp.float32)
  gain = 1.0 / jnp.log2(r + 2.0)
  cols = ([jnp.sum(w * (r < k)) for k in ks] + [jnp.sum(w * (r < k) * gain) for k in ks]
          + [jnp.sum(w / (r + 1.0)), jnp.sum(w)])
  return jnp.stack(cols)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive cutoffs, got {ks}")
  return ks


def metrics_from_ranks(ranks: jax.Array,
                       ks: Sequence[int] = (1, 5, 10, 20),
                       valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Recall@K, NDCG@K, MRR (means over valid examples) and `count`.

  An example counts if its rank is >= 0 (see `target_ranks`) and `valid` (if
  given) is true. Values are device scalars (jit-friendly); with no valid
  example the means are 0.
  """
  ks = _check_ks(ks)
  sums = _metric_sums(ranks, valid, ks)
  count = sums[-1]
  out = {name: sums[i] / jnp.maximum(count, 1.0) for i, name in enumerate(_metric_names(ks))}
  out["count"] = count.astype(jnp.int32)
  return out


class RankingMetrics:
  """Accumulates ranking metrics over batches with one device->host copy.

  `update` only enqueues device work (per-batch sums stay on device, so the
  eval loop never blocks); `result` fetches every batch's sums at once and
  adds them in float64 on the host.

    acc = RankingMetrics(ks=(5, 10))
    for batch in batches:
      acc.update(target_ranks(...), valid=batch["valid"])
    acc.result()  # {"recall@5": ..., ..., "mrr": ..., "count": ...}
  """

  def __init__(self, ks: Sequence[int] = (1, 5, 10, 20)):
    self.ks = _check_ks(ks)
    self._sums: list[jax.Array] = []

  def update(self, ranks: jax.Array, valid: jax.Array | None = None) -> None:
    """Adds a batch; ranks < 0 or valid == False (padding) are skipped."""
    self._sums.append(_metric_sums(ranks, valid, self.ks))

  def result(self) -> dict[str, float]:
    """Means over all valid examples seen so far (0.0 when there are none)."""
    if self._sums:
      total = np.asarray(jax.device_get(jnp.stack(self._sums)), np.float64).sum(0)
    else:
      total = np.zeros(len(_metric_names(self.ks)) + 1)
    count = int(round(total[-1]))
    out = {name: float(total[i]) / max(count, 1)
           for i, name in enumerate(_metric_names(self.ks))}
    out["count"] = count
    return out

  def reset(self) -> None:
    self._sums = []


# --- reporting -------------------------------------------------------------


def ranking_protocol(vocab_size: int, exclude_history: bool) -> str:
  """The protocol line to print with every number (vocab_size incl. PAD/MASK)."""
  items = vocab_size - NUM_RESERVED
  return (f"full ranking over {items:,} items, pessimistic ties, "
          f"history excluded: {'yes' if exclude_history else 'no'}")


def format_metrics_table(results: Mapping[str, Mapping[str, float]],
                         columns: Sequence[str] | None = None,
                         protocol: str | None = None) -> str:
  """A fixed-width text table: one row per name (split/model), one column per metric.

  Columns default to every metric seen, in first-seen order; a missing value
  prints as "-". `protocol` (see `ranking_protocol`) is printed underneath.
  """
  if columns is None:
    columns = list(dict.fromkeys(m for row in results.values() for m in row))

  def cell(value) -> str:
    if value is None:
      return "-"
    value = np.asarray(value)
    return f"{int(value)}" if value.dtype.kind in "iu" else f"{float(value):.4f}"

  header = ["", *columns]
  rows = [[name, *(cell(row.get(c)) for c in columns)] for name, row in results.items()]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(r, widths)))
           for r in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if protocol:
    lines.append(f"({protocol})")
  return "\n".join(lines)
