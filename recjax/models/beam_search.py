"""Batched beam search over semantic IDs, optionally constrained by a prefix trie.

Decoding runs a fixed number of steps (the ID length, one token per level). At step l
only level l's codebook range of the vocabulary is searched (a token of another level has
no meaning at that position; `free=True` lifts this, to measure unconstrained decoding
over the whole vocabulary); within that range the trie decides which codes are valid.

The trie is a dense automaton built once in numpy: `children[l]` is int32
[num_nodes_l, size_l]; row n is the node reached by a valid (l)-prefix and column c holds
the node id of the (l+1)-prefix extended by code c, or -1 when that prefix is not part of
any item's ID. At the last level the "node" is the item id itself. Each beam carries its
node id, so the mask at step l is one gather (`children[l][node] >= 0`) and the item id
falls out of the last gather: everything stays inside jit, no host round trips. Memory is
num_prefixes_l x size_l int32 per level (Beauty, 12,101 items: 20 MB).

Duplicates: the beams are distinct token sequences at every step (step 0 starts from one
live beam, later steps extend distinct parents by distinct (parent, code) pairs), and a
valid 4-token ID names exactly one item (the unique 4th level), so with the trie the K
returned items are distinct by construction; dead beams (fewer valid IDs than beams) carry
score -inf and item -1.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@flax.struct.dataclass
class TrieTables:
  """Per-level transition tables (see the module docstring). A pytree whose leaves are the
  tables, so jitted functions take it as an argument; offsets and sizes stay static."""
  children: tuple  # L arrays, int32 [num_nodes_l, size_l]
  offsets: tuple = flax.struct.field(pytree_node=False)  # level l's code c is token offsets[l] + c
  sizes: tuple = flax.struct.field(pytree_node=False)  # codes per level


def build_trie_tables(codes: np.ndarray, item_ids: np.ndarray, offsets: Sequence[int],
                      sizes: Sequence[int]) -> TrieTables:
  """codes int [N, L] (level-local, unique rows) of items `item_ids` [N] -> TrieTables."""
  codes = np.asarray(codes, np.int64)
  item_ids = np.asarray(item_ids, np.int64)
  if len(np.unique(codes, axis=0)) != len(codes):
    raise ValueError("semantic IDs must be unique to build the decoding trie")
  num_levels = codes.shape[1]
  node = np.zeros(len(codes), np.int64)  # every item starts at the root (node 0 of level 0)
  children = []
  for l in range(num_levels):
    if l + 1 < num_levels:
      # node ids of level l + 1: the distinct (l + 1)-prefixes, in sorted order
      _, child = np.unique(codes[:, :l + 1], axis=0, return_inverse=True)
      child = child.reshape(-1)
    else:
      child = item_ids
    table = np.full((int(node.max()) + 1, int(sizes[l])), -1, np.int32)
    table[node, codes[:, l]] = child
    children.append(jnp.asarray(table))
    node = child
  return TrieTables(tuple(children), tuple(int(o) for o in offsets), tuple(int(s) for s in sizes))


def trie_tables_of(sids) -> TrieTables:
  """TrieTables of a `recjax.models.rqvae.SemanticIds` (items 2.. with codes)."""
  items = np.flatnonzero(np.all(sids.codes >= 0, axis=1))
  return build_trie_tables(sids.codes[items], items, sids.offsets, sids.codebook_sizes)


def _gather_beams(tree, index):
  """Reorders every [B * K, ...] leaf by flat beam `index` [B * K]."""
  return jax.tree.map(lambda x: x[index], tree)


def _level_columns(vocab: int, offset: int, size: int, free: bool) -> np.ndarray:
  """Token ids that may be emitted at a level: its codebook range, or (free) all of them."""
  return np.arange(vocab) if free else np.arange(offset, offset + size)


def _next_nodes(table, node, cols: np.ndarray, offset: int, size: int):
  """[..., len(cols)]: the child node of each beam for each emitted token (-1: no item)."""
  code = cols - offset
  in_level = (code >= 0) & (code < size)
  nxt = table[jnp.maximum(node, 0)][..., np.clip(code, 0, size - 1)]
  return jnp.where((node[..., None] >= 0) & in_level, nxt, -1)


def beam_search(step_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]], state: Any, *,
                batch_size: int, num_beams: int, tables: TrieTables, constrained: bool = True,
                free: bool = False, start_token: int = 0):
  """Beam search for len(tables.sizes) steps.

  step_fn(state, tokens [B * K]) -> (logits [B * K, V] over the whole token vocabulary,
  state); `state` is a pytree whose leaves lead with B * K (batch-major: row b * K + k),
  e.g. a decoder's self-attention cache; it is reordered with the beams. The first call
  receives `start_token`.

  Scores are sums of the model's log-probabilities (softmax over the full vocabulary, so
  masking never inflates a score). constrained=True: only trie-valid codes. False: any
  code of the level's codebook, so IDs that name no item can come out (item -1); with
  free=True as well, any token of the vocabulary (pad, eos, another level's code), which
  also makes the ID invalid.

  Returns (tokens int32 [B, K, L], scores float32 [B, K] best first, items int32 [B, K]
  with -1 for invalid IDs or dead beams).
  """
  b, k = batch_size, num_beams
  # Only beam 0 is live at the start, so step 0 expands one prefix, not K copies of it.
  scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (b, 1))
  node = jnp.zeros((b, k), jnp.int32)  # -1 once a beam's prefix leaves the trie
  tokens = jnp.zeros((b, k, 0), jnp.int32)
  feed = jnp.full((b * k,), start_token, jnp.int32)
  for level, (table, offset, size) in enumerate(zip(tables.children, tables.offsets, tables.sizes)):
    logits, state = step_fn(state, feed)
    cols = _level_columns(logits.shape[-1], offset, size, free and not constrained)
    width = len(cols)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, cols].reshape(b, k, width)
    nxt = _next_nodes(table, node, cols, offset, size)  # [B, K, width]
    if constrained:
      logp = jnp.where(nxt >= 0, logp, NEG_INF)
    cand = (scores[..., None] + logp).reshape(b, k * width)
    scores, flat = jax.lax.top_k(cand, k)  # sorted, best first
    parent, token = flat // width, jnp.asarray(cols, jnp.int32)[flat % width]
    node = jnp.take_along_axis(nxt.reshape(b, k * width), flat, axis=1)
    tokens = jnp.concatenate([jnp.take_along_axis(tokens, parent[..., None], axis=1), token[..., None]], -1)
    if level + 1 < len(tables.sizes):
      state = _gather_beams(state, (parent + jnp.arange(b)[:, None] * k).reshape(-1))
      feed = token.reshape(-1)
  items = jnp.where(jnp.isfinite(scores), node, -1).astype(jnp.int32)
  return tokens, scores, items


def invalid_fraction(items: jax.Array, scores: jax.Array, top: int | None = None) -> jax.Array:
  """Fraction of the live beams (finite score) among the first `top` whose ID names no item."""
  items, scores = items[:, :top], scores[:, :top]
  live = jnp.isfinite(scores)
  return jnp.sum(live & (items < 0)) / jnp.maximum(jnp.sum(live), 1)


def brute_force_top_k(log_prob_fn: Callable[[np.ndarray], np.ndarray], tables: TrieTables, k: int,
                      constrained: bool = True, free: bool = False):
  """Reference for tests: scores every sequence (small vocabularies only), emitting the
  same tokens per level as `beam_search` with these flags.

  log_prob_fn(prefix tokens [n, l]) -> log-probabilities [n, V] of the next token.
  Returns (tokens [k, L], scores [k]) sorted by score (ties by enumeration order).
  """
  children = [np.asarray(t) for t in tables.children]
  seqs, scores, node = np.zeros((1, 0), np.int64), np.zeros(1), np.zeros(1, np.int64)
  for table, offset, size in zip(children, tables.offsets, tables.sizes):
    logp = np.asarray(log_prob_fn(seqs))
    cols = _level_columns(logp.shape[-1], offset, size, free and not constrained)
    nxt = np.full((len(seqs), len(cols)), -1, np.int64)
    for j, tok in enumerate(cols):  # plain loops: independent of the jitted gathers
      if offset <= tok < offset + size:
        nxt[:, j] = np.where(node >= 0, table[np.maximum(node, 0), tok - offset], -1)
    logp = logp[:, cols]
    if constrained:
      logp = np.where(nxt >= 0, logp, -np.inf)
    n = len(seqs)
    seqs = np.concatenate([np.repeat(seqs, len(cols), 0), np.tile(cols, n)[:, None]], 1)
    scores = (scores[:, None] + logp).reshape(-1)
    node = nxt.reshape(-1)
    keep = np.isfinite(scores)
    seqs, scores, node = seqs[keep], scores[keep], node[keep]
  order = np.argsort(-scores, kind="stable")[:k]
  return seqs[order], scores[order]


__all__ = ["TrieTables", "build_trie_tables", "trie_tables_of", "beam_search", "invalid_fraction",
           "brute_force_top_k"]
