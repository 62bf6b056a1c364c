"""A Gemma (1) decoder-only language model in Flax NNX, loading Hugging Face safetensors
checkpoints (`GemmaForCausalLM` names), with KV-cached decoding.

Matches `transformers.GemmaForCausalLM`: token embedding scaled by sqrt(hidden_size) ->
N pre-norm blocks (RMSNorm -> causal self-attention with RoPE -> residual; RMSNorm ->
GeGLU MLP -> residual) -> final RMSNorm -> LM head tied to the embedding. Gemma
conventions: RMSNorm scales by (1 + w); attention logits scale by head_dim**-0.5; the
KV heads are shared by groups of query heads (1 KV head = multi-query, as Gemma 2B).

Inputs are token ids or input vectors [B, T, hidden] (`inputs_embeds`, already in the
scaled embedding space, as Hugging Face: build them with `model.embed(ids)` and replace
or prepend rows). Positions are explicit; by default they count the real tokens of each
row (cumsum(mask) - 1), so left-padded prompts see the same positions as unpadded ones.

Decoding: `init_cache` -> `prefill` (a prompt, or chunks of one) -> `decode_step`.
`decode_step(cache, tokens) -> (logits, cache)` is the `step_fn(state, tokens)` of a
generic search; every leaf of the cache has the batch as its leading axis, so a beam
search can expand or reorder it with `jax.tree.map`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import layers
from recjax.models.text import checkpoint as ckpt

SUPPORTED_MODEL_TYPES = ("gemma",)
# Released Gemma 1 configs say "gelu" but mean the tanh approximation (as Hugging Face reads it).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  vocab_size: int = 256000
  hidden_size: int = 2048
  intermediate_size: int = 16384
  num_hidden_layers: int = 18
  num_attention_heads: int = 8
  num_key_value_heads: int = 1
  head_dim: int = 256
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  hidden_activation: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 8192
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: int = 1

  @property
  def groups(self) -> int:
    """Query heads per KV head."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_dict(cls, config: dict) -> "GemmaConfig":
    model_type = config.get("model_type", "gemma")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported Gemma model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES} "
                       "(Gemma 2/3 add logit soft-capping, sliding windows and extra norms)")
    plain = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "rms_norm_eps", "max_position_embeddings")
    values = {name: config[name] for name in plain if config.get(name) is not None}
    heads = values.get("num_attention_heads", cls.num_attention_heads)
    values["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    values["head_dim"] = config.get("head_dim") or values.get("hidden_size", cls.hidden_size) // heads
    act = config.get("hidden_activation") or config.get("hidden_act") or cls.hidden_activation
    if act not in _TANH_GELU:
      raise ValueError(f"unsupported Gemma activation {act!r}; supported: {_TANH_GELU} (tanh-approximate GELU)")
    values["hidden_activation"] = act
    # transformers 5 nests rope_theta in rope_parameters; older configs keep it at the top.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"unsupported RoPE type {rope_type!r}; only 'default' (no scaling) is implemented")
    values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", cls.rope_theta)))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
      token = config.get(name)
      if isinstance(token, (list, tuple)):  # several EOS ids: the first is the canonical one
        token = token[0] if token else None
      if token is not None:
        values[name] = int(token)
    if config.get("attention_bias"):
      raise ValueError("attention_bias=true is not supported (Gemma projections have no bias)")
    if config.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention=true is not supported: this is a causal LM")
    if not config.get("tie_word_embeddings", True):
      raise ValueError("tie_word_embeddings=false is not supported: Gemma ties the LM head to the embedding")
    if heads % values["num_key_value_heads"]:
      raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                       f"{values['num_key_value_heads']}")
    return cls(**values)


class GemmaRMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + w), in float32 and cast after the scale (as HF)."""

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
    self.scale = nnx.Param(layers.param_init(nnx.initializers.zeros_init(), "embed")(
        jax.random.key(0), (dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + self.scale[...])).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of x [B, T, N, D] at positions [B, T], Hugging Face's rotate_half
  layout (dimension i pairs with i + D/2); angles in float32, cos/sin cast to x's dtype."""
  d = x.shape[-1]
  inv_freq = 1.0 / (jnp.float32(theta) ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class GemmaAttention(nnx.Module):
  """Causal self-attention with RoPE and grouped KV heads."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    proj = lambda din, dout, names: layers.dense(din, dout, names, rngs=rngs, dtype=dtype, use_bias=False)
    self.q = proj(d, h * hd, ("embed", "heads"))
    # Few KV heads (1 for multi-query) cannot be split over the model axis: "kv" is replicated.
    self.k = proj(d, k * hd, ("embed", "kv"))
    self.v = proj(d, k * hd, ("embed", "kv"))
    self.o = proj(h * hd, d, ("heads", "embed"))
    self.kv_heads, self.groups, self.head_dim = k, cfg.groups, hd
    self.theta, self.dtype = cfg.rope_theta, dtype

  def __call__(self, x, positions, mask, cache_kv=None, slots=None):
    """x [B, T, D] at `positions` [B, T]; `mask` bool [B, T, S] over the keys (the T new
    ones, or the S cache slots). With `cache_kv` = (k, v) [B, S, K, hd], the new keys are
    written at `slots` [B, T] first. Returns (out [B, T, D], updated (k, v) or None)."""
    b, t, _ = x.shape
    q = rope(self.q(x).reshape(b, t, self.kv_heads * self.groups, self.head_dim), positions, self.theta)
    k = rope(self.k(x).reshape(b, t, self.kv_heads, self.head_dim), positions, self.theta)
    v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
    if cache_kv is not None:
      rows = jnp.arange(b)[:, None]
      k = cache_kv[0].at[rows, slots].set(k.astype(cache_kv[0].dtype))
      v = cache_kv[1].at[rows, slots].set(v.astype(cache_kv[1].dtype))
      cache_kv = (k, v)
    # Query head h uses KV head h // groups (Hugging Face's repeat_kv order).
    q = q.reshape(b, t, self.kv_heads, self.groups, self.head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(self.dtype)).astype(jnp.float32)
    logits = logits * self.head_dim ** -0.5
    mask = mask[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    # Queries that see no key (left padding) would average garbage; zero them instead.
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype)).reshape(b, t, -1)
    return self.o(out), cache_kv


class GemmaMLP(nnx.Module):
  """down(gelu_tanh(gate x) * up x)."""

  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    proj = lambda din, dout, names: layers.dense(din, dout, names, rngs=rngs, dtype=dtype, use_bias=False)
    self.gate = proj(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.up = proj(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
    self.down = proj(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class GemmaBlock(nnx.Module):
  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.attention_norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.attention = GemmaAttention(cfg, rngs=rngs, dtype=dtype)
    self.mlp_norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.mlp = GemmaMLP(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, positions, mask, cache_kv=None, slots=None):
    h, cache_kv = self.attention(self.attention_norm(x), positions, mask, cache_kv, slots)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache_kv


class GemmaCache(NamedTuple):
  """Decoding state; every leaf is batch-major so a search can gather rows of it."""
  keys: tuple  # per layer [B, S, kv_heads, head_dim], RoPE applied
  values: tuple  # per layer [B, S, kv_heads, head_dim]
  valid: jax.Array  # bool [B, S]: slots holding a real token
  index: jax.Array  # int32 [B]: the next slot to write (equal across rows)
  position: jax.Array  # int32 [B]: the position of each row's next token


def default_positions(mask: jax.Array) -> jax.Array:
  """Positions counting each row's real tokens: cumsum(mask) - 1, 0 on leading padding
  (as Hugging Face's generate). Packed rows need explicit positions."""
  return jnp.maximum(jnp.cumsum(mask > 0, axis=-1) - 1, 0).astype(jnp.int32)


class Gemma(nnx.Module):
  def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.embedder = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                              embedding_init=layers.param_init(nnx.initializers.normal(0.02), "vocab", "embed"),
                              rngs=rngs)
    self.blocks = nnx.List([GemmaBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])
    self.final_norm = GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
    self.config, self.dtype = cfg, dtype

  def embed(self, ids: jax.Array) -> jax.Array:
    """Input vectors [..., hidden] of token ids: the embedding times sqrt(hidden), the
    normalizer rounded to the compute dtype first (as Hugging Face)."""
    return self.embedder(ids) * jnp.asarray(math.sqrt(self.config.hidden_size), self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits of final hidden states, through the tied embedding."""
    return self.embedder.attend(hidden).astype(jnp.float32)

  def _inputs(self, ids, inputs_embeds):
    if (ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of ids and inputs_embeds")
    return (self.embed(ids) if inputs_embeds is None else inputs_embeds).astype(self.dtype)

  def hidden_states(self, ids=None, mask=None, *, inputs_embeds=None, positions=None) -> jax.Array:
    """Final-norm hidden states [B, T, hidden] of ids [B, T] or inputs_embeds [B, T, hidden].

    `mask` [B, T]: 1 = token, 0 = padding, or segment ids for packed rows (attention stays
    within a segment; pass `positions` then). Attention is causal."""
    x = self._inputs(ids, inputs_embeds)
    mask = jnp.ones(x.shape[:2], jnp.int32) if mask is None else mask
    positions = default_positions(mask) if positions is None else positions
    attend = layers.segment_mask(mask, causal=True)[:, 0]
    for block in self.blocks:
      x, _ = block(x, positions, attend)
    return self.final_norm(x)

  def __call__(self, ids=None, mask=None, *, inputs_embeds=None, positions=None) -> jax.Array:
    """float32 logits [B, T, vocab]; logits[:, t] predict the token at t + 1."""
    return self.logits(self.hidden_states(ids, mask, inputs_embeds=inputs_embeds, positions=positions))

  # --- cached decoding ---------------------------------------------------------------------

  def init_cache(self, batch: int, max_length: int) -> GemmaCache:
    """An empty cache of `max_length` slots (prompt + new tokens; writes past it are dropped)."""
    cfg = self.config
    shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, self.dtype) for _ in range(cfg.num_hidden_layers))
    return GemmaCache(zeros(), zeros(), jnp.zeros((batch, max_length), bool),
                      jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

  def prefill(self, cache: GemmaCache, ids=None, mask=None, *, inputs_embeds=None,
              positions=None) -> tuple[jax.Array, GemmaCache]:
    """Appends T tokens (ids [B, T] or vectors [B, T, hidden], `mask` 1 = token) to the
    cache; a prompt may come in several chunks (e.g. soft prompt vectors, then text).
    Returns the float32 logits [B, vocab] after each row's last real token, and the cache."""
    x = self._inputs(ids, inputs_embeds)
    b, t = x.shape[:2]
    real = jnp.ones((b, t), bool) if mask is None else mask > 0
    if positions is None:
      positions = cache.position[:, None] + jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
    slots = cache.index[:, None] + jnp.arange(t)[None, :]
    valid = cache.valid.at[jnp.arange(b)[:, None], slots].set(real)
    # Causal over slots: a query sees the real tokens at its own slot and before.
    attend = valid[:, None, :] & (jnp.arange(valid.shape[1])[None, None, :] <= slots[:, :, None])
    keys, values = [], []
    for block, k, v in zip(self.blocks, cache.keys, cache.values):
      x, (k, v) = block(x, positions, attend, (k, v), slots)
      keys.append(k)
      values.append(v)
    count = real.sum(-1).astype(jnp.int32)
    last = jnp.where(count > 0, t - 1 - jnp.argmax(real[:, ::-1], axis=-1), t - 1)
    hidden = self.final_norm(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])
    cache = GemmaCache(tuple(keys), tuple(values), valid, cache.index + t,
                       jnp.where(count > 0, jnp.max(jnp.where(real, positions, -1), -1) + 1, cache.position))
    return self.logits(hidden), cache

  def decode_step(self, cache: GemmaCache, tokens: jax.Array) -> tuple[jax.Array, GemmaCache]:
    """step_fn(state, tokens [B]) -> (float32 logits [B, vocab] of the next token, state)."""
    return self.prefill(cache, tokens[:, None])

  def start_decoding(self, max_length: int, ids=None, mask=None, *, inputs_embeds=None,
                     positions=None) -> tuple[jax.Array, GemmaCache]:
    """A fresh cache of `max_length` slots with the prompt prefilled: (logits [B, vocab], cache)."""
    batch = (ids if inputs_embeds is None else inputs_embeds).shape[0]
    return self.prefill(self.init_cache(batch, max_length), ids, mask, inputs_embeds=inputs_embeds,
                        positions=positions)


class PromptState(NamedTuple):
  """State of `prompt_step_fn`: the cache holds the prompt but its last column, which the
  first step feeds instead of the search's start token."""
  cache: GemmaCache
  pending: jax.Array  # [B, hidden]: input vector of the last prompt column
  started: jax.Array  # bool [B]


def prompt_step_fn(model: Gemma, max_length: int, ids=None, mask=None, *, inputs_embeds=None):
  """(step_fn, state) for a generic search whose first step feeds one start token for all
  rows (recjax.models.text.generate): the prompt, left-padded so its last column is real
  in every row, is prefilled but for that column, and the first step feeds the column in
  place of the start token. Leaves are batch-major; `max_length` counts the prompt."""
  x = model._inputs(ids, inputs_embeds)
  mask = jnp.ones(x.shape[:2], jnp.int32) if mask is None else mask
  _, cache = model.prefill(model.init_cache(x.shape[0], max_length), inputs_embeds=x[:, :-1],
                           mask=mask[:, :-1])

  def step_fn(state: PromptState, tokens: jax.Array):
    vectors = jnp.where(state.started[:, None], model.embed(tokens), state.pending)
    logits, cache = model.prefill(state.cache, inputs_embeds=vectors[:, None])
    return logits, PromptState(cache, state.pending, jnp.ones_like(state.started))

  return step_fn, PromptState(cache, x[:, -1], jnp.zeros((x.shape[0],), bool))


def greedy_generate(model: Gemma, ids=None, mask=None, *, max_new_tokens: int,
                    eos_id: int | Sequence[int] | jax.Array | None = None, pad_id: int | jax.Array | None = None,
                    inputs_embeds=None) -> jax.Array:
  """Greedy continuation of (left-padded) prompts: int32 [B, max_new_tokens], each row
  stopping after its EOS and padded with `pad_id` (as Hugging Face's generate). Fixed
  shapes and a lax.while_loop that ends when every row is done: jit it with the model as
  an argument and max_new_tokens static (eos_id, one id or several, and pad_id may be traced)."""
  cfg = model.config
  eos = jnp.atleast_1d(jnp.asarray(cfg.eos_token_id if eos_id is None else eos_id, jnp.int32))
  pad = jnp.asarray(cfg.pad_token_id if pad_id is None else pad_id, jnp.int32)
  prompt = ids if inputs_embeds is None else inputs_embeds
  b, t = prompt.shape[:2]
  logits, cache = model.start_decoding(t + max_new_tokens, ids, mask, inputs_embeds=inputs_embeds)

  def body(carry):
    i, logits, cache, tokens, done = carry
    token = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    done = done | jnp.isin(token, eos)
    logits, cache = model.decode_step(cache, token)
    return i + 1, logits, cache, tokens.at[:, i].set(token), done

  def cond(carry):
    return (carry[0] < max_new_tokens) & ~jnp.all(carry[4])

  init = (jnp.int32(0), logits, cache, jnp.full((b, max_new_tokens), pad, jnp.int32), jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[3]


# --- training ------------------------------------------------------------------------------

def next_token_loss(logits: jax.Array, ids: jax.Array, target_mask: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ids[:, t] from logits[:, t - 1], over the positions
  where `target_mask` [B, T] is set (e.g. the answer, not the prompt or padding)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  weight = (target_mask[:, 1:] > 0).astype(jnp.float32)
  return (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)


# --- checkpoint ------------------------------------------------------------------------------

class GemmaTokenizer:
  """SentencePiece ids with BOS prepended, as Hugging Face's GemmaTokenizer (pad 0, eos 1,
  bos 2 for the released models; taken from config.json)."""

  def __init__(self, model_file, *, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0, add_bos: bool = True):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return ([self.bos_id] if self.add_bos else []) + self.sp.encode(text)

  def encode_batch(self, texts, max_length: int, *, pad_left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ids truncated to their first `max_length` and padded (on the left by default, ready
    for generation): int32 ids, mask [N, max_length]."""
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = self.encode(text)[:max_length]
      cols = slice(max_length - len(tokens), max_length) if pad_left else slice(0, len(tokens))
      ids[row, cols] = tokens
      mask[row, cols] = 1
    return ids, mask

  def decode(self, ids) -> str:
    """Text of ids, without pad/bos/eos."""
    special = {self.pad_id, self.bos_id, self.eos_id}
    return self.sp.decode([int(i) for i in ids if int(i) not in special])


@dataclasses.dataclass
class LoadedGemma:
  model: Gemma
  tokenizer: GemmaTokenizer | None  # None when the directory has no tokenizer.model
  config: GemmaConfig
  files: list[pathlib.Path]
  directory: pathlib.Path


def _load_weights(model: Gemma, tensors: dict, directory, files) -> None:
  """Fills the (abstract) model from Hugging Face Gemma names; torch Linear weights are
  [out, in], ours [in, out]."""

  def take(name):
    if name not in tensors:
      raise KeyError(f"{directory}: the checkpoint ({', '.join(f.name for f in files)}) has no tensor "
                     f"{name!r} (does config.json match it?)")
    return tensors.pop(name)

  # GemmaForCausalLM prefixes the body with "model."; a bare GemmaModel does not.
  prefix = "model." if "model.embed_tokens.weight" in tensors else ""
  embed = take(prefix + "embed_tokens.weight")
  head = tensors.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, embed):
    raise ValueError(f"{directory}: lm_head.weight differs from {prefix}embed_tokens.weight; an untied "
                     "LM head is not supported")
  ckpt.assign(model.embedder.embedding, embed, prefix + "embed_tokens.weight")
  norm = lambda module, name: ckpt.assign(module.scale, take(name + ".weight"), name)
  linear = lambda dense, name: ckpt.assign(dense.kernel, take(name + ".weight").T, name)
  for i, block in enumerate(model.blocks):
    p = f"{prefix}layers.{i}."
    norm(block.attention_norm, p + "input_layernorm")
    for name in "qkvo":
      linear(getattr(block.attention, name), f"{p}self_attn.{name}_proj")
    norm(block.mlp_norm, p + "post_attention_layernorm")
    for name in ("gate", "up", "down"):
      linear(getattr(block.mlp, name), f"{p}mlp.{name}_proj")
  norm(model.final_norm, prefix + "norm")
  ckpt.check_consumed(tensors, model, directory)


def load_gemma(path, *, dtype=jnp.float32) -> LoadedGemma:
  """A Hugging Face Gemma checkpoint directory: config.json, model.safetensors or a sharded
  index, and tokenizer.model (SentencePiece) when present. Parameters are float32 whatever
  the file's dtype; `dtype` is the compute dtype."""
  directory = ckpt.checkpoint_dir(path)
  cfg = GemmaConfig.from_dict(ckpt.read_config(directory))
  files = ckpt.weight_files(directory)
  tensors = ckpt.load_tensors(directory, keep=lambda name: True)
  model = nnx.eval_shape(lambda: Gemma(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  _load_weights(model, tensors, directory, files)
  spm = directory / "tokenizer.model"
  tokenizer = GemmaTokenizer(spm, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id,
                             pad_id=cfg.pad_token_id) if spm.is_file() else None
  files = files + [directory / "config.json"] + ([spm] if tokenizer else [])
  return LoadedGemma(model, tokenizer, cfg, files, directory)
