"""TIGER (Rajput et al. 2023): generative retrieval over semantic IDs.

A small T5 v1.1 encoder-decoder. The encoder reads a user's history as semantic-ID tokens
(the most recent `max_items` items, 4 tokens each, oldest first; optionally a user token
hashed into `user_buckets` buckets first, as in the paper). The decoder generates the
next item's ID one level at a time; training is teacher forcing with token cross-entropy
(float32) over the semantic-ID vocabulary; recommendation is (trie-constrained) beam
search (`recjax.models.beam_search`) with more beams than the K items returned.

The network reuses `recjax.models.text.t5` blocks: the encoder is `T5Encoder`; each
decoder block is causal self-attention with its own (unidirectional) relative position
bias in the first layer, cross-attention to the encoder output and a gated-GELU FFN.
No dropout (TIGER uses 0.1): not needed for the short runs this was checked with.

Training data and the trainer: every prefix of every user's training sequence is one
example (`build_examples`, numpy; no packing). The seqio converters of
`recjax.data.converters` work on item-id sequences and emit one example per sequence, so
instead of a converter this module builds encoder/decoder arrays directly and feeds
`recjax.train.loop.Trainer`'s jitted step (`train_tiger`): the model follows the Trainer's
protocol (`network`, `loss_fn` -> (loss, metrics with *_sum and 'targets')), only the
data iterator is local. Evaluation does not exclude history items (TIGER's protocol:
the decoder may regenerate an item the user already has).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import beam_search as bs
from recjax.models import layers
from recjax.models.text import t5

log = logging.getLogger("recjax.tiger")

START_TOKEN = 0  # T5 starts decoding from the pad token


# -- network ----------------------------------------------------------------------------


def _split_heads(t, num_heads, d_kv):
  return t.reshape(*t.shape[:2], num_heads, d_kv)


def _attend(attn: t5.T5Attention, x, k, v, mask, bias):
  """T5Attention's computation with precomputed keys/values [B, Lk, H, d] (caches)."""
  q = _split_heads(attn.q(x), attn.num_heads, attn.d_kv)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(attn.dtype)
  return attn.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:2], -1))


def _keys_values(attn: t5.T5Attention, x):
  return (_split_heads(attn.k(x), attn.num_heads, attn.d_kv),
          _split_heads(attn.v(x), attn.num_heads, attn.d_kv))


class DecoderBlock(nnx.Module):
  def __init__(self, cfg: t5.T5Config, *, has_relative_bias: bool, rngs: nnx.Rngs):
    norm = lambda: t5.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
    self.self_norm, self.cross_norm, self.ffn_norm = norm(), norm(), norm()
    self.self_attention = t5.T5Attention(cfg, has_relative_bias=has_relative_bias, bidirectional=False,
                                         rngs=rngs)
    self.cross_attention = t5.T5Attention(cfg, has_relative_bias=False, rngs=rngs)
    self.ffn = t5.T5FeedForward(cfg, rngs=rngs)


class TigerNetwork(nnx.Module):
  def __init__(self, *, vocab_size: int, encoder_vocab_size: int, id_length: int, cfg: t5.T5Config,
               rngs: nnx.Rngs):
    self.encoder = t5.T5Encoder(dataclasses.replace(cfg, vocab_size=encoder_vocab_size), rngs=rngs)
    self.embed = nnx.Embed(vocab_size, cfg.d_model, param_dtype=jnp.float32, rngs=rngs,
                           embedding_init=layers.param_init(nnx.initializers.normal(1.0), "vocab", "embed"))
    self.blocks = nnx.List([DecoderBlock(cfg, has_relative_bias=(i == 0), rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = t5.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
    self.head = layers.dense(cfg.d_model, vocab_size, ("embed", "vocab"), rngs=rngs, use_bias=False,
                             std=cfg.d_model ** -0.5)
    self.id_length = id_length

  def encode(self, tokens, mask):
    return self.encoder(tokens, mask)

  def self_bias(self):
    """float32 [1, H, L, L]: the decoder's relative position bias over the ID positions."""
    return self.blocks[0].self_attention.position_bias(self.id_length, self.id_length)

  def decode(self, tokens, memory, memory_mask):
    """Teacher-forced logits [B, L, V] (float32) of decoder inputs `tokens` [B, L]."""
    x = self.embed(tokens)
    n = tokens.shape[1]
    causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
    bias = self.self_bias()[:, :, :n, :n]
    cross = (memory_mask > 0)[:, None, None, :]
    for blk in self.blocks:
      x = x + blk.self_attention(blk.self_norm(x), causal, bias)
      x = x + blk.cross_attention(blk.cross_norm(x), cross, None, kv=memory)
      x = x + blk.ffn(blk.ffn_norm(x))
    return self.head(self.final_norm(x)).astype(jnp.float32)

  # Incremental decoding: the self-attention keys/values of past positions are cached;
  # the cross-attention keys/values are computed once per input.

  def cross_cache(self, memory):
    return [_keys_values(blk.cross_attention, memory) for blk in self.blocks]

  def init_cache(self, batch: int, dtype=jnp.float32):
    a = self.blocks[0].self_attention
    shape = (batch, self.id_length, a.num_heads, a.d_kv)
    return {"k": [jnp.zeros(shape, dtype) for _ in self.blocks],
            "v": [jnp.zeros(shape, dtype) for _ in self.blocks],
            "pos": jnp.zeros((batch,), jnp.int32)}  # per row, so beam reordering needs no case

  def decode_step(self, cache, tokens, cross_kv, memory_mask):
    """(logits [B, V] float32, cache) for one new token per row [B] at position cache['pos']."""
    pos = cache["pos"][0]
    x = self.embed(tokens[:, None])
    n = self.id_length
    self_mask = (jnp.arange(n) <= pos)[None, None, None, :]
    bias = jax.lax.dynamic_slice_in_dim(self.self_bias(), pos, 1, axis=2)  # [1, H, 1, L]
    cross = (memory_mask > 0)[:, None, None, :]
    ks, vs = [], []
    for blk, ck, cv, (mk, mv) in zip(self.blocks, cache["k"], cache["v"], cross_kv):
      h = blk.self_norm(x)
      k, v = _keys_values(blk.self_attention, h)
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), pos, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), pos, axis=1)
      ks.append(ck)
      vs.append(cv)
      x = x + _attend(blk.self_attention, h, ck, cv, self_mask, bias)
      x = x + _attend(blk.cross_attention, blk.cross_norm(x), mk, mv, cross, None)
      x = x + blk.ffn(blk.ffn_norm(x))
    logits = self.head(self.final_norm(x))[:, 0].astype(jnp.float32)
    return logits, {"k": ks, "v": vs, "pos": cache["pos"] + 1}


# -- model (the model contract, recjax/models/base.py) ----------------------------------


@dataclasses.dataclass
class Tiger:
  """TIGER hyper-parameters (paper: 4 + 4 layers, d_model 128, 6 heads x 64, MLP 1024)
  and the model contract: trains on `EncoderDecoderConverter` rows of a semantic-ID task
  (`DS_sid_NAME`), is evaluated by generating (`predict_batch`, constrained beams)."""

  vocab_size: int = 0  # semantic-ID tokens: the task's "targets" vocabulary
  id_length: int = 4
  max_items: int = 20
  user_buckets: int = 0  # > 0: a hashed user token starts the encoder input (paper: 2000)
  d_model: int = 128
  d_kv: int = 64
  num_heads: int = 6
  d_ff: int = 1024
  num_layers: int = 4
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128

  VOCAB_FEATURE = "targets"  # the task feature whose vocabulary sets vocab_size
  # Fields of the in-memory example arrays of `train_tiger` (LUMEN / Mender drivers
  # still train that way until they move onto the gin trainer).
  batch_fields = ("encoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "weights")
  EVALUATOR = "generative_retrieval"

  @property
  def encoder_vocab_size(self) -> int:
    return self.vocab_size + self.user_buckets

  @property
  def encoder_length(self) -> int:
    return self.max_items * self.id_length + (1 if self.user_buckets else 0)

  def t5_config(self) -> t5.T5Config:
    return t5.T5Config(vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                       num_layers=self.num_layers, num_heads=self.num_heads,
                       relative_attention_num_buckets=self.relative_attention_num_buckets,
                       relative_attention_max_distance=self.relative_attention_max_distance,
                       feed_forward_proj="gated-gelu")

  def network(self, rngs: nnx.Rngs) -> TigerNetwork:
    if self.vocab_size <= 2:
      raise ValueError(f"Tiger.vocab_size must be the semantic-ID vocabulary, got {self.vocab_size}")
    return TigerNetwork(vocab_size=self.vocab_size, encoder_vocab_size=self.encoder_vocab_size,
                        id_length=self.id_length, cfg=self.t5_config(), rngs=rngs)

  def feature_converter(self, pack: bool = False, seed: int = 0):
    """History tokens (the most recent `max_items` whole IDs, after the user token) ->
    encoder rows; the next ID -> decoder rows. Deterministic, never packed."""
    del pack, seed
    from recjax.data.converters import EncoderDecoderConverter
    return EncoderDecoderConverter(input_unit=self.id_length, start_token=START_TOKEN,
                                   user_buckets=self.user_buckets, user_token_start=self.vocab_size)

  eval_feature_converter = feature_converter

  def task_feature_lengths(self) -> dict[str, int]:
    """What TASK_FEATURE_LENGTHS must say for this model (the trainer checks it)."""
    return {"inputs": self.encoder_length, "targets": self.id_length}

  def memory(self, net: TigerNetwork, batch):
    """(encoder output [B, T, d], mask [B, T]) the decoder cross-attends to."""
    tokens = batch["encoder_input_tokens"]
    mask = (tokens > 0).astype(jnp.int32)
    return net.encode(tokens, mask), mask

  def logits(self, net: TigerNetwork, batch):
    memory, mask = self.memory(net, batch)
    targets = batch["decoder_target_tokens"]
    inputs = batch.get("decoder_input_tokens")
    if inputs is None:
      inputs = jnp.concatenate([jnp.full_like(targets[:, :1], START_TOKEN), targets[:, :-1]], axis=1)
    return net.decode(inputs, memory, mask)

  def loss_fn(self, net: TigerNetwork, batch, rng: jax.Array | None):
    """Token cross-entropy (float32) of the target IDs under teacher forcing; positions
    with loss weight 0 (padding rows) do not count. `rng` is unused (no dropout)."""
    del rng
    logits = self.logits(net, batch)
    targets = batch["decoder_target_tokens"]
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, {"loss_sum": jnp.sum(nll * w), "targets": jnp.sum(w),
                  "accuracy_sum": jnp.sum(correct * w), "dropped_targets": jnp.zeros((), jnp.float32),
                  "items": jnp.sum(jnp.max(w, axis=1))}

  def predict_batch(self, net: TigerNetwork, batch, tables: bs.TrieTables, *, num_beams: int,
                    constrained: bool = True, free: bool = False):
    """Beam search from each row's history: (items [B, K], scores [B, K]), best first;
    `constrained` / `free` as in `beam_search.beam_search` (item -1: no item's ID)."""
    _, scores, items = self.generate(net, batch, tables, num_beams=num_beams, constrained=constrained,
                                     free=free)
    return items, scores

  def generate(self, net: TigerNetwork, batch, tables: bs.TrieTables, *, num_beams: int,
               constrained: bool = True, free: bool = False):
    """(tokens [B, K, L], scores [B, K], items [B, K]) of the beam search."""
    memory, enc_mask = self.memory(net, batch)
    b = memory.shape[0]
    # Every beam of a row attends to the same memory: repeat it once, before the search.
    cross_kv = [(jnp.repeat(k, num_beams, 0), jnp.repeat(v, num_beams, 0)) for k, v in net.cross_cache(memory)]
    mask = jnp.repeat(enc_mask, num_beams, 0)
    step = lambda cache, tokens: net.decode_step(cache, tokens, cross_kv, mask)
    return bs.beam_search(step, net.init_cache(b * num_beams), batch_size=b, num_beams=num_beams,
                          tables=tables, constrained=constrained, free=free, start_token=START_TOKEN)


# -- data ---------------------------------------------------------------------------------


def user_bucket(user_ids: np.ndarray, buckets: int) -> np.ndarray:
  """A fixed multiplicative hash of the user id into `buckets` buckets (as
  `EncoderDecoderConverter` computes it for the gin path)."""
  return ((np.asarray(user_ids, np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 32)
          % np.uint64(buckets)).astype(np.int64)


def examples_from_sequences(sequences, item_tokens: np.ndarray, model: Tiger, *, every_prefix: bool,
                            user_ids=None) -> dict[str, np.ndarray]:
  """Encoder/decoder arrays from item-id sequences.

  every_prefix=True: for a sequence s, one example per t >= 1 (history s[:t] -> s[t]), as
  TIGER trains; False: one example per sequence (history s[:-1] -> s[-1]), for eval.
  History = the last `model.max_items` items. `item_tokens` [vocab, L] maps item ids to
  semantic-ID tokens.
  """
  m, L = model.max_items, model.id_length
  hist_rows, target_rows, users = [], [], []
  for u, seq in enumerate(sequences):
    seq = np.asarray(seq, np.int64)
    ts = range(1, len(seq)) if every_prefix else ([len(seq) - 1] if len(seq) >= 2 else [])
    for t in ts:
      h = np.zeros(m, np.int64)  # item 0 = pad
      past = seq[max(0, t - m):t]
      h[:len(past)] = past
      hist_rows.append(h)
      target_rows.append(seq[t])
      users.append(u if user_ids is None else user_ids[u])
  hist = np.asarray(hist_rows, np.int64).reshape(-1, m)
  targets = np.asarray(target_rows, np.int64)
  tokens = np.where(hist[..., None] > 0, item_tokens[hist], 0).reshape(len(hist), m * L)
  if model.user_buckets:
    user_tok = model.vocab_size + user_bucket(np.asarray(users), model.user_buckets)
    tokens = np.concatenate([user_tok[:, None], tokens], 1)
  return {"encoder_input_tokens": tokens.astype(np.int32),
          "decoder_target_tokens": item_tokens[targets].astype(np.int32),
          "decoder_loss_weights": np.ones((len(targets), L), np.float32),
          "target_items": targets.astype(np.int32), "weights": np.ones(len(targets), np.float32)}


__all__ = ["Tiger", "TigerNetwork", "examples_from_sequences", "user_bucket"]
