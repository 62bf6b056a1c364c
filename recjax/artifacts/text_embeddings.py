"""The `text_embeddings` artifact: a frozen sentence encoder's embedding of every item's text.

RQ-VAE semantic IDs, the preference-discerning benchmark and Mender_Emb read it; the
encoder runs once per item and dataset (`recjax fit --gin_file=fits/text_embeddings.gin`).

  <data>/artifacts/text_embeddings/<name>/embeddings.npy   float32 [vocab_size, D], rows 0/1 zero
  manifest: encoder (its name / path for `load_text_encoder`), encoder_fingerprint, dim
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import numpy as np

from recjax.artifacts import manifest

KIND = "text_embeddings"
FILE = "embeddings.npy"
NUM_RESERVED_ITEMS = 2


def strings_key(fingerprint: str, strings: Sequence[str]) -> str:
  """Cache key of `strings` embedded by the encoder with this fingerprint (LUMEN's review cache)."""
  from recjax.models.text import cache
  return cache.hash_strings({"kind": "sentence-embeddings", "version": 1, "encoder": fingerprint}, strings)


def save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes beside `path` and renames: readers never see a partial cache file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".tmp-{path.stem}-{os.getpid()}.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def embed_by_length(encoder, texts: Sequence[str], chunk: int = 1024, batch_size: int = 256) -> np.ndarray:
  """`encoder.embed_sentences` over chunks of similar token length: each chunk is padded
  only to its own longest text (a few long titles would otherwise pad every batch)."""
  _, mask = encoder.tokenize(texts, encoder.default_max_length)
  order = np.argsort(mask.sum(1), kind="stable")
  out = np.zeros((len(texts), encoder.dim), np.float32)
  for s in range(0, len(texts), chunk):
    rows = order[s:s + chunk]
    out[rows] = encoder.embed_sentences([texts[i] for i in rows], batch_size=batch_size)
  return out


def _stderr(s: str) -> None:
  print(s, file=sys.stderr, flush=True)


def fit(data_dir, name: str = "minilm", *, encoder="minilm", gin_file: str | None = None,
        log: Callable[[str], None] | None = _stderr) -> dict:
  """Embeds every item text (`text.cache.item_texts`) with `encoder` (a name or path for
  `load_text_encoder`, or a loaded TextEncoder) and writes the artifact. Returns a summary."""
  from recjax.models import text
  from recjax.models.text import cache
  spec = encoder if isinstance(encoder, (str, os.PathLike)) else getattr(encoder, "name", str(encoder))
  manifest.check_name(KIND, name)
  if isinstance(encoder, (str, os.PathLike)):
    encoder = text.load_text_encoder(encoder)
  texts = cache.item_texts(data_dir)
  start = time.perf_counter()
  with manifest.build(data_dir, KIND, name, fit=f"{__name__}.fit", gin_file=gin_file,
                      config={"encoder": str(spec)}) as b:
    emb = np.zeros((len(texts), encoder.dim), np.float32)
    emb[NUM_RESERVED_ITEMS:] = embed_by_length(encoder, texts[NUM_RESERVED_ITEMS:])
    np.save(b.dir / FILE, emb)
    seconds = round(time.perf_counter() - start, 1)
    b.manifest.update(encoder=str(spec), encoder_name=encoder.name, encoder_fingerprint=encoder.fingerprint,
                      dim=int(encoder.dim), items=len(texts) - NUM_RESERVED_ITEMS, seconds=seconds)
  if log:
    log(f"embedded {len(texts) - NUM_RESERVED_ITEMS:,} item texts with {encoder.name} in {seconds:.0f}s")
  return {"artifact": str(manifest.artifact_dir(data_dir, KIND, name)), "items": len(texts) - NUM_RESERVED_ITEMS,
          "dim": int(encoder.dim), "seconds": seconds}


def load(data_dir, name: str = "minilm") -> tuple[np.ndarray, dict]:
  """(embeddings [vocab_size, D] float32, rows 0/1 zero; the artifact's manifest). Refuses a
  missing or stale artifact in one sentence."""
  path = manifest.require(data_dir, KIND, name)
  return np.load(path / FILE), manifest.read(path)


def load_encoder(meta: dict):
  """The text encoder that built an artifact (e.g. to embed query statements alike)."""
  from recjax.models import text
  encoder = text.load_text_encoder(meta["encoder"])
  if encoder.fingerprint != meta["encoder_fingerprint"]:
    raise ValueError(f"text encoder {meta['encoder']!r} is not the one that built the {meta['kind']} artifact "
                     f"{meta['name']!r} (fingerprint {encoder.fingerprint} vs {meta['encoder_fingerprint']}); "
                     f"rebuild it with `{meta['command']}`")
  return encoder
