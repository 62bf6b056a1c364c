"""On-disk cache of frozen text-encoder outputs (FLARE item and critique text).

The encoder is frozen, so the token-level states of every item text and every critique
string are computed once and reused by every step and every run. An entry is keyed by a
content hash of: the strings (in order), the encoder's fingerprint (sha256 of its
weights, tokenizer and config files, its architecture and compute dtype), `max_length`
and the storage dtype. Layout:

  CACHE_DIR/text-<key>/states.npy   [N, max_length, D] float16 or float32
  CACHE_DIR/text-<key>/mask.npy     [N, max_length] bool (True = real token)
  CACHE_DIR/text-<key>/meta.json    what the entry holds, for people

An entry is built in a temporary directory and renamed into place, so readers never see
a partial one and concurrent builders do not clash; states are read back memory-mapped.
Critique strings come from `recjax.data.sequence_preprocessors.critique_table`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from typing import Sequence

import numpy as np

CACHE_VERSION = 1
_STORAGE = {"float16": np.float16, "float32": np.float32}


def cache_key(encoder, strings: Sequence[str], max_length: int, dtype: str) -> str:
  return hash_strings({"version": CACHE_VERSION, "encoder": encoder.fingerprint,
                       "max_length": int(max_length), "dtype": dtype}, strings)


def hash_strings(header: dict, strings: Sequence[str]) -> str:
  """A 40-hex key of a JSON-able header and a list of strings (in order)."""
  h = hashlib.sha256(json.dumps({**header, "count": len(strings)}, sort_keys=True).encode())
  for s in strings:  # length-prefixed, so no two lists of strings hash alike
    b = s.encode("utf-8", "surrogatepass")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()[:40]


def encode_strings_cached(encoder, strings: Sequence[str], max_length: int = 32, cache_dir=None, *,
                          dtype: str = "float16", batch_size: int = 256,
                          mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Token-level states of `strings`: (states [N, max_length, D] in `dtype`, mask [N, max_length]
  bool). Encodes on a cache miss only; `mmap` returns states as a read-only memory map."""
  if dtype not in _STORAGE:
    raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {sorted(_STORAGE)}")
  if cache_dir is None:
    raise ValueError("encode_strings_cached needs a cache_dir")
  strings = [str(s) for s in strings]
  cache_dir = pathlib.Path(cache_dir)
  entry = cache_dir / f"text-{cache_key(encoder, strings, max_length, dtype)}"
  if not (entry / "states.npy").is_file():
    _build(entry, encoder, strings, max_length, dtype, batch_size)
  states = np.load(entry / "states.npy", mmap_mode="r" if mmap else None)
  mask = np.load(entry / "mask.npy")
  if states.shape != (len(strings), max_length, encoder.dim) or mask.shape != states.shape[:2]:
    raise ValueError(f"{entry}: cached arrays have shapes {states.shape} / {mask.shape}, expected "
                     f"{(len(strings), max_length, encoder.dim)}; delete the entry to rebuild it")
  return states, mask


def _build(entry: pathlib.Path, encoder, strings, max_length, dtype, batch_size) -> None:
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    start = time.perf_counter()
    ids, mask = encoder.tokenize(strings, max_length)
    np.save(tmp / "mask.npy", mask.astype(bool))
    # Written batch by batch into a memory map: the float32 [N, T, D] never sits in memory.
    states = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=_STORAGE[dtype],
                                       shape=(len(strings), max_length, encoder.dim))
    encoder.encode(ids, mask, batch_size=batch_size, out=states)
    if not np.isfinite(states).all():
      raise FloatingPointError(f"non-finite text states for {encoder!r} in {dtype}; "
                               "cache them as float32")
    states.flush()
    del states
    (tmp / "meta.json").write_text(json.dumps({
        "encoder": encoder.name, "fingerprint": encoder.fingerprint, "count": len(strings),
        "max_length": max_length, "dim": encoder.dim, "dtype": dtype,
        "at_max_length": int(np.sum(mask[:, -1] > 0)),  # strings that may have been truncated
        "seconds": round(time.perf_counter() - start, 2),
    }, indent=1))
    try:
      os.rename(tmp, entry)
    except OSError:  # another process finished the same entry first: keep theirs
      if not (entry / "states.npy").is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _common_prefix(paths: list[list[str]]) -> int:
  paths = [p for p in paths if p]
  if not paths:
    return 0
  n = min(len(p) for p in paths)
  for i in range(n):
    if any(p[i] != paths[0][i] for p in paths):
      return i
  return n


def item_texts(data_dir) -> list[str]:
  """One short string per item id 0 .. vocab_size - 1 of a prepared dataset ("" for PAD,
  MASK and items without text): "title. brand. category > ... > leaf".

  Kept short because the tokens are truncated (32 by default): the brand is dropped when
  the title already names it, and category levels shared by every item (Amazon's
  "Beauty") are dropped.
  """
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  rows = ds.items(columns=["item_id", "title", "brand", "categories"]).to_pylist()
  skip = _common_prefix([r["categories"] or [] for r in rows])
  texts = [""] * ds.vocab_size
  for r in rows:
    title = " ".join((r["title"] or "").split())
    brand = " ".join((r["brand"] or "").split())
    parts = [title]
    if brand and brand.lower() not in title.lower():
      parts.append(brand)
    parts.append(" > ".join(c.strip() for c in (r["categories"] or [])[skip:] if c and c.strip()))
    texts[r["item_id"]] = ". ".join(p.rstrip(". ") for p in parts if p.rstrip(". "))
  return texts


def item_text_states(encoder, data_dir, max_length: int = 32, cache_dir=None, **kwargs):
  """`encode_strings_cached` over `item_texts(data_dir)`: row i = item id i."""
  return encode_strings_cached(encoder, item_texts(data_dir), max_length, cache_dir, **kwargs)
