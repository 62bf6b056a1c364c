"""On-disk cache of frozen text-encoder outputs (FLARE item and critique text).

The encoder is frozen, so the token-level states of every item text and every critique
string are computed once and reused by every step and every run. An entry is keyed by a
content hash of: the strings (in order), the encoder's fingerprint (sha256 of its
weights, tokenizer and config files, its architecture and compute dtype), `max_length`
and the storage dtype. Layout:

  CACHE_DIR/text-<key>/states.npy   [N, max_length, D] float16 or float32
  CACHE_DIR/text-<key>/mask.npy     [N, max_length] bool (True = real token)
  CACHE_DIR/text-<key>/meta.json    what the entry holds, for people

An entry is built in CACHE_DIR/.partial-text-<key>/ and renamed into place, so readers never
see a partial one; builders of one entry take turns on a lock file (the second finds the
entry built). The build records its progress every `SAVE_EVERY_S` seconds, so a killed
build (376K Clothing-size item texts take about an hour on two CPU cores) resumes where it
stopped. States are read back memory-mapped.
Critique strings come from `recjax.data.sequence_preprocessors.critique_table`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Sequence

import numpy as np

CACHE_VERSION = 2  # 2: padded tokens' states are zero
SAVE_EVERY_S = 60.0
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
  lock_path = entry.parent / f".lock-{entry.name}"
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
    if (entry / "states.npy").is_file():  # built by the process we waited for
      return
    _build_locked(entry, encoder, strings, max_length, dtype, batch_size)
    lock_path.unlink(missing_ok=True)  # later builders find the entry before they lock


def _build_locked(entry, encoder, strings, max_length, dtype, batch_size) -> None:
  partial = entry.parent / f".partial-{entry.name}"
  progress_path = partial / "progress.json"
  shape = (len(strings), max_length, encoder.dim)
  done, seconds = 0, 0.0
  if progress_path.is_file():
    progress = json.loads(progress_path.read_text())
    if progress.get("batch_size") == batch_size:  # the batches are the same rows: resume
      done, seconds = progress["batches"], progress["seconds"]
  if done == 0:
    shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(exist_ok=True)
  start = time.perf_counter()
  ids, mask = encoder.tokenize(strings, max_length)
  if done:  # the key hashes the strings and the tokenizer: the rows are the same ones
    states = np.load(partial / "states.npy", mmap_mode="r+")
    print(f"text cache: resuming {entry.name} at {min(done * batch_size, len(strings)):,} of "
          f"{len(strings):,} strings", flush=True)
  else:
    np.save(partial / "mask.npy", mask.astype(bool))
    # Written batch by batch into a memory map: the float32 [N, T, D] never sits in memory.
    states = np.lib.format.open_memmap(partial / "states.npy", mode="w+", dtype=_STORAGE[dtype],
                                       shape=shape)
  last_save = time.perf_counter()

  def checkpoint(batches: int) -> None:  # states first, then the count that vouches for them
    nonlocal last_save
    if time.perf_counter() - last_save < SAVE_EVERY_S:
      return
    states.flush()
    tmp = progress_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"batch_size": batch_size, "batches": batches,
                               "seconds": seconds + time.perf_counter() - start}))
    os.replace(tmp, progress_path)
    last_save = time.perf_counter()

  encoder.encode(ids, mask, batch_size=batch_size, out=states, skip=done, on_batch=checkpoint)
  if not all(np.isfinite(states[i:i + 4096]).all() for i in range(0, len(strings), 4096)):
    raise FloatingPointError(f"non-finite text states for {encoder!r} in {dtype}; "
                             "cache them as float32")
  states.flush()
  del states
  progress_path.unlink(missing_ok=True)
  (partial / "meta.json").write_text(json.dumps({
      "encoder": encoder.name, "fingerprint": encoder.fingerprint, "count": len(strings),
      "max_length": max_length, "dim": encoder.dim, "dtype": dtype,
      "at_max_length": int(np.sum(mask[:, -1] > 0)),  # strings that may have been truncated
      "seconds": round(seconds + time.perf_counter() - start, 2),
  }, indent=1))
  os.rename(partial, entry)


def _common_prefix(paths: list[list[str]]) -> int:
  paths = [p for p in paths if p]
  if not paths:
    return 0
  n = min(len(p) for p in paths)
  for i in range(n):
    if any(p[i] != paths[0][i] for p in paths):
      return i
  return n


ITEM_TEXT_FIELDS = ("title", "brand", "categories")
_TEXT_FIELDS = ("title", "brand", "categories", "description")


def item_texts(data_dir, fields: Sequence[str] = ITEM_TEXT_FIELDS) -> list[str]:
  """One short string per item id 0 .. vocab_size - 1 of a prepared dataset ("" for PAD,
  MASK and items without text): `fields` joined by ". ", by default "title. brand.
  category > ... > leaf"; "description" (FLARE's item text has one) goes where it is listed.

  Kept short because the tokens are truncated (32 by default): the brand is dropped when
  the title already names it, and category levels shared by every item (Amazon's
  "Beauty") are dropped.
  """
  from recjax.data.prepared import PreparedDataset
  unknown = [f for f in fields if f not in _TEXT_FIELDS]
  if unknown or not fields:
    raise ValueError(f"item text fields {list(fields)}: choose from {list(_TEXT_FIELDS)}")
  ds = PreparedDataset(data_dir)
  columns = ["item_id", "title", "brand", "categories"] + (["description"] if "description" in fields else [])
  rows = ds.items(columns=columns).to_pylist()
  skip = _common_prefix([r["categories"] or [] for r in rows])
  texts = [""] * ds.vocab_size
  for r in rows:
    title = " ".join((r["title"] or "").split())
    value = {"title": title, "brand": " ".join((r["brand"] or "").split()),
             "categories": " > ".join(c.strip() for c in (r["categories"] or [])[skip:] if c and c.strip()),
             "description": " ".join((r.get("description") or "").split())}
    if value["brand"].lower() in title.lower():
      value["brand"] = ""
    parts = [value[f].rstrip(". ") for f in fields]
    texts[r["item_id"]] = ". ".join(part for part in parts if part)
  return texts


def item_text_states(encoder, data_dir, max_length: int = 32, cache_dir=None, **kwargs):
  """`encode_strings_cached` over `item_texts(data_dir)`: row i = item id i."""
  return encode_strings_cached(encoder, item_texts(data_dir), max_length, cache_dir, **kwargs)
