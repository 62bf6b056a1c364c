"""Transformer building blocks (Flax NNX) shared by every model.

Conventions:
  * parameters are float32 and carry logical axis names (`nnx.with_partitioning`); the
    mesh rules in `recjax.train.mesh` map them to devices;
  * matmuls run in `dtype` (the compute dtype: bfloat16 on TPU/GPU, float32 on CPU);
    attention softmax and layer-norm statistics run in float32;
  * packed rows: `segment_ids` (0 = padding) decide who may attend to whom.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype


def param_init(init, *names):
  """An initializer whose parameter carries logical axis `names`."""
  return nnx.with_partitioning(init, names)


def dense(din: int, dout: int, names: tuple, *, rngs: nnx.Rngs, dtype=jnp.float32,
          use_bias: bool = True, std: float = 0.02) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=param_init(nnx.initializers.truncated_normal(std), *names),
                    bias_init=param_init(nnx.initializers.zeros_init(), names[-1]), rngs=rngs)


def layer_norm(dim: int, *, rngs: nnx.Rngs, eps: float = 1e-12) -> nnx.LayerNorm:
  # dtype=float32: the statistics stay in float32 whatever the compute dtype.
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                       scale_init=param_init(nnx.initializers.ones_init(), "embed"),
                       bias_init=param_init(nnx.initializers.zeros_init(), "embed"), rngs=rngs)


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
  """[B, 1, Lq, Lk] boolean: attend only within the same non-padding segment."""
  kv_segments = q_segments if kv_segments is None else kv_segments
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
  if causal:
    lq, lk = q_segments.shape[1], kv_segments.shape[1]
    mask &= jnp.tril(jnp.ones((lq, lk), bool))
  return mask[:, None]


def relative_position_bias(table: jax.Array, positions: jax.Array, *, causal: bool) -> jax.Array:
  """[B, heads, L, L] float32 attention bias looked up by query-minus-key position.

  `table` [heads, R]: causal, R = max_length (distances 0 .. R-1, the past only); else
  R = 2 * max_length - 1 (signed distances, index d + max_length - 1). Distances past the
  table share its last entry. `positions` are per-segment, so packed rows are exact.
  """
  heads, r = table.shape
  d = positions[:, :, None] - positions[:, None, :]
  if causal:
    idx = jnp.clip(d, 0, r - 1)
  else:
    half = (r - 1) // 2
    idx = jnp.clip(d, -half, half) + half
  return jnp.moveaxis(table.astype(jnp.float32)[:, idx], 0, 1)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with a boolean mask; softmax statistics in float32."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               dropout: float = 0.0, kv_dim: int | None = None):
    if dim % num_heads:
      raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim, self.dtype = num_heads, dim // num_heads, dtype
    kv_dim = kv_dim or dim
    self.query = dense(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.key = dense(kv_dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.value = dense(kv_dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.out = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, mask: jax.Array, kv: jax.Array | None = None, *,
               deterministic: bool, rngs: nnx.Rngs | None = None, bias: jax.Array | None = None) -> jax.Array:
    """`bias`: float32 [B, heads, Lq, Lk] added to the logits (relative positions)."""
    kv = x if kv is None else kv
    b, lq, _ = x.shape
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # Fully masked rows (padding queries) would average garbage; zero them instead.
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, -1)
    return self.out(out)


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, dropout: float = 0.0):
    self.up = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.down = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None = None):
    h = jax.nn.gelu(self.up(x), approximate=False)
    return self.down(self.dropout(h, deterministic=deterministic, rngs=rngs))


class TransformerBlock(nnx.Module):
  """Post-LN block as in BERT / BERT4Rec: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(MLP(x)))."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               dropout: float = 0.1, attention_dropout: float = 0.1):
    self.attention = MultiHeadAttention(dim, num_heads, rngs=rngs, dtype=dtype, dropout=attention_dropout)
    self.mlp = MLP(dim, mlp_dim, rngs=rngs, dtype=dtype, dropout=dropout)
    self.norm1 = layer_norm(dim, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.dtype = dtype

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None = None, bias=None):
    h = self.attention(x, mask, deterministic=deterministic, rngs=rngs, bias=bias)
    x = self.norm1(x + self.dropout(h, deterministic=deterministic, rngs=rngs)).astype(self.dtype)
    h = self.mlp(x, deterministic=deterministic, rngs=rngs)
    return self.norm2(x + self.dropout(h, deterministic=deterministic, rngs=rngs)).astype(self.dtype)
