"""The T5-family encoder-decoder (T5, T5 v1.1, Flan-T5, mT5) in Flax NNX, loading Hugging
Face safetensors checkpoints; teacher forcing, cached decoding, generation, the loss.

Matches `transformers.T5ForConditionalGeneration`: the encoder is `t5.T5Encoder` (its token
embedding is the shared one); each decoder block is RMSNorm -> causal self-attention
(unidirectional relative position bias, owned by the first layer, shared by all) ->
residual; RMSNorm -> cross-attention to the encoder output (no bias) -> residual;
RMSNorm -> FFN -> residual; then a final RMSNorm and the LM head. The head is the shared
embedding when `tie_word_embeddings` (original T5), else its own `lm_head` (v1.1, mT5,
Flan-T5); the decoder output is scaled by d_model**-0.5 first when
`scale_decoder_outputs` (by default: exactly when the head is tied). Decoding starts from
the pad token (0).

  loaded = load_t5("/ckpts/flan-t5-small")
  logits = loaded.model(enc_ids, enc_mask, dec_ids)             # float32 [B, L, V]
  out = generate(loaded.model, enc_ids, enc_mask, max_new_tokens=16, num_beams=4)

Packed rows (several examples per row, seqio's `EncDecFeatureConverter(pack=True)`) pass a
`Packing` of their segment ids and positions: attention (encoder, decoder and cross) stays
within each example and relative positions restart with it, so a packed example computes
what it computes alone in a row.

Incremental decoding keeps the self-attention keys/values of past positions in a cache
(`init_cache`, `decode_step`); the cross-attention keys/values are computed once per input
(`cross_kv`). The decoder also takes input vectors instead of token ids
(`decode_embeddings`, `decode_step_embeddings`), for models that splice in their own
embeddings (e.g. item vectors in place of placeholder tokens).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import layers
from recjax.models.text import checkpoint as ckpt
from recjax.models.text import generate as gen
from recjax.models.text import t5

NEG_INF = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class T5Seq2SeqConfig(t5.T5Config):
  num_decoder_layers: int | None = None  # None: num_layers
  tie_word_embeddings: bool = True  # the LM head is the shared embedding
  scale_decoder_outputs: bool | None = None  # x d_model**-0.5 before the head; None: = tied
  decoder_start_token_id: int = 0
  eos_token_id: int = 1
  pad_token_id: int = 0

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def output_scale(self) -> float:
    scale = self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs
    return self.d_model ** -0.5 if scale else 1.0

  @classmethod
  def from_dict(cls, config: dict) -> "T5Seq2SeqConfig":
    cfg = super().from_dict(config)
    eos = config.get("eos_token_id", 1)
    # As transformers: an explicit scale_decoder_outputs (transformers >= 5 writes it) wins;
    # older configs scale unless they say tie_word_embeddings=false (v1.1, Flan-T5, mT5).
    scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False)
    return dataclasses.replace(cfg, eos_token_id=eos[0] if isinstance(eos, list) else eos,
                               scale_decoder_outputs=bool(scale))


# -- attention over precomputed keys/values ----------------------------------------------


def _split_heads(attn: t5.T5Attention, t):
  return t.reshape(*t.shape[:2], attn.num_heads, attn.d_kv)


def _keys_values(attn: t5.T5Attention, x):
  """[B, L, H, d_kv] keys and values of x [B, L, d_model]."""
  return _split_heads(attn, attn.k(x)), _split_heads(attn, attn.v(x))


def _attend(attn: t5.T5Attention, x, k, v, mask, bias):
  """T5Attention's computation with given keys/values [B, Lk, H, d_kv] (caches)."""
  q = _split_heads(attn, attn.q(x))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(attn.dtype)
  return attn.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:2], -1))


# -- the decoder ----------------------------------------------------------------------------


class T5DecoderBlock(nnx.Module):
  def __init__(self, cfg: T5Seq2SeqConfig, *, has_relative_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
    norm = lambda: t5.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.self_norm, self.cross_norm, self.ffn_norm = norm(), norm(), norm()
    self.self_attention = t5.T5Attention(cfg, has_relative_bias=has_relative_bias, bidirectional=False,
                                         rngs=rngs, dtype=dtype)
    self.cross_attention = t5.T5Attention(cfg, has_relative_bias=False, rngs=rngs, dtype=dtype)
    self.ffn = t5.T5FeedForward(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, self_mask, bias, memory, cross_mask):
    x = x + self.self_attention(self.self_norm(x), self_mask, bias)
    x = x + self.cross_attention(self.cross_norm(x), cross_mask, None, kv=memory)
    return x + self.ffn(self.ffn_norm(x))


class T5Decoder(nnx.Module):
  """Decoder blocks + final RMSNorm over input vectors; the caller owns embedding and head."""

  def __init__(self, cfg: T5Seq2SeqConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.blocks = nnx.List([T5DecoderBlock(cfg, has_relative_bias=(i == 0), rngs=rngs, dtype=dtype)
                            for i in range(cfg.decoder_layers)])
    self.final_norm = t5.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype)
    self.dtype = dtype

  def __call__(self, x, memory, memory_mask, packing: "Packing | None" = None):
    """Teacher-forced hidden states [B, L, d_model] of inputs x [B, L, d_model] (causal).
    With `packing`, attention stays within each packed example (self and cross) and the
    relative positions restart with it."""
    x = x.astype(self.dtype)
    n = x.shape[1]
    causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
    attention = self.blocks[0].self_attention
    if packing is None:
      bias = attention.position_bias(n, n)  # shared by every layer
      cross = (memory_mask > 0)[:, None, None, :]
    else:
      bias = attention.position_bias_at(packing.decoder_positions, packing.decoder_positions)
      causal = causal & t5.same_segment(packing.decoder_segment_ids, packing.decoder_segment_ids)
      cross = t5.same_segment(packing.decoder_segment_ids, packing.encoder_segment_ids)
    for block in self.blocks:
      x = block(x, causal, bias, memory, cross)
    return self.final_norm(x)

  def cross_kv(self, memory):
    """Per layer, the cross-attention keys/values of the encoder output (once per input)."""
    return tuple(_keys_values(b.cross_attention, memory) for b in self.blocks)

  def init_cache(self, batch: int, max_length: int, dtype=None):
    a = self.blocks[0].self_attention
    shape = (batch, max_length, a.num_heads, a.d_kv)
    dtype = dtype or self.dtype
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in self.blocks)
    # `pos` per row: every leaf has the batch axis first, so beam search reorders by gathering.
    return {"k": zeros(), "v": zeros(), "pos": jnp.zeros((batch,), jnp.int32)}

  def step(self, cache, x, cross_kv, memory_mask):
    """(hidden [B, d_model], cache) for one input vector per row x [B, d_model] at each
    row's position cache['pos'] (< the cache's max_length; later writes are dropped)."""
    max_length = cache["k"][0].shape[1]
    pos = cache["pos"]
    x = x[:, None].astype(self.dtype)
    slots = jnp.arange(max_length)[None, :]
    write = (slots == pos[:, None])[:, :, None, None]
    self_mask = (slots <= pos[:, None])[:, None, None, :]
    a0 = self.blocks[0].self_attention
    buckets = jnp.asarray(t5.relative_position_buckets(
        max_length, max_length, bidirectional=False, num_buckets=a0.num_buckets, max_distance=a0.max_distance))
    bias = jnp.transpose(a0.relative_bias.embedding[...][buckets[pos]], (0, 2, 1))[:, :, None]  # [B, H, 1, L]
    cross = (memory_mask > 0)[:, None, None, :]
    ks, vs = [], []
    for block, ck, cv, (mk, mv) in zip(self.blocks, cache["k"], cache["v"], cross_kv):
      h = block.self_norm(x)
      k, v = _keys_values(block.self_attention, h)
      ck = jnp.where(write, k.astype(ck.dtype), ck)
      cv = jnp.where(write, v.astype(cv.dtype), cv)
      ks.append(ck)
      vs.append(cv)
      x = x + _attend(block.self_attention, h, ck, cv, self_mask, bias)
      x = x + _attend(block.cross_attention, block.cross_norm(x), mk, mv, cross, None)
      x = x + block.ffn(block.ffn_norm(x))
    return self.final_norm(x)[:, 0], {"k": tuple(ks), "v": tuple(vs), "pos": pos + 1}


# -- the encoder-decoder --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packing:
  """Segment ids (1.. per example, 0 = padding) and per-segment positions of packed rows
  (seqio's EncDecFeatureConverter(pack=True) features)."""
  encoder_segment_ids: jax.Array
  encoder_positions: jax.Array
  decoder_segment_ids: jax.Array
  decoder_positions: jax.Array

  KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")

  @classmethod
  def of(cls, batch) -> "Packing | None":
    """The packing features of a batch; None for unpacked rows (none of them present)."""
    present = [k for k in cls.KEYS if k in batch]
    if not present:
      return None
    if len(present) != len(cls.KEYS):
      raise ValueError(f"a packed batch needs all of {cls.KEYS}; it has only {present}")
    return cls(**{k: batch[k] for k in cls.KEYS})


class T5EncoderDecoder(nnx.Module):
  def __init__(self, cfg: T5Seq2SeqConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.encoder = t5.T5Encoder(cfg, rngs=rngs, dtype=dtype)  # owns the shared embedding
    self.decoder = T5Decoder(cfg, rngs=rngs, dtype=dtype)
    # Untied head: t5x's fan-in init (Hugging Face's std 1.0 makes huge initial logits).
    self.lm_head = None if cfg.tie_word_embeddings else layers.dense(
        cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype, use_bias=False,
        std=cfg.d_model ** -0.5)
    self.config, self.dtype = cfg, dtype

  @property
  def embed(self) -> nnx.Embed:
    return self.encoder.embed

  def encode(self, ids, mask, packing: Packing | None = None):
    """Encoder output [B, T, d_model] (the decoder's memory)."""
    if packing is None:
      return self.encoder(ids, mask)
    return self.encoder(ids, mask, packing.encoder_segment_ids, packing.encoder_positions)

  def head(self, hidden):
    """float32 logits [..., V] of decoder outputs."""
    hidden = hidden * jnp.asarray(self.config.output_scale, hidden.dtype)
    logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return logits.astype(jnp.float32)

  def decode_embeddings(self, x, memory, memory_mask, packing: Packing | None = None):
    """Teacher-forced logits [B, L, V] (float32) of decoder input vectors x [B, L, d_model]."""
    return self.head(self.decoder(x, memory, memory_mask, packing))

  def decode(self, tokens, memory, memory_mask, packing: Packing | None = None):
    """Teacher-forced logits [B, L, V] (float32) of decoder input ids [B, L] (start token
    first; packed rows: first in every segment)."""
    return self.decode_embeddings(self.embed(tokens), memory, memory_mask, packing)

  def __call__(self, ids, mask, decoder_ids, packing: Packing | None = None):
    return self.decode(decoder_ids, self.encode(ids, mask, packing), mask, packing)

  def cross_kv(self, memory):
    return self.decoder.cross_kv(memory)

  def init_cache(self, batch: int, max_length: int):
    return self.decoder.init_cache(batch, max_length)

  def decode_step_embeddings(self, cache, x, cross_kv, memory_mask):
    """(logits [B, V] float32, cache) for one decoder input vector per row x [B, d_model]."""
    hidden, cache = self.decoder.step(cache, x, cross_kv, memory_mask)
    return self.head(hidden), cache

  def decode_step(self, cache, tokens, cross_kv, memory_mask):
    """(logits [B, V] float32, cache) for one decoder input id per row [B]."""
    return self.decode_step_embeddings(cache, self.embed(tokens), cross_kv, memory_mask)


def shift_right(targets, start_token: int = 0):
  """Teacher-forcing decoder inputs: the start token, then targets[:, :-1]."""
  return jnp.concatenate([jnp.full_like(targets[:, :1], start_token), targets[:, :-1]], axis=1)


def cross_entropy(logits, targets, mask, *, z_loss: float = 0.0):
  """Mean token cross-entropy (float32) over positions with mask > 0, plus z_loss *
  logsumexp^2 (PaLM/t5x's logit drift penalty; off by default). Returns (loss, metrics of
  sums: 'loss_sum', 'z_loss_sum', 'accuracy_sum', 'targets')."""
  logits = logits.astype(jnp.float32)
  w = (mask > 0).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, -1)
  nll = log_z - jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  z = z_loss * jnp.square(log_z)
  count = jnp.sum(w)
  loss = jnp.sum((nll + z) * w) / jnp.maximum(count, 1.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return loss, {"loss_sum": jnp.sum(nll * w), "z_loss_sum": jnp.sum(z * w),
                "accuracy_sum": jnp.sum(correct * w), "targets": count}


def seq2seq_loss(model: T5EncoderDecoder, batch: dict, *, z_loss: float = 0.0):
  """Teacher-forced loss of batch {'encoder_tokens', 'encoder_mask', 'targets',
  'target_mask'} (targets end with EOS, padded; inputs are the targets shifted right)."""
  inputs = shift_right(batch["targets"], model.config.decoder_start_token_id)
  logits = model(batch["encoder_tokens"], batch["encoder_mask"], inputs)
  return cross_entropy(logits, batch["targets"], batch["target_mask"], z_loss=z_loss)


def generate(model: T5EncoderDecoder, ids, mask, *, max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = "never"):
  """Greedy (num_beams=1) or beam search continuations of encoder inputs ids/mask [B, T];
  `recjax.models.text.generate` has the semantics (Hugging Face `generate`'s). Returns a
  `gen.GreedyOutput` or a `gen.BeamOutput` (generated tokens only, pad after EOS).
  Jittable (e.g. under nnx.jit with the keyword arguments static)."""
  cfg = model.config
  memory = model.encode(ids, mask)
  b = ids.shape[0]
  kw = dict(batch_size=b, max_new_tokens=max_new_tokens, start_token=cfg.decoder_start_token_id,
            eos_token=cfg.eos_token_id, pad_token=cfg.pad_token_id)
  if num_beams == 1:
    cross = model.cross_kv(memory)
    step = lambda cache, tokens: model.decode_step(cache, tokens, cross, mask)
    return gen.greedy_search(step, model.init_cache(b, max_new_tokens), **kw)
  # Every beam of a row attends to the same memory: repeat it once, before the search.
  cross = jax.tree.map(lambda t: jnp.repeat(t, num_beams, 0), model.cross_kv(memory))
  beam_mask = jnp.repeat(mask, num_beams, 0)
  step = lambda cache, tokens: model.decode_step(cache, tokens, cross, beam_mask)
  return gen.beam_search(step, model.init_cache(b * num_beams, max_new_tokens), num_beams=num_beams,
                         length_penalty=length_penalty, early_stopping=early_stopping, **kw)


# -- loading ----------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedT5Seq2Seq:
  model: T5EncoderDecoder
  tokenizer: t5.T5Tokenizer | None  # None when the directory has no spiece.model
  files: list[pathlib.Path]
  directory: pathlib.Path


def _assign_decoder(model: T5EncoderDecoder, tensors: dict, directory) -> None:
  take = lambda name: ckpt.take(tensors, name, directory)
  linear = lambda dense, name: t5.assign_linear(dense, tensors, name, directory)
  norm = lambda rms, name: ckpt.assign(rms.scale, take(name + ".weight"), name)
  for i, block in enumerate(model.decoder.blocks):
    p = f"decoder.block.{i}.layer."
    for name in "qkvo":
      linear(getattr(block.self_attention, name), f"{p}0.SelfAttention.{name}")
      linear(getattr(block.cross_attention, name), f"{p}1.EncDecAttention.{name}")
    if block.self_attention.relative_bias is not None:
      name = f"{p}0.SelfAttention.relative_attention_bias.weight"
      ckpt.assign(block.self_attention.relative_bias.embedding, take(name), name)
    norm(block.self_norm, f"{p}0.layer_norm")
    norm(block.cross_norm, f"{p}1.layer_norm")
    t5.assign_ffn(block.ffn, tensors, f"{p}2.DenseReluDense.", directory)
    norm(block.ffn_norm, f"{p}2.layer_norm")
  norm(model.decoder.final_norm, "decoder.final_layer_norm")
  if model.lm_head is not None:
    linear(model.lm_head, "lm_head")


def load_t5(path, *, dtype=jnp.float32) -> LoadedT5Seq2Seq:
  """A Hugging Face T5 / mT5 / Flan-T5 seq2seq checkpoint directory (config.json,
  model.safetensors or a sharded index, spiece.model). Parameters are float32 (bfloat16
  checkpoints are widened); `dtype` is the compute dtype. A tensor the model lacks, or a
  parameter the checkpoint lacks, is an error naming it."""
  directory = ckpt.checkpoint_dir(path)
  cfg = T5Seq2SeqConfig.from_dict(ckpt.read_config(directory))
  files = ckpt.weight_files(directory)
  tensors = ckpt.load_tensors(directory, keep=lambda n: True)
  # Old checkpoints carry a cross-attention bias table nothing reads (Hugging Face skips it too).
  tensors.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
  shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
  dec_embed = tensors.pop("decoder.embed_tokens.weight", None)
  if dec_embed is not None and shared is not None and not np.array_equal(dec_embed, shared):
    raise ValueError(f"{directory}: decoder.embed_tokens.weight differs from shared.weight; separate "
                     "decoder embeddings are not supported")
  head = tensors.get("lm_head.weight")
  if head is not None and cfg.tie_word_embeddings and shared is not None and np.array_equal(head, shared):
    tensors.pop("lm_head.weight")  # a saved copy of the tied head
    head = None
  if head is None and not cfg.tie_word_embeddings:
    ckpt.take(tensors, "lm_head.weight", directory)  # raises, naming the tensor
  # A head in the checkpoint is used even when config.json says tied (transformers does so).
  cfg = dataclasses.replace(cfg, tie_word_embeddings=head is None)
  model = nnx.eval_shape(lambda: T5EncoderDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  t5.assign_encoder(model.encoder, tensors, directory)
  _assign_decoder(model, tensors, directory)
  ckpt.check_consumed(tensors, model, directory)
  spm = directory / "spiece.model"
  tokenizer = t5.T5Tokenizer(spm, pad_id=cfg.pad_token_id, eos_id=cfg.eos_token_id) if spm.is_file() else None
  files = files + [directory / "config.json"] + ([spm] if tokenizer else [])
  return LoadedT5Seq2Seq(model, tokenizer, files, directory)
