"""A T5-family encoder (T5, T5 v1.1, mT5, Flan-T5) in Flax NNX, loading Hugging Face
safetensors checkpoints.

Matches `transformers.T5EncoderModel`: token embedding -> N pre-norm blocks
(RMSNorm -> self-attention with a bucketed relative position bias -> residual;
RMSNorm -> FFN -> residual) -> final RMSNorm. T5 conventions: RMSNorm has no mean
centering and no bias; attention logits are not scaled by 1/sqrt(d) (the scale is folded
into the initialisation); the relative position bias lives in the first layer and is
shared by all layers; the FFN is ReLU (original T5) or gated-GELU with the tanh
approximation (v1.1 / mT5 / Flan-T5), per `feed_forward_proj`.

`RMSNorm`, `T5Attention` (optional relative bias, optional cross-attention input) and
`T5FeedForward` are separate so a decoder can reuse them.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import layers
from recjax.models.text import checkpoint as ckpt

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
_ACTIVATIONS = {"relu": jax.nn.relu,
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    act = self.feed_forward_proj.split("-")[-1]
    # Hugging Face maps "gated-gelu" to the tanh approximation (`gelu_new`), as in mesh TF.
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

  @classmethod
  def from_dict(cls, config: dict) -> "T5Config":
    model_type = config.get("model_type", "t5")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported T5 model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    cfg = cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})
    parts = cfg.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or cfg.activation not in _ACTIVATIONS:
      raise ValueError(f"unsupported feed_forward_proj {cfg.feed_forward_proj!r}: use 'relu', "
                       "'gated-gelu' or '[gated-]ACT' with ACT in " + str(sorted(_ACTIVATIONS)))
    return cfg


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, statistics in float32 (T5LayerNorm)."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.scale = nnx.Param(layers.param_init(nnx.initializers.ones_init(), "embed")(
        jax.random.key(0), (dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(self.dtype)


def relative_position_buckets(q_len: int, k_len: int, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """int32 [q_len, k_len] bucket of each (key - query) offset, computed once per shape.

  Exact buckets for small offsets, log-spaced up to `max_distance`, the last bucket beyond;
  bidirectional uses half the buckets per direction. float32 like Hugging Face, so the
  bucket edges agree.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(rel.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact))
  large = np.minimum(np.where(rel < max_exact, 0, large).astype(np.int64), num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5Attention(nnx.Module):
  """Multi-head attention without logit scaling; optional relative position bias."""

  def __init__(self, cfg: T5Config, *, has_relative_bias: bool, bidirectional: bool = True,
               rngs: nnx.Rngs, dtype=jnp.float32):
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    proj = lambda din, dout, names, std: layers.dense(din, dout, names, rngs=rngs, dtype=dtype,
                                                      use_bias=False, std=std)
    # T5's init: the missing 1/sqrt(d_kv) logit scale is folded into the query init.
    self.q = proj(d, inner, ("embed", "heads"), (d * cfg.d_kv) ** -0.5)
    self.k = proj(d, inner, ("embed", "heads"), d ** -0.5)
    self.v = proj(d, inner, ("embed", "heads"), d ** -0.5)
    self.o = proj(inner, d, ("heads", "embed"), inner ** -0.5)
    self.relative_bias = nnx.Embed(
        cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32,
        embedding_init=layers.param_init(nnx.initializers.normal(d ** -0.5), None, "heads"),
        rngs=rngs) if has_relative_bias else None
    self.num_heads, self.d_kv, self.dtype = cfg.num_heads, cfg.d_kv, dtype
    self.bidirectional = bidirectional
    self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance

  def position_bias(self, q_len: int, k_len: int) -> jax.Array:
    """float32 [1, H, q_len, k_len]; only the layer that owns the bias table computes it."""
    buckets = relative_position_buckets(q_len, k_len, bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.transpose(self.relative_bias.embedding[...][buckets], (2, 0, 1))[None]

  def position_bias_at(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """float32 [B, H, Lq, Lk] of per-token positions [B, Lq], [B, Lk] (packed rows restart
    them at every segment). Buckets come from the same table as `position_bias`, so an
    unpacked row with positions 0..L-1 gets exactly its bias."""
    n = max(q_positions.shape[1], k_positions.shape[1])
    # Row n-1 of the [n, 2n-1] buckets: offset o (key - query, |o| < n) at index o + n - 1.
    table = relative_position_buckets(n, 2 * n - 1, bidirectional=self.bidirectional,
                                      num_buckets=self.num_buckets, max_distance=self.max_distance)[n - 1]
    offsets = k_positions[:, None, :] - q_positions[:, :, None]
    buckets = jnp.asarray(table)[jnp.clip(offsets + n - 1, 0, 2 * n - 2)]
    return jnp.transpose(self.relative_bias.embedding[...][buckets], (0, 3, 1, 2))

  def __call__(self, x, mask, bias, kv=None):
    """`mask` bool [B, 1|H, Lq, Lk]; `bias` float32 broadcastable to [B, H, Lq, Lk] or None."""
    kv = x if kv is None else kv
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(kv)), split(self.v(kv))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:2], -1)
    return self.o(out)


def same_segment(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """bool [B, 1, Lq, Lk]: query and key in the same packed example (key not padding)."""
  return ((q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0))[:, None]


class T5FeedForward(nnx.Module):
  """wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    up = lambda: layers.dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                              use_bias=False, std=cfg.d_model ** -0.5)
    self.wi = up()
    self.wi_gate = up() if cfg.gated else None
    self.wo = layers.dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                           use_bias=False, std=cfg.d_ff ** -0.5)
    self.act = _ACTIVATIONS[cfg.activation]

  def __call__(self, x):
    h = self.act(self.wi(x))
    if self.wi_gate is not None:
      h = h * self.wi_gate(x)
    return self.wo(h)


class T5EncoderBlock(nnx.Module):
  def __init__(self, cfg: T5Config, *, has_relative_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
    self.attention_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.attention = T5Attention(cfg, has_relative_bias=has_relative_bias, rngs=rngs, dtype=dtype)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.ffn = T5FeedForward(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, mask, bias):
    x = x + self.attention(self.attention_norm(x), mask, bias)
    return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                           embedding_init=layers.param_init(nnx.initializers.normal(1.0), "vocab", "embed"),
                           rngs=rngs)
    self.blocks = nnx.List([T5EncoderBlock(cfg, has_relative_bias=(i == 0), rngs=rngs, dtype=dtype)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.config, self.dtype = cfg, dtype

  def __call__(self, ids: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Last hidden states [B, T, d_model] of `ids` [B, T] with padding `mask` (1 = token);
    packed rows also give `segment_ids` (1.. per example, 0 = padding) and `positions`."""
    return self.encode_embeddings(self.embed(ids), mask, segment_ids, positions)

  def encode_embeddings(self, x: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None,
                        positions: jax.Array | None = None) -> jax.Array:
    """The blocks over input vectors x [B, T, d_model] (models with their own inputs).
    With `segment_ids` a token attends only within its own segment (packed examples never
    see each other) and relative positions come from `positions`."""
    x = x.astype(self.dtype)
    t = x.shape[1]
    attention = self.blocks[0].attention
    if segment_ids is None:
      bias = attention.position_bias(t, t)  # shared by every layer
      attend = (mask > 0)[:, None, None, :]
    else:
      bias = attention.position_bias_at(positions, positions)
      attend = same_segment(segment_ids, segment_ids)
    for block in self.blocks:
      x = block(x, attend, bias)
    return self.final_norm(x)


def _load_weights(model: T5Encoder, tensors: dict, directory) -> None:
  """Fills the (abstract) encoder from Hugging Face T5 names; every tensor must be used."""
  assign_encoder(model, tensors, directory)
  ckpt.check_consumed(tensors, model, directory)


def assign_linear(dense: nnx.Linear, tensors: dict, name: str, directory) -> None:
  """torch Linear weights are [out, in], ours [in, out]."""
  ckpt.assign(dense.kernel, ckpt.take(tensors, name + ".weight", directory).T, name)


def assign_ffn(ffn: T5FeedForward, tensors: dict, prefix: str, directory) -> None:
  """`prefix` ends in 'DenseReluDense.'; Hugging Face's gated FFN is act(wi_0 x) * wi_1 x."""
  if ffn.wi_gate is None:
    assign_linear(ffn.wi, tensors, prefix + "wi", directory)
  else:
    assign_linear(ffn.wi, tensors, prefix + "wi_0", directory)
    assign_linear(ffn.wi_gate, tensors, prefix + "wi_1", directory)
  assign_linear(ffn.wo, tensors, prefix + "wo", directory)


def assign_encoder(model: T5Encoder, tensors: dict, directory) -> None:
  """Pops the encoder's tensors (and `shared.weight`) from `tensors` into the model."""
  take = lambda name: ckpt.take(tensors, name, directory)
  linear = lambda dense, name: assign_linear(dense, tensors, name, directory)
  embed = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in tensors else "shared.weight"
  ckpt.assign(model.embed.embedding, take(embed), embed)
  tensors.pop("shared.weight", None)  # tied copy of encoder.embed_tokens
  for i, block in enumerate(model.blocks):
    p = f"encoder.block.{i}.layer."
    for name in "qkvo":
      linear(getattr(block.attention, name), f"{p}0.SelfAttention.{name}")
    if block.attention.relative_bias is not None:
      name = f"{p}0.SelfAttention.relative_attention_bias.weight"
      ckpt.assign(block.attention.relative_bias.embedding, take(name), name)
    ckpt.assign(block.attention_norm.scale, take(f"{p}0.layer_norm.weight"), f"{p}0.layer_norm")
    assign_ffn(block.ffn, tensors, f"{p}1.DenseReluDense.", directory)
    ckpt.assign(block.ffn_norm.scale, take(f"{p}1.layer_norm.weight"), f"{p}1.layer_norm")
  ckpt.assign(model.final_norm.scale, take("encoder.final_layer_norm.weight"), "encoder.final_layer_norm")


class T5Tokenizer:
  """SentencePiece ids + EOS, as Hugging Face's T5Tokenizer (pad 0, eos 1)."""

  def __init__(self, model_file, *, pad_id: int = 0, eos_id: int = 1):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    self.pad_id, self.eos_id = pad_id, eos_id

  def encode_batch(self, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids + EOS, truncated to `max_length` (EOS kept) and padded: int32 ids, mask [N, max_length]."""
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, pieces in enumerate(self.sp.encode(list(texts))):
      tokens = pieces[:max_length - 1] + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


@dataclasses.dataclass
class LoadedT5:
  model: T5Encoder
  tokenizer: T5Tokenizer | None  # None when the directory has no spiece.model
  files: list[pathlib.Path]
  directory: pathlib.Path


def load_t5_encoder(path, *, dtype=jnp.float32) -> LoadedT5:
  """The encoder of a Hugging Face T5 / mT5 checkpoint directory (config.json,
  model.safetensors or a sharded index, spiece.model); decoder tensors are skipped."""
  directory = ckpt.checkpoint_dir(path)
  cfg = T5Config.from_dict(ckpt.read_config(directory))
  files = ckpt.weight_files(directory)
  tensors = ckpt.load_tensors(directory, keep=lambda n: n.startswith("encoder.") or n == "shared.weight")
  model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  _load_weights(model, tensors, directory)
  spm = directory / "spiece.model"
  tokenizer = T5Tokenizer(spm) if spm.is_file() else None
  files = files + [directory / "config.json"] + ([spm] if tokenizer else [])
  return LoadedT5(model, tokenizer, files, directory)

