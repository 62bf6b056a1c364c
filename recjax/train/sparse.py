"""Sparse (row-wise lazy) optimizer updates for the item tables.

A step touches a few thousand of the catalogue's rows (its inputs, targets and sampled
negatives), yet a dense Adam reads and writes every row of the table and both moments.
Here the item tables (`items`, `output_items`, `output_bias`: every parameter whose rows
are items) get a lazy optimizer instead: only rows with a nonzero gradient this step are
gathered, updated and scattered back (in place: the train state is donated); the rest of
the model keeps the dense AdamW of `loop.make_optimizer`. Global-norm clipping still sees
every gradient, the learning-rate schedule is shared, and bias correction counts global
steps, so when every row is touched each step, `lazy adam` equals the dense AdamW and
`lazy adagrad` equals optax.adagrad (tests/test_sparse.py).

Rows are found from the gradient (rows whose gradient is not all zero) and gathered into
a static capacity of `max_rows` rows: set it above a step's inputs + targets + negatives.
Touched rows past the capacity are not updated that step; the state counts them
(`dropped_rows`, which must stay 0: a fallback inside the step, a cond or a loop over
windows, made XLA copy the whole table and cost more than the dense update). max_rows=0
applies the update with a mask over the whole table instead (exact, dense cost).

Still O(V) per step: autodiff hands over the table's gradient densely ([V, D]), read twice
here (global norm, touched rows). The moments live in the optimizer state with the table's shape and logical axes, so they shard like the table on
`model`, are checkpointed with the state and resume exactly. A row with a zero gradient
keeps its moments and its value (no momentum drift, no weight decay): that is what lazy
means, and what differs from the dense optimizer on rows a step never touched.

Gin: `loop.train.optimizer = @sparse.make_optimizer` and `sparse.make_optimizer.rows =
'adam'` (or 'adagrad'); every other argument is `loop.make_optimizer`'s.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recjax.train import loop

ROW_OPTIMIZERS = ("adam", "adagrad")
ITEM_TABLES = ("items", "output_items", "output_bias")


class LazyState(NamedTuple):
  count: jax.Array  # steps taken (int32): the bias correction and schedule use global steps
  mu: Any  # Adam's first moment / Adagrad's sum of squares, shaped like the tables
  nu: Any  # Adam's second moment (zeros of shape () for Adagrad)
  dropped_rows: jax.Array  # touched rows past max_rows, summed over steps: must stay 0


def _touched(grad):
  """[V] bool: rows whose gradient is not all zero (max |g|: no underflow, one pass)."""
  return jnp.max(jnp.abs(grad).reshape(grad.shape[0], -1), axis=1) > 0


def touched_window(touched, start, k: int):
  """Row ids [k] of the touched rows ranked [start, start + k), padded with V (dropped)."""
  v = touched.shape[0]
  rank = jnp.cumsum(touched.astype(jnp.int32)) - 1 - start
  slot = jnp.where(touched & (rank >= 0) & (rank < k), rank, k)
  return jnp.full((k,), v, jnp.int32).at[slot].set(jnp.arange(v, dtype=jnp.int32), mode="drop")


def lazy(kind: str, learning_rate, *, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8,
         weight_decay: float = 0.0, initial_accumulator_value: float = 0.1, adagrad_eps: float = 1e-7,
         max_rows: int = 0) -> optax.GradientTransformation:
  """Row-wise lazy Adam(W) or Adagrad over every leaf it is given (leading axis = rows).

  max_rows: the static capacity of rows updated sparsely per step (0: the masked update
  over the whole table every step, exact and dense)."""
  if kind not in ROW_OPTIMIZERS:
    raise ValueError(f"unknown row optimizer {kind!r}; choose one of {ROW_OPTIMIZERS}")
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    if kind == "adam":
      return LazyState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                       jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))
    return LazyState(jnp.zeros((), jnp.int32),
                     jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params),
                     jax.tree.map(lambda p: jnp.zeros((), p.dtype), params), jnp.zeros((), jnp.int32))

  def rows_update(g, m, n, p, t, lr):
    """Updated (delta, m, n) of some rows: g, m, p [k, ...]; n like m (adam) or ()."""
    if kind == "adam":
      m = b1 * m + (1 - b1) * g
      n = b2 * n + (1 - b2) * g * g
      u = (m / (1 - b1**t)) / (jnp.sqrt(n / (1 - b2**t)) + eps)
      if weight_decay and p.ndim >= 2:  # loop.make_optimizer decays matrices only
        u = u + weight_decay * p
      return -lr * u, m, n
    m = m + g * g
    return -lr * jnp.where(m > 0, jax.lax.rsqrt(m + adagrad_eps), 0.0) * g, m, n

  def leaf(g, m, n, p, t, lr, scale):
    touched = _touched(g)
    if max_rows <= 0:  # masked over the whole table
      hit = touched.reshape(-1, *([1] * (g.ndim - 1)))
      delta, m_new, n_new = rows_update(scale(g), m, n, p, t, lr)
      return (jnp.where(hit, delta, 0).astype(p.dtype), jnp.where(hit, m_new, m),
              jnp.where(hit, n_new, n) if kind == "adam" else n, jnp.zeros((), jnp.int32))
    k = min(max_rows, g.shape[0])
    index = touched_window(touched, 0, k)
    take = lambda x: x.at[index].get(mode="fill", fill_value=0)
    delta, m_k, n_k = rows_update(scale(take(g)), take(m), take(n) if kind == "adam" else n, take(p), t, lr)
    put = lambda x, rows: x.at[index].set(rows, mode="drop")
    # Zeros plus a scatter-add: XLA folds `params + updates` into an in-place scatter.
    updates = jnp.zeros_like(p).at[index].add(delta, mode="drop")
    dropped = jnp.maximum(jnp.sum(touched.astype(jnp.int32)) - k, 0)
    return updates, put(m, m_k), put(n, n_k) if kind == "adam" else n, dropped

  def update(updates, state, params=None, *, grad_scale=None, **extra):
    """grad_scale: a factor on the gradient (global-norm clipping), applied to the
    gathered rows only, so no scaled copy of the whole table's gradient is made."""
    del extra
    if params is None:
      raise ValueError("the lazy row optimizer needs the parameters (weight decay, in-place rows)")
    t = state.count + 1
    lr = schedule(state.count)
    scale = (lambda g: g) if grad_scale is None else (lambda g: g * grad_scale.astype(g.dtype))
    out = jax.tree.map(lambda g, m, n, p: leaf(g, m, n, p, t.astype(jnp.float32), lr, scale),
                       updates, state.mu, state.nu, params)
    treedef = jax.tree.structure(updates)
    flat = treedef.flatten_up_to(out)
    pick = lambda i: treedef.unflatten([f[i] for f in flat])
    dropped = sum((f[3] for f in flat), jnp.zeros((), jnp.int32))
    return pick(0), LazyState(t, pick(1), pick(2), state.dropped_rows + dropped)

  return optax.GradientTransformationExtraArgs(init, update)


def _is_table(path) -> bool:
  key = path[0]
  return getattr(key, "key", getattr(key, "name", None)) in ITEM_TABLES


def make_optimizer(total_steps: int, *, rows: str = "adam", max_rows: int = 0, learning_rate: float = 1e-3,
                   b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, **schedule):
  """`loop.make_optimizer` with the item tables updated row-wise (lazy `rows`: adam or
  adagrad). max_rows: per-step row capacity of the sparse update (0 = masked over the
  table, exact; set it above a step's distinct inputs + targets + negatives). Returns
  (optax transformation, schedule)."""
  dense, lr = loop.make_optimizer(total_steps, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                                  weight_decay=weight_decay, clip_norm=None, **schedule)
  row_tx = lazy(rows, lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, max_rows=max_rows)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: "rows" if _is_table(path) else "dense", params)

  inner = optax.multi_transform({"rows": row_tx, "dense": dense}, labels)
  if not clip_norm:
    return inner, lr

  def init(params):
    return optax.EmptyState(), inner.init(params)  # the (clip, partition) layout of a chain

  def update(grads, state, params=None):
    # optax.clip_by_global_norm, except that the item tables' gradients are scaled only
    # at the rows the lazy update gathers (a scaled [V, D] copy costs a pass over it).
    norm = optax.tree.norm(grads)
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: g if _is_table(path) else jnp.where(norm < clip_norm, g, (g / norm.astype(g.dtype)) * clip_norm),
        grads)
    updates, inner_state = inner.update(grads, state[1], params, grad_scale=scale)
    return updates, (state[0], inner_state)

  return optax.GradientTransformation(init, update), lr
