"""The soft-prompt fusion inputs of "Beyond Retrieval" (LUMEN's `soft_prompt`), built
from a prepared dataset and its artifacts and handed to the model as frozen inputs by
the REGEN text tasks (tasks/text.py):

  wals_item_vectors      [vocab, dim]  the `wals` artifact's item vectors (fitted on the
                                       training part), scaled to mean norm 1 over real items
  interaction_content    [1 + interactions, D]  the unit-normalised sum of the item text's
                                       (`text_embeddings` artifact) and the review's sentence
                                       embeddings; row 0 = no interaction
  interaction_offsets    [num_users + 1]  user u's interactions are rows offsets[u] + 1 ...
                                       offsets[u + 1] of interaction_content (users in id order)

Both artifacts are built by `recjax fit` (gin/fits/wals.gin, gin/fits/text_embeddings.gin);
reviews are embedded once by the same encoder and cached under DIR/text_cache/.
"""

from __future__ import annotations

import logging
import pathlib
import time

import numpy as np

log = logging.getLogger("recjax.fusion")
NUM_RESERVED = 2  # PAD, MASK

def interaction_index(data_dir) -> tuple[np.ndarray, np.ndarray]:
  """(offsets int64 [num_users + 1], items [interactions]): user u's interactions are rows
  offsets[u]:offsets[u + 1] of the flattened sequences (users in id order)."""
  from recjax.data.prepared import PreparedDataset
  table = PreparedDataset(data_dir).sequences(["user_id", "items"])
  users = table.column("user_id").to_numpy()
  if not np.array_equal(users, np.arange(len(users))):
    raise ValueError(f"{data_dir}: sequences are not stored in user-id order")
  items = table.column("items").combine_chunks()
  return (np.asarray(items.offsets, np.int64),
          np.asarray(items.values.to_numpy(zero_copy_only=False), np.int64))


def wals_item_vectors(data_dir, wals: str = "wals") -> np.ndarray:
  """float32 [vocab, dim]: the `wals` artifact's item vectors, mean norm 1 over real items."""
  from recjax.artifacts import wals as wals_artifact
  from recjax.models import wals as wals_lib
  model = wals_artifact.load(data_dir, wals)
  vocab = len(model.item_factors)
  cf = wals_lib.normalize_by_mean_norm(model.item_factors, rows=np.arange(NUM_RESERVED, vocab))
  cf[:NUM_RESERVED] = 0
  return cf.astype(np.float32)


def interaction_offsets(data_dir) -> np.ndarray:
  return interaction_index(data_dir)[0]


def interaction_content(data_dir, embeddings: str = "minilm", log_fn=log.info) -> np.ndarray:
  """float32 [1 + interactions, D] (see the module docstring)."""
  from recjax.artifacts import text_embeddings
  from recjax.data.prepared import PreparedDataset
  item_text, meta = text_embeddings.load(data_dir, embeddings)
  encoder = text_embeddings.load_encoder(meta)
  table = PreparedDataset(data_dir).sequences(["items", "reviews"]).to_pydict()
  flat_items = np.asarray([i for seq in table["items"] for i in seq], np.int64)
  reviews = [str(r or "") for seq in table["reviews"] for r in seq]
  review_emb = _review_embeddings(data_dir, encoder, reviews, log_fn)
  content = item_text[flat_items] + review_emb
  content /= np.maximum(np.linalg.norm(content, axis=-1, keepdims=True), 1e-12)
  return np.concatenate([np.zeros((1, content.shape[1]), np.float32), content]).astype(np.float32)


def _review_embeddings(data_dir, encoder, reviews: list[str], log_fn) -> np.ndarray:
  """Sentence embeddings of the reviews (empty ones: zeros), each distinct text once, cached."""
  from recjax.artifacts import text_embeddings as te
  unique = sorted(set(r for r in reviews if r.strip()))
  path = pathlib.Path(data_dir) / "text_cache" / f"reviews-{te.strings_key(encoder.fingerprint, unique)}.npy"
  if path.is_file():
    emb = np.load(path)
  else:
    start = time.perf_counter()
    emb = te.embed_by_length(encoder, unique) if unique else np.zeros((0, encoder.dim), np.float32)
    te.save_npy_atomic(path, emb)
    if log_fn:
      log_fn(f"embedded {len(unique):,} distinct reviews with {encoder.name} in "
             f"{time.perf_counter() - start:.0f}s -> {path}")
  index = {r: i for i, r in enumerate(unique)}
  out = np.zeros((len(reviews), encoder.dim), np.float32)
  for i, r in enumerate(reviews):
    if r in index:
      out[i] = emb[index[r]]
  return out
