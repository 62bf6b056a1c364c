"""Sparse (row-wise lazy) optimizer updates for the item tables.

A step touches a few thousand of the catalogue's rows (its inputs, targets and sampled
negatives), yet a dense Adam reads and writes every row of the table and both moments.
Here the item tables (`items`, `output_items`, `output_bias`: every parameter whose rows
are items) get a lazy optimizer instead: only the rows a step uses are updated and
scattered back (in place: the train state is donated); the rest of the model keeps the
dense AdamW of `loop.make_optimizer`. Global-norm clipping sees every gradient, the
learning-rate schedule is shared, and bias correction counts global steps, so when every
row is touched each step, `lazy adam` equals the dense AdamW and `lazy adagrad` equals
optax.adagrad (tests/test_sparse.py).

Two ways to find the rows, one update:

  gathered (`gather_rows=True`, the default, for a model that lists the ids its loss reads:
           `item_ids`, recjax/models/base.py; Bert4Rec / SASRec+ / FLARE with a sampled
           loss). Before the forward pass the step takes the distinct ids of its inputs,
           targets and negatives (sorted, padded to K = min(max_rows or the id count,
           the id count)), gathers those K rows of every item table and differentiates
           the loss w.r.t. them ([K, D]) and the dense parameters; the network reads the
           tables as constants and their rows through `base.ItemRows`. No [V, D]
           gradient exists: the step's cost no longer grows with the catalogue, except
           for the in-place scatters. The global norm is exact (distinct ids: each row
           counted once).
  dense gradients (`gather_rows=False`, or a model without `item_ids`: full / chunked
           softmax read whole tables, so their gradients are dense anyway). Autodiff
           hands over each table's gradient ([V, D]); rows with a nonzero gradient are
           found in it (`touched_window`), read twice (global norm, touched rows): O(V).

Either way a row with an all-zero gradient keeps its moments and its value (no momentum
drift, no weight decay): that is what lazy means, and what differs from the dense
optimizer on rows a step never touched.

Capacity: `max_rows` rows per step, static. Gathered, 0 means every id the step reads
(nothing can overflow); the ids past the capacity are read from the constant tables (the
forward stays exact) but not updated, and their number is added to `dropped_rows`, once
per step. Dense gradients: touched rows past the capacity are not updated and counted per
table; max_rows=0 applies the update with a mask over the whole table (exact, dense
cost). `dropped_rows` must stay 0: a fallback inside the step (a cond or a loop over
windows) made XLA copy the whole table and cost more than the dense update. Under
overflow the clipping norm misses the dropped rows' gradients (they are never computed).

The moments live in the optimizer state with the table's shape and logical axes, so they
shard like the table on `model`, are checkpointed with the state and resume exactly (the
two paths share the state layout).

Gin: `loop.train.optimizer = @sparse.make_optimizer` and `sparse.make_optimizer.rows =
'adam'` (or 'adagrad'); every other argument is `loop.make_optimizer`'s.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from recjax.models import base
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


def _row_rule(kind: str, *, b1: float, b2: float, eps: float, weight_decay: float, adagrad_eps: float):
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
  return rows_update


def lazy(kind: str, learning_rate, *, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8,
         weight_decay: float = 0.0, initial_accumulator_value: float = 0.1, adagrad_eps: float = 1e-7,
         max_rows: int = 0) -> optax.GradientTransformation:
  """Row-wise lazy Adam(W) or Adagrad over every leaf it is given (leading axis = rows).

  max_rows: the static capacity of rows updated sparsely per step (0: the masked update
  over the whole table every step, exact and dense)."""
  if kind not in ROW_OPTIMIZERS:
    raise ValueError(f"unknown row optimizer {kind!r}; choose one of {ROW_OPTIMIZERS}")
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  rows_update = _row_rule(kind, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, adagrad_eps=adagrad_eps)

  def init(params):
    if kind == "adam":
      return LazyState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                       jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))
    return LazyState(jnp.zeros((), jnp.int32),
                     jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params),
                     jax.tree.map(lambda p: jnp.zeros((), p.dtype), params), jnp.zeros((), jnp.int32))

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


def _name(path) -> str | None:
  key = path[0]
  return getattr(key, "key", getattr(key, "name", None))


def _is_table(path) -> bool:
  return _name(path) in ITEM_TABLES


def distinct_ids(ids, k: int, fill: int):
  """(the k smallest distinct ids of `ids`, sorted, padded with `fill` [k]; how many
  distinct ids there are). A sort of the step's ids, never a pass over a table."""
  s = jnp.sort(ids.reshape(-1).astype(jnp.int32))
  first = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
  rank = jnp.cumsum(first.astype(jnp.int32)) - 1
  out = jnp.full((k,), fill, jnp.int32).at[jnp.where(first & (rank < k), rank, k)].set(s, mode="drop")
  return out, jnp.sum(first.astype(jnp.int32))


class RowOptimizer(NamedTuple):
  """An optax transformation (init, update: the dense-gradient path) plus the step that
  differentiates only the item rows a step reads (`gathered_update`; None: off)."""
  init: Callable
  update: Callable
  gathered_update: Callable | None


def make_optimizer(total_steps: int, *, rows: str = "adam", max_rows: int = 0, learning_rate: float = 1e-3,
                   b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, gather_rows: bool = True, **schedule):
  """`loop.make_optimizer` with the item tables updated row-wise (lazy `rows`: adam or
  adagrad). max_rows: per-step row capacity of the sparse update (0: every id the step
  reads when the model lists them, else masked over the table; set it above a step's
  distinct inputs + targets + negatives). gather_rows: differentiate only the rows the
  model lists (`item_ids`, recjax/models/base.py) instead of the whole tables. Returns
  (RowOptimizer, schedule)."""
  dense, lr = loop.make_optimizer(total_steps, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                                  weight_decay=weight_decay, clip_norm=None, **schedule)
  row_tx = lazy(rows, lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, max_rows=max_rows)
  rows_update = _row_rule(rows, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, adagrad_eps=1e-7)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: "rows" if _is_table(path) else "dense", params)

  inner = optax.multi_transform({"rows": row_tx, "dense": dense}, labels)

  def clip(norm, g):  # optax.clip_by_global_norm's arithmetic
    return g if not clip_norm else jnp.where(norm < clip_norm, g, (g / norm.astype(g.dtype)) * clip_norm)

  def init(params):
    if not clip_norm:
      return inner.init(params)
    return optax.EmptyState(), inner.init(params)  # the (clip, partition) layout of a chain

  def update(grads, state, params=None):
    if not clip_norm:
      return inner.update(grads, state, params)
    # optax.clip_by_global_norm, except that the item tables' gradients are scaled only
    # at the rows the lazy update gathers (a scaled [V, D] copy costs a pass over it).
    norm = optax.tree.norm(grads)
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
    grads = jax.tree_util.tree_map_with_path(lambda path, g: g if _is_table(path) else clip(norm, g), grads)
    updates, inner_state = inner.update(grads, state[1], params, grad_scale=scale)
    return updates, (state[0], inner_state)

  def gathered_update(loss_of, ids, params, state):
    """One step on the rows `ids` names: gather them from every item table, differentiate
    the loss w.r.t. those [K, ...] rows and the dense parameters, update both, scatter
    the rows back (in place: the state is donated). Nothing of size [V, ...] is built.

    loss_of(params, item_rows) -> (loss, aux): the model's loss with the tables read
    through `item_rows` (base.ItemRows). Returns ((loss, aux), global gradient norm,
    params, optimizer state)."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_table(path)]
    tables = {_name(path): x for path, x in leaves}
    if len(tables) != len(leaves):  # ItemRows names a table by its top-level parameter name
      raise ValueError(f"an item table must be one array per name, got {[jax.tree_util.keystr(p) for p, _ in leaves]}")
    v = max(x.shape[0] for x in tables.values())
    k = min(max_rows if max_rows > 0 else ids.size, ids.size, v)
    uids, n_distinct = distinct_ids(ids, k, fill=v)
    row_vars = {name: x.at[uids].get(mode="fill", fill_value=0) for name, x in tables.items()}
    # The tables' leaves are replaced by scalars while differentiating: the network reads
    # the tables as constants (closed over) and their rows through `row_vars`.
    dense_vars = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros((), x.dtype) if _is_table(path) else x, params)

    def f(dense_vars, row_vars):
      full = jax.tree_util.tree_map_with_path(lambda path, d, x: x if _is_table(path) else d, dense_vars, params)
      return loss_of(full, base.ItemRows(uids, row_vars))

    out, (g_dense, g_rows) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(dense_vars, row_vars)
    # Exact global norm: the ids are distinct, so every row's gradient is counted once.
    norm = jnp.sqrt(optax.tree.norm(g_dense, squared=True) + optax.tree.norm(g_rows, squared=True))
    scale = 1.0 if not clip_norm else jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
    g_dense = jax.tree.map(lambda g: clip(norm, g), g_dense)
    partition = state[1] if clip_norm else state
    dense_tx = optax.masked(dense, jax.tree_util.tree_map_with_path(lambda path, _: not _is_table(path), params))
    updates, dense_state = dense_tx.update(g_dense, partition.inner_states["dense"], params)
    new_params = jax.tree_util.tree_map_with_path(
        lambda path, x, u: x if _is_table(path) else optax.apply_updates(x, u), params, updates)
    lazy_state = partition.inner_states["rows"].inner_state
    t = lazy_state.count + 1
    lr_t = lr(lazy_state.count) if callable(lr) else lr

    def row_leaf(path, m, n):
      name = _name(path)
      p, g = tables[name], g_rows[name]
      if clip_norm:
        g = g * scale.astype(g.dtype)
      take = lambda x: x.at[uids].get(mode="fill", fill_value=0)
      delta, m_k, n_k = rows_update(g, take(m), take(n) if rows == "adam" else n, take(p), t.astype(jnp.float32), lr_t)
      # Rows read but with an all-zero gradient stay as they are, as in `lazy`.
      index = jnp.where(_touched(g), uids, v)
      put = lambda x, r: x.at[index].set(r.astype(x.dtype), mode="drop")
      return put(p, take(p) + delta), put(m, m_k), put(n, n_k) if rows == "adam" else n

    out_rows = jax.tree_util.tree_map_with_path(row_leaf, lazy_state.mu, lazy_state.nu)
    treedef = jax.tree.structure(lazy_state.mu)
    flat = treedef.flatten_up_to(out_rows)
    pick = lambda i: treedef.unflatten([f[i] for f in flat])
    new_tables = {_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(pick(0))[0]}
    new_params = jax.tree_util.tree_map_with_path(
        lambda path, x: new_tables[_name(path)] if _is_table(path) else x, new_params)
    # Ids past the capacity were read from the constant tables: not updated, counted.
    dropped = jnp.maximum(n_distinct - k, 0)
    new_lazy = LazyState(t, pick(1), pick(2), lazy_state.dropped_rows + dropped)
    inner_states = dict(partition.inner_states, dense=dense_state,
                        rows=partition.inner_states["rows"]._replace(inner_state=new_lazy))
    new_partition = partition._replace(inner_states=inner_states)
    return out, norm, new_params, ((state[0], new_partition) if clip_norm else new_partition)

  return RowOptimizer(init, update, gathered_update if gather_rows else None), lr
