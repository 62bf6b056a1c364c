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

  model = fit(users, items, num_users=U, num_items=V, dim=64)   # observed pairs
  model.item_factors, model.user_factors, model.loss
  train_interactions(data_dir)                                  # pairs from a prepared dataset
  normalize_by_mean_norm(model.item_factors)                    # scale for fusion with text
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


@functools.partial(jax.jit, static_argnames=("cfg", "num_users", "num_items", "track_loss"))
def _fit(users, items, counts, *, cfg: WALSConfig, num_users: int, num_items: int, track_loss: bool):
  kx, ky = jax.random.split(jax.random.key(cfg.seed))
  x = cfg.init_scale * jax.random.normal(kx, (num_users, cfg.dim), jnp.float32)
  y = cfg.init_scale * jax.random.normal(ky, (num_items, cfg.dim), jnp.float32)
  conf = 1.0 + cfg.alpha * counts

  def sweep(carry, _):
    x, y = carry
    x = _half_step(x, y, users, items, conf, cfg)
    y = _half_step(y, x, items, users, conf, cfg)
    loss = objective(x, y, users, items, conf, cfg) if track_loss else jnp.float32(0)
    return (x, y), loss

  (x, y), losses = jax.lax.scan(sweep, (x, y), None, length=cfg.sweeps)
  return x, y, losses


def fit(users, items, *, num_users: int, num_items: int, config: WALSConfig | None = None,
        counts=None, track_loss: bool = True) -> WALSModel:
  """Fits WALS to observed (user, item) pairs; duplicate pairs are merged into counts."""
  cfg = config or WALSConfig()
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
  u, i = (pairs // num_items).astype(np.int32), (pairs % num_items).astype(np.int32)
  x, y, losses = _fit(jnp.asarray(u), jnp.asarray(i), jnp.asarray(merged), cfg=cfg, num_users=num_users,
                      num_items=num_items, track_loss=track_loss)
  return WALSModel(np.asarray(x), np.asarray(y), [float(v) for v in np.asarray(losses)] if track_loss else [],
                   cfg)


def train_interactions(data_dir) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(users, items, num_users, vocab_size) of a prepared dataset's training part: every
  user's items except the last two (validation and test targets), so evaluation on either
  split never sees its target."""
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  table = ds.sequences(["user_id", "items"]).to_pydict()
  users, items = [], []
  for u, seq in zip(table["user_id"], table["items"]):
    train = seq[:-2]
    users.extend([u] * len(train))
    items.extend(train)
  return np.asarray(users, np.int64), np.asarray(items, np.int64), ds.num_users, ds.vocab_size


def normalize_by_mean_norm(vectors: np.ndarray, rows=None) -> np.ndarray:
  """Scales vectors so that the mean L2 norm over `rows` (default: all) is 1: how "Beyond
  Retrieval" puts collaborative vectors on the scale of unit-norm text embeddings."""
  v = np.asarray(vectors, np.float32)
  norms = np.linalg.norm(v if rows is None else v[rows], axis=-1)
  mean = float(norms.mean()) if norms.size else 0.0
  if mean <= 0:
    raise ValueError("cannot normalise all-zero vectors")
  return v / mean


def evaluate(model: WALSModel, data_dir, *, split: str = "test", k: int = 10, chunk: int = 2048) -> dict:
  """Full-catalog HR@k / NDCG@k of the held-out item of `split` (test: the last item,
  validation: the one before), each user's earlier items excluded, next to popularity.
  The factors come from the training part (`train_interactions`) either way."""
  from recjax.data.prepared import PreparedDataset
  if split not in ("test", "validation"):
    raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
  ds = PreparedDataset(data_dir)
  table = ds.sequences(["user_id", "items"]).to_pydict()
  cut = -1 if split == "test" else -2
  users = np.asarray(table["user_id"])
  targets = np.asarray([seq[cut] for seq in table["items"]])
  histories = [seq[:cut] for seq in table["items"]]
  train_users, train_items, _, vocab = train_interactions(data_dir)
  popularity = np.bincount(train_items, minlength=vocab).astype(np.float32)
  out = {}
  for name, score_fn in (("wals", lambda rows: model.user_factors[users[rows]] @ model.item_factors.T),
                         ("popularity", lambda rows: np.broadcast_to(popularity, (len(rows), vocab)).copy())):
    hits, ndcg = 0.0, 0.0
    for start in range(0, len(users), chunk):
      rows = np.arange(start, min(start + chunk, len(users)))
      s = score_fn(rows)
      s[:, :2] = -np.inf  # PAD, MASK
      for j, r in enumerate(rows):
        s[j, histories[r]] = -np.inf
      target_score = s[np.arange(len(rows)), targets[rows]]
      rank = (s >= target_score[:, None]).sum(1) - 1  # pessimistic ties, as recjax.evaluation
      hits += float((rank < k).sum())
      ndcg += float(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0).sum())
    out[name] = {f"hr@{k}": hits / len(users), f"ndcg@{k}": ndcg / len(users), "count": len(users)}
  return out
