"""Semantic IDs (TIGER, Mender): an RQ-VAE over frozen sentence embeddings of item text.

The network, its losses and the fitting math only; building, saving and loading a
dataset's semantic IDs is `recjax.artifacts.semantic_ids` (`recjax fit --gin_file=fits/rqvae.gin`):

  sids = recjax.artifacts.semantic_ids.load(data_dir, "rqvae")  # a SemanticIds
  sids.codes[item_id]                           # [levels] level-local codes (-1: PAD/MASK)
  sids.tokens[item_id]                          # the same as tokens: offset_l + code
  sids.trie.valid_next((12, 7))                 # codes that may follow a prefix

The path: item text embeddings (a frozen encoder, the `text_embeddings` artifact) ->
standardized per dimension -> RQ-VAE: MLP encoder -> latent -> `num_levels` residual quantisers (k-means initialised on the first batch) ->
MLP decoder back to the input. Training: reconstruction MSE + codebook loss + beta x
commitment loss, a straight-through (or rotation-trick) gradient, AdamW. One more level
then numbers the items that share a prefix 0, 1, 2, ... (by item id), so every item's ID
is unique. Token ids: 0 = pad, 1 = eos, then level l's codes at `offsets[l] + code`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

PAD_TOKEN, EOS_TOKEN, NUM_SPECIAL = 0, 1, 2  # semantic-ID tokens reserved before the codes
NUM_RESERVED_ITEMS = 2  # item ids 0/1 are PAD/MASK in every prepared dataset
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  input_dim: int = 384
  hidden_dims: tuple[int, ...] = (512, 256)
  latent_dim: int = 128
  num_levels: int = 3
  codebook_size: int = 256
  dropout: float = 0.1
  beta: float = 0.25  # commitment weight
  gradient: str = "ste"  # "ste" (straight-through) or "rotation" (Fifty et al. 2024)
  kmeans_iters: int = 10
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  steps: int = 3000
  batch_size: int = 1024
  # Every N steps, codes unused since the last check restart at random residuals of the
  # batch (0 = off); none in the last 10% of the steps, so the codebooks settle.
  dead_code_every: int = 20
  log_every: int = 100  # steps per jitted chunk (lax.scan) and per progress line
  seed: int = 0

  def __post_init__(self):
    if self.gradient not in ("ste", "rotation"):
      raise ValueError(f"unknown gradient {self.gradient!r}; choose ste or rotation")
    for name in ("num_levels", "codebook_size", "steps", "batch_size", "latent_dim", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")


# -- the network ---------------------------------------------------------------------


class MLP(nnx.Module):
  """Linear -> LayerNorm -> ReLU -> dropout per hidden layer, a plain Linear last."""

  def __init__(self, dims: Sequence[int], *, dropout: float, rngs: nnx.Rngs):
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-2], dims[1:-1])])
    self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in dims[1:-1]])
    self.out = nnx.Linear(dims[-2], dims[-1], rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None = None):
    for dense, norm in zip(self.hidden, self.norms):
      x = self.dropout(jax.nn.relu(norm(dense(x))), deterministic=deterministic, rngs=rngs)
    return self.out(x)


def nearest(x, codebook):
  """Index of the nearest code (squared Euclidean) for each row of x [N, D]; codebook [K, D]."""
  d = (jnp.sum(x * x, -1, keepdims=True) - 2 * x @ codebook.T + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(d, -1).astype(jnp.int32)


def residual_quantize(codebooks, z):
  """Residual quantisation of z [B, D] by codebooks [L, K, D].

  Returns (codes [B, L] int32, chosen codes [L, B, D], residuals [L, B, D]): level l
  quantises r_l, and r_{l+1} = r_l - sg(e_l), so each codebook is trained only by its own
  codebook loss while the commitment losses reach the encoder through every level.
  """
  codes, chosen, residuals = [], [], []
  r = z
  for level in range(codebooks.shape[0]):
    idx = nearest(sg(r), sg(codebooks[level]))
    e = codebooks[level][idx]
    codes.append(idx)
    chosen.append(e)
    residuals.append(r)
    r = r - sg(e)
  return jnp.stack(codes, 1), jnp.stack(chosen), jnp.stack(residuals)


def straight_through(z, q):
  """q in the forward pass; the decoder's gradient passes to z unchanged."""
  return z + sg(q - z)


def rotation_trick(z, q, eps: float = 1e-8):
  """q in the forward pass; backward, the gradient reaches z through the fixed rotation
  and rescaling that maps z onto q (Fifty et al. 2024), so it keeps the angle between z
  and its code instead of being copied verbatim."""
  z_norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
  q_norm = jnp.linalg.norm(q, axis=-1, keepdims=True)
  zh, qh = sg(z / (z_norm + eps)), sg(q / (q_norm + eps))
  r = zh + qh
  r = sg(r / (jnp.linalg.norm(r, axis=-1, keepdims=True) + eps))
  rotated = z - 2 * r * jnp.sum(r * z, -1, keepdims=True) + 2 * qh * jnp.sum(zh * z, -1, keepdims=True)
  out = rotated * sg(q_norm / (z_norm + eps))
  return out + sg(q - out)  # exact q forward, whatever the rounding


class RQVAE(nnx.Module):
  def __init__(self, cfg: RQVAEConfig, *, rngs: nnx.Rngs):
    dims = (cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim)
    self.encoder = MLP(dims, dropout=cfg.dropout, rngs=rngs)
    self.decoder = MLP(dims[::-1], dropout=cfg.dropout, rngs=rngs)
    # Random until `kmeans_init` replaces them; one [L, K, D] array (AdamW decays
    # matrices only, so the codebooks are never pulled towards zero).
    self.codebooks = nnx.Param(jax.random.normal(
        rngs.params(), (cfg.num_levels, cfg.codebook_size, cfg.latent_dim)) / np.sqrt(cfg.latent_dim))
    self.gradient = cfg.gradient

  def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> dict:
    z = self.encoder(x, deterministic=deterministic, rngs=rngs)
    codes, chosen, residuals = residual_quantize(self.codebooks[...], z)
    q = jnp.sum(chosen, 0)
    path = straight_through if self.gradient == "ste" else rotation_trick
    x_hat = self.decoder(path(z, q), deterministic=deterministic, rngs=rngs)
    return dict(z=z, q=q, codes=codes, chosen=chosen, residuals=residuals, x_hat=x_hat)


def rqvae_loss(out: dict, x, beta: float):
  """(loss, metrics): reconstruction MSE + sum over levels of the codebook loss
  |sg(r_l) - e_l|^2 and beta x the commitment loss |r_l - sg(e_l)|^2 (per-element means).
  The two have the same value (only their gradients differ): reported once, as `quantization`."""
  recon = jnp.mean(jnp.square(out["x_hat"] - x))
  r, e = out["residuals"], out["chosen"]
  codebook = jnp.sum(jnp.mean(jnp.square(sg(r) - e), axis=(1, 2)))
  commitment = jnp.sum(jnp.mean(jnp.square(r - sg(e)), axis=(1, 2)))
  loss = recon + codebook + beta * commitment
  return loss, dict(loss=loss, recon=recon, quantization=commitment)


# -- k-means ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "iters"))  # one compilation per shape, shared by fits
def kmeans(x, k: int, *, key, iters: int = 10):
  """Lloyd's algorithm with k-means++ seeding, in JAX: (centroids [k, D], assignment [N]).

  An empty cluster keeps its previous centroid. With fewer than k distinct points some
  centroids repeat (their codes stay unused until a dead-code restart).
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)
  centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.sum(jnp.square(x - x[first]), -1)

  def seed(i, carry):  # k-means++: the next centroid drawn with probability ~ d^2
    centroids, d2 = carry
    logits = jnp.log(jnp.where(jnp.sum(d2) > 0, d2, 1.0))
    j = jax.random.categorical(keys[i], logits)
    return centroids.at[i].set(x[j]), jnp.minimum(d2, jnp.sum(jnp.square(x - x[j]), -1))

  centroids, _ = jax.lax.fori_loop(1, k, seed, (centroids, d2))

  def lloyd(_, centroids):
    a = nearest(x, centroids)
    sums = jax.ops.segment_sum(x, a, k)
    counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), a, k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)

  centroids = jax.lax.fori_loop(0, iters, lloyd, centroids)
  return centroids, nearest(x, centroids)


def kmeans_init(model: RQVAE, x, *, key, iters: int):
  """Sets each level's codebook to k-means centroids of that level's residuals of x
  (encoded without dropout), level by level."""
  r = model.encoder(x, deterministic=True)
  books = []
  for k in jax.random.split(key, model.codebooks.shape[0]):
    centroids, a = kmeans(r, model.codebooks.shape[1], key=k, iters=iters)
    books.append(centroids)
    r = r - centroids[a]
  model.codebooks[...] = jnp.stack(books)


# -- training ------------------------------------------------------------------------


@dataclasses.dataclass
class RQVAEResult:
  model: RQVAE
  codes: np.ndarray  # [N, L] int32, one row per input row
  metrics: dict
  history: list[dict]  # per logged chunk: step and mean loss terms


def _optimizer(cfg: RQVAEConfig):
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.1)
  # Weight decay on the Linear kernels only (not biases, LayerNorm, or the 3-d codebooks).
  mask = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)
  return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=mask)


def _batch_rows(step, n: int, batch_size: int, key):
  """Row indices of `step`'s batch: a fresh permutation per epoch (drop-last), a pure
  function of (key, step) so a run is reproducible from its seed."""
  per_epoch = n // batch_size
  perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
  return jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch_size,), (batch_size,))


def _restart_dead_codes(codebooks, usage, residuals, key, due):
  """When `due`: every code unused since the last check becomes a random residual of the
  current batch at its level; usage counters reset. Returns (codebooks, usage, restarted)."""
  num_levels, k, _ = codebooks.shape
  pick = jax.random.randint(key, (num_levels, k), 0, residuals.shape[1])
  replacement = jnp.take_along_axis(residuals, pick[..., None], axis=1)
  dead = (usage == 0) & due
  codebooks = jnp.where(dead[..., None], replacement, codebooks)
  return codebooks, jnp.where(due, 0, usage), jnp.sum(dead)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "n", "batch_size", "length"), donate_argnums=0)
def _run_chunk(carry, data, keys, *, graphdef, cfg: RQVAEConfig, n: int, batch_size: int, length: int):
  """`length` training steps in one call (lax.scan: no host work between steps). Module
  level, with the configuration static, so fits of one shape share the compilation."""
  key_data, key_dropout, key_dead = keys
  tx = _optimizer(cfg)

  def step_fn(carry, _):
    params, opt_state, usage, restarted, step = carry
    xb = data[_batch_rows(step, n, batch_size, key_data)]

    def loss_fn(params):
      out = nnx.merge(graphdef, params)(
          xb, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.fold_in(key_dropout, step)))
      loss, metrics = rqvae_loss(out, xb, cfg.beta)
      return loss, (metrics, out)

    (_, (metrics, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    usage = usage + jax.vmap(lambda c: jnp.bincount(c, length=cfg.codebook_size), 1)(out["codes"])
    if cfg.dead_code_every:
      net = nnx.merge(graphdef, params)
      due = ((step + 1) % cfg.dead_code_every == 0) & (step < int(0.9 * cfg.steps))
      books, usage, count = _restart_dead_codes(net.codebooks[...], usage, sg(out["residuals"]),
                                                jax.random.fold_in(key_dead, step), due)
      net.codebooks[...] = books
      params, restarted = nnx.state(net), restarted + count
    return (params, opt_state, usage, restarted, step + 1), metrics

  carry, metrics = jax.lax.scan(step_fn, carry, None, length=length)
  return carry, jax.tree.map(jnp.mean, metrics)


def train_rqvae(x: np.ndarray, cfg: RQVAEConfig, *, log: Callable[[str], None] | None = None,
                checkpoint_every: int = 0, restore: Callable | None = None,
                save: Callable | None = None) -> RQVAEResult:
  """Trains an RQ-VAE on the rows of x [N, D] (already standardized); deterministic
  given cfg.seed. Returns the model, every row's codes and the metrics of `evaluate`.

  Resumable without knowing about files: the whole training state is one pytree
  (params, optimizer state, code usage, restart count, step). `restore(template)` may
  return (state, history) saved earlier; `save(step, state, history)` is called every
  `checkpoint_every` steps (0 = never; chunks end on those steps). Every batch, dropout
  mask and dead-code restart is a function of (seed, step), so a resumed run ends with the
  same parameters as an uninterrupted one.
  """
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[1] != cfg.input_dim:
    raise ValueError(f"expected embeddings [N, {cfg.input_dim}], got {x.shape}")
  n = x.shape[0]
  batch_size = min(cfg.batch_size, n)
  key_params, key_init, key_data, key_dropout, key_dead = jax.random.split(jax.random.key(cfg.seed), 5)
  model = RQVAE(cfg, rngs=nnx.Rngs(params=key_params))
  data = jnp.asarray(x)
  graphdef, params = nnx.split(model)
  tx = _optimizer(cfg)
  keys = (key_data, key_dropout, key_dead)
  run_chunk = functools.partial(_run_chunk, graphdef=graphdef, cfg=cfg, n=n, batch_size=batch_size)

  def initial():
    return (params, tx.init(params), jnp.zeros((cfg.num_levels, cfg.codebook_size), jnp.int32),
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  restored = restore(initial()) if restore else None
  if restored is not None:
    carry, history = restored
    done = int(carry[4])
    if log:
      log(f"rqvae: resuming at step {done}/{cfg.steps}")
  else:
    kmeans_init(model, data[_batch_rows(0, n, batch_size, key_data)], key=key_init, iters=cfg.kmeans_iters)
    params = nnx.state(model)
    carry, history, done = initial(), [], 0
  start = time.perf_counter()
  while done < cfg.steps:
    length = min(cfg.log_every, cfg.steps - done)
    if checkpoint_every:
      length = min(length, checkpoint_every - done % checkpoint_every)
    carry, metrics = run_chunk(carry, data, keys, length=length)
    done += length
    row = {"step": done, **{k: round(float(v), 5) for k, v in metrics.items()}}
    history.append(row)
    if log:
      log(f"rqvae step {done}/{cfg.steps}: loss {row['loss']:.4f} recon {row['recon']:.4f} "
          f"quantization {row['quantization']:.4f} "
          f"({time.perf_counter() - start:.0f}s)")
    if save and checkpoint_every and done % checkpoint_every == 0 and done < cfg.steps:
      save(done, carry, history)
  params = carry[0]
  model = nnx.merge(graphdef, params)
  codes, metrics = evaluate(model, x)
  metrics.update(train_seconds=round(time.perf_counter() - start, 1), steps=cfg.steps,
                 batch_size=batch_size, dead_codes_restarted=int(carry[3]))
  return RQVAEResult(model=model, codes=codes, metrics=metrics, history=history)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _evaluate_chunk(state, xb, *, graphdef):
  out = nnx.merge(graphdef, state)(xb)
  return (out["codes"], jnp.sum(jnp.square(out["x_hat"] - xb), -1),
          jnp.sum(jnp.square(out["z"] - out["q"]), -1), jnp.sum(jnp.square(out["z"]), -1))


def evaluate(model: RQVAE, x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, dict]:
  """(codes [N, L], metrics) of every row without dropout: reconstruction MSE through
  the quantised path (per element, in standardized units), the latent's quantisation
  error relative to its energy, and the code metrics of `code_metrics`."""
  graphdef, state = nnx.split(model)
  run = functools.partial(_evaluate_chunk, graphdef=graphdef)

  x = np.asarray(x, np.float32)
  n, rows = len(x), min(chunk, len(x))
  parts = []
  for s in range(0, n, rows):  # fixed-size chunks: one compilation
    xb = x[s:s + rows]
    out = run(state, np.pad(xb, ((0, rows - len(xb)), (0, 0))))
    parts.append([np.asarray(o)[:len(xb)] for o in out])
  codes, recon, qerr, energy = (np.concatenate(p) for p in zip(*parts))
  metrics = {"reconstruction_mse": round(float(recon.sum() / x.size), 5),
             "latent_quantization_error": round(float(qerr.sum() / max(energy.sum(), 1e-12)), 5),
             **code_metrics(codes, int(model.codebooks.shape[1]))}
  return codes.astype(np.int32), metrics


# -- codes -> unique IDs -----------------------------------------------------------------


def _prefix_groups(codes: np.ndarray, item_ids: np.ndarray):
  """(order, rank): rows sorted by (prefix, item id), and each row's rank within its prefix."""
  order = np.lexsort((item_ids, *codes.T[::-1]))
  sorted_codes = codes[order]
  new = np.r_[True, np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)] if len(codes) else np.zeros(0, bool)
  pos = np.arange(len(codes))
  start = np.maximum.accumulate(np.where(new, pos, 0)) if len(codes) else pos
  rank = np.empty(len(codes), np.int64)
  rank[order] = pos - start
  return order, rank


def code_metrics(codes: np.ndarray, codebook_size: int) -> dict:
  """Per-level usage (distinct codes used / codes), the collision rate (fraction of items
  whose full prefix is shared with another item), the fraction of items with a unique
  prefix (1 - collision rate), distinct prefixes / items, and the largest prefix group."""
  codes = np.asarray(codes)
  n = len(codes)
  _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  shared = counts[inverse.reshape(-1)] > 1
  return {
      "items": n,
      "codebook_usage": [round(len(np.unique(codes[:, l])) / codebook_size, 4) for l in range(codes.shape[1])],
      "collision_rate": round(float(shared.mean()), 5),
      "unique_fraction": round(1.0 - float(shared.mean()), 5),
      "distinct_prefixes_fraction": round(len(counts) / n, 5),
      "max_items_per_prefix": int(counts.max()),
  }


def add_unique_level(codes: np.ndarray, size: int, item_ids: np.ndarray | None = None) -> np.ndarray:
  """codes [N, L] -> [N, L + 1]: the items sharing a prefix get 0, 1, 2, ... in item-id
  order (item_ids defaults to the row index), so every row becomes unique. Raises when a
  prefix holds more than `size` items."""
  codes = np.asarray(codes, np.int32)
  item_ids = np.arange(len(codes)) if item_ids is None else np.asarray(item_ids)
  order, rank = _prefix_groups(codes, item_ids)
  if len(rank) and rank.max() >= size:
    worst = int(np.argmax(rank))
    over = int(np.sum(rank == size))
    raise ValueError(f"semantic-ID prefix {tuple(int(c) for c in codes[worst])} holds {rank[worst] + 1} "
                     f"items but the unique level has only {size} codes ({over} prefix(es) overflow); "
                     "train longer, use more codes per level, or a larger unique level")
  return np.concatenate([codes, rank[:, None].astype(np.int32)], 1)


def token_offsets(sizes: Sequence[int]) -> list[int]:
  """Level l's code c is token offsets[l] + c; tokens 0/1 are pad/eos."""
  return [NUM_SPECIAL + int(sum(sizes[:l])) for l in range(len(sizes))]


class PrefixTrie:
  """The valid semantic IDs as a prefix trie over level-local codes (constrained decoding)."""

  def __init__(self, codes: np.ndarray):
    codes = np.unique(np.asarray(codes, np.int64), axis=0)
    self.num_levels = codes.shape[1]
    self._children: dict[tuple, np.ndarray] = {}
    for depth in range(self.num_levels):
      heads = np.unique(codes[:, :depth + 1], axis=0)  # sorted: children grouped by prefix
      prefix = heads[:, :depth]
      split = np.flatnonzero(np.any(prefix[1:] != prefix[:-1], axis=1)) + 1 if depth else []
      for group in np.split(heads, split):
        self._children[tuple(int(c) for c in group[0, :depth])] = group[:, depth].astype(np.int32)

  def valid_next(self, prefix: Sequence[int] = ()) -> np.ndarray:
    """Sorted codes that may follow `prefix` (empty for a full or an invalid prefix)."""
    return self._children.get(tuple(int(c) for c in prefix), np.zeros(0, np.int32))

  def __contains__(self, codes) -> bool:
    codes = tuple(int(c) for c in codes)
    return len(codes) == self.num_levels and codes[-1] in self.valid_next(codes[:-1])


@dataclasses.dataclass
class SemanticIds:
  """Semantic IDs of a prepared dataset's items: codes [vocab_size, L] (rows 0/1 = -1)."""

  codes: np.ndarray
  metadata: dict

  @property
  def codebook_sizes(self) -> list[int]:
    return self.metadata["codebook_sizes"]

  @property
  def offsets(self) -> np.ndarray:
    return np.asarray(self.metadata["offsets"], np.int32)

  @property
  def vocab_size(self) -> int:
    """Tokens: pad, eos and every level's codes."""
    return self.metadata["vocab_size"]

  @property
  def tokens(self) -> np.ndarray:
    return np.where(self.codes >= 0, self.codes + self.offsets, -1).astype(np.int32)

  @functools.cached_property
  def trie(self) -> PrefixTrie:
    return PrefixTrie(self.codes[NUM_RESERVED_ITEMS:])

  @functools.cached_property
  def _items(self) -> dict[tuple, int]:
    return {tuple(row): i for i, row in enumerate(self.codes.tolist()) if i >= NUM_RESERVED_ITEMS}

  def item_of(self, codes: Sequence[int]) -> int | None:
    """The item id with these level-local codes, or None."""
    return self._items.get(tuple(int(c) for c in codes))


# -- input scaling ----------------------------------------------------------------------


def standardize(x: np.ndarray, eps: float = 1e-6):
  """(x - mean) / std per dimension; returns (standardized, mean, std)."""
  mean, std = x.mean(0), x.std(0)
  return ((x - mean) / (std + eps)).astype(np.float32), mean, std


__all__ = ["RQVAEConfig", "RQVAE", "kmeans", "train_rqvae", "add_unique_level", "code_metrics",
           "token_offsets", "PrefixTrie", "SemanticIds", "standardize"]
