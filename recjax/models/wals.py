"""Weighted alternating least squares (WALS) for implicit feedback, in JAX.

The collaborative item vectors of "Beyond Retrieval" (REGEN section 4.2.2): user and item
factors X [U, d], Y [V, d] minimising

    sum_{(u,i) observed} c_ui (1 - x_u.y_i)^2 + w0 * sum_{(u,i) unobserved} (x_u.y_i)^2
      + lam * (|X|^2 + |Y|^2)

(Hu, Koren & Volinsky 2008, with a uniform unobserved weight w0 as in TF's WALS). Each half
step solves every row's normal equations

    (w0 Y^T Y + sum_{i in I_u} (c_ui - w0) y_i y_i^T + lam I) x_u = sum_{i in I_u} c_ui y_i

by a few conjugate-gradient iterations warm-started at the previous factors (Takacs et al.
2011): no d x d matrix is formed per row, so memory is O(nnz * d + (U + V) * d) and the cost
per iteration O(nnz * d + (U + V) * d^2). Everything is one jitted function; the
host sees the factors only at the end (and the loss, when asked for it).

  model = fit(users, items, num_users=U, num_items=V, config=WALSConfig(dim=64))  # observed pairs
  model.item_factors, model.user_factors, model.loss
  normalize_by_mean_norm(model.item_factors)                    # scale for fusion with text

The fitting math only: `merge_pairs` + `init_factors` + `run_sweeps` are the pieces `fit`
chains, exposed so a driver can checkpoint between sweeps; the `wals` artifact of a prepared
dataset (its training pairs, checkpoints, evaluation, files) is `recjax.artifacts.wals`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class WALSConfig:
  dim: int = 64
  sweeps: int = 15  # alternations (user half + item half)
  cg_steps: int = 3  # conjugate-gradient iterations per half, warm-started
  l2: float = 1.0  # lam
  unobserved_weight: float = 1.0  # w0
  alpha: float = 10.0  # c_ui = 1 + alpha * count_ui for observed pairs
  init_scale: float = 0.1
  seed: int = 0


@dataclasses.dataclass
class WALSModel:
  user_factors: np.ndarray  # [num_users, dim]
  item_factors: np.ndarray  # [num_items, dim] (row = item id)
  losses: list[float]  # objective after each sweep
  config: WALSConfig

  @property
  def loss(self) -> float:
    return self.losses[-1]

  def scores(self, users: np.ndarray) -> np.ndarray:
    return self.user_factors[users] @ self.item_factors.T


def _half_step(x, y, rows, cols, conf, cfg: WALSConfig):
  """Updates the factors x [n, d] given the fixed side y [m, d] and the observed pairs
  (rows index x, cols index y, confidence conf), by cfg.cg_steps CG iterations per row."""
  n, d = x.shape
  w0, lam = cfg.unobserved_weight, cfg.l2
  base = w0 * (y.T @ y) + lam * jnp.eye(d, dtype=x.dtype)  # shared by every row
  yc = y[cols]  # [nnz, d]
  extra = conf - w0

  def matvec(v):  # A_r v_r for every row r at once
    along = jnp.sum(yc * v[rows], axis=-1) * extra
    return v @ base + jax.ops.segment_sum(along[:, None] * yc, rows, num_segments=n)

  b = jax.ops.segment_sum(conf[:, None] * yc, rows, num_segments=n)
  r = b - matvec(x)
  p = r
  rs = jnp.sum(r * r, axis=-1)

  def body(_, carry):
    x, r, p, rs = carry
    ap = matvec(p)
    # Rows already solved (rs ~ 0) keep still instead of dividing by ~0.
    alpha = jnp.where(rs > 1e-20, rs / jnp.maximum(jnp.sum(p * ap, axis=-1), 1e-30), 0.0)
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * ap
    rs_new = jnp.sum(r * r, axis=-1)
    p = r + jnp.where(rs > 1e-20, rs_new / jnp.maximum(rs, 1e-30), 0.0)[:, None] * p
    return x, r, p, rs_new

  x, *_ = jax.lax.fori_loop(0, cfg.cg_steps, body, (x, r, p, rs))
  return x


def objective(x, y, users, items, conf, cfg: WALSConfig):
  """The WALS loss (see the module docstring), exact: the unobserved sum as the full sum
  w0 * |X Y^T|^2 minus its observed part, without forming X Y^T."""
  pred = jnp.sum(x[users] * y[items], axis=-1)
  observed = jnp.sum(conf * (1.0 - pred) ** 2 - cfg.unobserved_weight * pred ** 2)
  full = cfg.unobserved_weight * jnp.sum((x.T @ x) * (y.T @ y))
  return observed + full + cfg.l2 * (jnp.sum(x * x) + jnp.sum(y * y))


def init_factors(cfg: WALSConfig, num_users: int, num_items: int):
  """The random starting factors (X [U, d], Y [V, d]) of a fit, from cfg.seed."""
  kx, ky = jax.random.split(jax.random.key(cfg.seed))
  return (cfg.init_scale * jax.random.normal(kx, (num_users, cfg.dim), jnp.float32),
          cfg.init_scale * jax.random.normal(ky, (num_items, cfg.dim), jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "sweeps", "track_loss"))
def run_sweeps(x, y, users, items, counts, *, cfg: WALSConfig, sweeps: int, track_loss: bool):
  """`sweeps` alternations from factors (x, y) over merged pairs: (x, y, loss after each)."""
  conf = 1.0 + cfg.alpha * counts

  def sweep(carry, _):
    x, y = carry
    x = _half_step(x, y, users, items, conf, cfg)
    y = _half_step(y, x, items, users, conf, cfg)
    loss = objective(x, y, users, items, conf, cfg) if track_loss else jnp.float32(0)
    return (x, y), loss

  (x, y), losses = jax.lax.scan(sweep, (x, y), None, length=sweeps)
  return x, y, losses


def merge_pairs(users, items, *, num_users: int, num_items: int, counts=None):
  """Checks observed (user, item) pairs and merges duplicates into counts:
  (users int32, items int32, counts float32), sorted by pair."""
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError(f"users and items must be 1-D and equally long, got {users.shape} and {items.shape}")
  if users.size == 0:
    raise ValueError("WALS needs at least one observed (user, item) pair")
  for name, ids, n in (("user", users, num_users), ("item", items, num_items)):
    if ids.min() < 0 or ids.max() >= n:
      raise ValueError(f"{name} ids must lie in [0, {n}), got [{ids.min()}, {ids.max()}]")
  weights = np.ones(users.shape, np.float32) if counts is None else np.asarray(counts, np.float32)
  pairs, inverse = np.unique(users * num_items + items, return_inverse=True)
  merged = np.bincount(inverse, weights=weights).astype(np.float32)
  return (pairs // num_items).astype(np.int32), (pairs % num_items).astype(np.int32), merged


def fit(users, items, *, num_users: int, num_items: int, config: WALSConfig | None = None,
        counts=None, track_loss: bool = True) -> WALSModel:
  """Fits WALS to observed (user, item) pairs; duplicate pairs are merged into counts."""
  cfg = config or WALSConfig()
  u, i, merged = merge_pairs(users, items, num_users=num_users, num_items=num_items, counts=counts)
  x, y = init_factors(cfg, num_users, num_items)
  x, y, losses = run_sweeps(x, y, jnp.asarray(u), jnp.asarray(i), jnp.asarray(merged), cfg=cfg,
                            sweeps=cfg.sweeps, track_loss=track_loss)
  return WALSModel(np.asarray(x), np.asarray(y), [float(v) for v in np.asarray(losses)] if track_loss else [],
                   cfg)


def normalize_by_mean_norm(vectors: np.ndarray, rows=None) -> np.ndarray:
  """Scales vectors so that the mean L2 norm over `rows` (default: all) is 1: how "Beyond
  Retrieval" puts collaborative vectors on the scale of unit-norm text embeddings."""
  v = np.asarray(vectors, np.float32)
  norms = np.linalg.norm(v if rows is None else v[rows], axis=-1)
  mean = float(norms.mean()) if norms.size else 0.0
  if mean <= 0:
    raise ValueError("cannot normalise all-zero vectors")
  return v / mean
