"""Bert4Rec over packed item sequences (Sun et al. 2019), as a recjax model.

The network: item embedding + per-segment position embedding -> LayerNorm -> N post-LN
transformer blocks with segment-aware attention (`position_encoding='relative'`: no position
embedding, a learned per-head bias by query-minus-key distance instead) -> at the prediction positions, a BERT
MLM transform (dense + GELU + LayerNorm) -> scores against the item table (tied to the
input embedding, or a separate output table) plus a per-item bias. PAD and MASK are never
scored.

The model object (what gin's `MODEL` builds) follows the t5x protocol: `loss_fn`,
`score_queries` (for full-catalog ranking), `get_initial_variables`, and its feature
converters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.models import base
from recjax.models import layers
from recjax.models import losses

PAD_ID, MASK_ID, NUM_RESERVED = 0, 1, 2  # fixed by every prepared dataset (docs/data.md)
POSITION_ENCODINGS = ("absolute", "inverse", "relative", "both")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown compute dtype {name!r}; choose one of {sorted(_DTYPES)}")
  return _DTYPES[name]


class Bert4RecNetwork(nnx.Module):
  def __init__(self, *, vocab_size: int, max_length: int, dim: int, num_layers: int, num_heads: int,
               mlp_dim: int, dropout: float, attention_dropout: float, tie_embeddings: bool,
               dtype, rngs: nnx.Rngs, causal: bool = False, position_encoding: str = "absolute"):
    init = nnx.initializers.truncated_normal(0.02)
    # The item table is the largest tensor: 'item' maps to the `model` mesh axis.
    self.items = nnx.Embed(vocab_size, dim, dtype=dtype, param_dtype=jnp.float32,
                           embedding_init=layers.param_init(init, "item", "embed"), rngs=rngs)
    self.positions = nnx.Embed(max_length, dim, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=layers.param_init(init, None, "embed"), rngs=rngs
                               ) if position_encoding in ("absolute", "both") else None
    # One learned bias per head and query-minus-key distance, shared by every layer: the
    # query sees its history by recency, as in a right-aligned row, wherever it sits.
    self.relative_bias = nnx.Param(layers.param_init(nnx.initializers.zeros_init(), "heads", None)(
        rngs.params(), (num_heads, max_length if causal else 2 * max_length - 1), jnp.float32)
    ) if position_encoding in ("relative", "both") else None
    self.norm = layers.layer_norm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.blocks = nnx.List([
        layers.TransformerBlock(dim, num_heads, mlp_dim, rngs=rngs, dtype=dtype, dropout=dropout,
                                attention_dropout=attention_dropout) for _ in range(num_layers)])
    self.head = layers.dense(dim, dim, ("embed", "embed_out"), rngs=rngs, dtype=dtype)
    self.head_norm = layers.layer_norm(dim, rngs=rngs)
    self.output_items = None if tie_embeddings else nnx.Param(
        layers.param_init(init, "item", "embed")(rngs.params(), (vocab_size, dim), jnp.float32))
    self.output_bias = nnx.Param(
        layers.param_init(nnx.initializers.zeros_init(), "item")(rngs.params(), (vocab_size,), jnp.float32))
    self.dtype = dtype
    self.causal = causal

  def encode(self, inputs, segment_ids, positions, *, deterministic: bool, rngs=None, extra=None,
             item_rows: base.ItemRows | None = None):
    """Hidden states [B, L, D] of a (packed) batch; `extra` [B, L, D] is added to the
    input embeddings (FLARE's fused text context); `item_rows`: the item embeddings are
    read through it (a train step that differentiates gathered rows, base.ItemRows)."""
    items = self.items(inputs) if item_rows is None else (
        item_rows.take("items", self.items.embedding[...], inputs).astype(self.dtype))
    x = items if self.positions is None else items + self.positions(positions)
    if extra is not None:
      x = x + extra
    x = self.dropout(self.norm(x), deterministic=deterministic, rngs=rngs).astype(self.dtype)
    # causal=True is the "without bidirectional attention" ablation: a position sees only
    # its own segment's past, so the model reads the history left to right.
    mask = layers.segment_mask(segment_ids, causal=self.causal)
    bias = None if self.relative_bias is None else layers.relative_position_bias(
        self.relative_bias[...], positions, causal=self.causal)
    for block in self.blocks:
      x = block(x, mask, deterministic=deterministic, rngs=rngs, bias=bias)
    return x

  def query(self, hidden):
    """The MLM transform: hidden states -> vectors scored against the item table."""
    return self.head_norm(jax.nn.gelu(self.head(hidden), approximate=False))

  def item_table(self, item_rows: base.ItemRows | None = None):
    """(embeddings [V, D], bias [V]) that queries are scored against, float32; with
    `item_rows`, views of them that read the gathered rows (indexing only)."""
    name = "items" if self.output_items is None else "output_items"
    table = self.items.embedding if self.output_items is None else self.output_items
    if item_rows is None:
      return table[...], self.output_bias[...]
    return item_rows.view(name, table[...]), item_rows.view("output_bias", self.output_bias[...])


@dataclasses.dataclass
class Bert4Rec:
  """Bert4Rec hyper-parameters + the model protocol used by the trainer and evaluators.

  Defaults follow FLARE Table 2's Bert4Rec scale for Amazon data (small models: the data
  are small). `vocab_size` comes from the task's item vocabulary at build time.
  """

  vocab_size: int = 0  # set by the trainer from the task's item vocabulary
  max_length: int = 50
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout: float = 0.2
  attention_dropout: float = 0.2
  tie_embeddings: bool = True
  dtype: str = "float32"
  max_predictions_fraction: float = 0.25  # capacity of gathered loss positions per batch
  vocab_multiple: int = 128  # item table rows padded so it splits evenly over any mesh axis
  mask_prob: float = 0.15  # cloze masking rate of the training converter
  last_item_prob: float = 0.1  # fraction of training sequences with only the last item masked
  # Train on every prefix of each sequence as its own example (with last_item_prob=1: each
  # prefix's last item masked, the evaluation layout), as BSARec-style repositories do.
  prefixes: bool = False
  causal: bool = False  # True: left-to-right attention (ablation of bidirectional attention)
  # "absolute": a learned embedding of the position in the sequence, added to the input;
  # "inverse": the same embedding indexed by the distance to the sequence's last item (the
  # last history item at evaluation), so the newest item always has the same embedding, as
  # in a left-padded SASRec row; "relative": no embedding, a learned per-head attention bias
  # by query-minus-key distance (every causal query reads its history by recency); "both":
  # absolute + relative.
  position_encoding: str = "absolute"
  # The training loss's output layer (recjax/models/losses.py): "full" ([P, V] logits),
  # "chunked" (exact, streamed over loss_chunk items), "sampled" (log-Q corrected, over
  # num_negatives ids drawn by `negatives` plus in_batch_negatives of the step's targets);
  # "auto": sampled when negatives are configured, else chunked. Evaluation is unaffected.
  loss: str = "auto"
  # Items per chunk of the chunked loss; 0: about 1.6M logits per chunk (SASRec+ on Beauty,
  # 6,400 positions: 256 items, fastest of 256 / 1024 / 4096; fewer positions, wider chunks).
  loss_chunk: int = 0
  num_negatives: int = 0
  negatives: str = "uniform"  # uniform | popularity | mixed (popularity_mix of them by popularity)
  popularity_mix: float = 0.5
  in_batch_negatives: int = 0

  def __post_init__(self):
    if self.loss not in ("auto", *losses.LOSSES):
      raise ValueError(f"{type(self).__name__}.loss must be one of auto, {', '.join(losses.LOSSES)}; "
                       f"got {self.loss!r}")
    if self.num_negatives < 0 or self.in_batch_negatives < 0:
      raise ValueError(f"{type(self).__name__}.num_negatives and in_batch_negatives must be >= 0, got "
                       f"{self.num_negatives}, {self.in_batch_negatives}")
    if self.negatives not in losses.SAMPLERS:
      raise ValueError(f"{type(self).__name__}.negatives must be one of {losses.SAMPLERS}, got {self.negatives!r}")
    if self.train_loss == "sampled" and self.num_negatives + self.in_batch_negatives == 0:
      raise ValueError(f"{type(self).__name__}.loss='sampled' needs num_negatives > 0 or in_batch_negatives > 0")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(f"{type(self).__name__}.position_encoding must be one of {POSITION_ENCODINGS}, "
                       f"got {self.position_encoding!r}")
    if not 0.0 <= self.popularity_mix <= 1.0:
      raise ValueError(f"{type(self).__name__}.popularity_mix must be in [0, 1], got {self.popularity_mix}")

  @property
  def train_loss(self) -> str:
    if self.loss != "auto":
      return self.loss
    return "sampled" if self.num_negatives or self.in_batch_negatives else "chunked"

  @property
  def needs_popularity(self) -> bool:
    return self.train_loss == "sampled" and (
        self.in_batch_negatives > 0 or (self.num_negatives > 0 and self.negatives != "uniform"))

  def frozen_input_specs(self) -> dict:
    """The training split's item counts when the loss samples by popularity ({} otherwise)."""
    return {"item_counts": base.TrainItemCounts(rows=self.padded_vocab_size)} if self.needs_popularity else {}

  def finish_frozen(self, arrays: dict) -> dict:
    """The popularity sampler's tables, from the counts."""
    if "item_counts" not in arrays:
      return {}
    return {k: (v, (None,)) for k, v in
            losses.popularity_inputs(arrays["item_counts"], NUM_RESERVED, self.vocab_size).items()}

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  VOCAB_FEATURE = "items"  # the model contract (recjax/models/base.py)
  EVALUATOR = "ranking"

  def network_kwargs(self) -> dict:
    if self.vocab_size <= NUM_RESERVED:
      raise ValueError(f"{type(self).__name__}.vocab_size must exceed {NUM_RESERVED} (PAD, MASK), "
                       f"got {self.vocab_size}")
    return dict(vocab_size=self.padded_vocab_size, max_length=self.max_length, dim=self.dim,
                num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_dropout=self.attention_dropout,
                tie_embeddings=self.tie_embeddings, dtype=compute_dtype(self.dtype), causal=self.causal,
                position_encoding="absolute" if self.position_encoding == "inverse" else self.position_encoding)

  def network(self, rngs: nnx.Rngs) -> Bert4RecNetwork:
    return Bert4RecNetwork(**self.network_kwargs(), rngs=rngs)

  def hidden(self, net: Bert4RecNetwork, batch, *, deterministic: bool, rngs=None):
    """Hidden states [B, L, D] of a batch (subclasses add inputs beside the item ids)."""
    return net.encode(batch["inputs"], batch["segment_ids"], self.positions(batch),
                      deterministic=deterministic, rngs=rngs, item_rows=batch.get("item_rows"))

  # Where the query sits relative to its segment's last token in evaluation batches: 0 for
  # cloze models (the MASK is the query); SASRec+ reads the item before the MASK (1).
  EVAL_QUERY_OFFSET = 0

  def positions(self, batch):
    """The position ids the network embeds: the converter's per-segment positions, or
    with position_encoding="inverse" the distance to the segment's last token (minus
    EVAL_QUERY_OFFSET in evaluation batches, which carry "mask_position")."""
    pos = batch["positions"]
    if self.position_encoding != "inverse":
      return pos
    seg = batch["segment_ids"]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    last = jnp.max(jnp.where(same, pos[:, None, :], 0), axis=-1)
    if "mask_position" in batch:
      last = last - self.EVAL_QUERY_OFFSET
    return jnp.clip(last - pos, 0, self.max_length - 1)

  def feature_converter(self, pack: bool = True, seed: int = 0):
    """The training converter: cloze masking (seeded per example and epoch) + packing."""
    from recjax.data.converters import ItemSequencePackingConverter
    return ItemSequencePackingConverter(pack=pack, mask_prob=self.mask_prob,
                                        last_item_prob=self.last_item_prob, seed=seed, prefixes=self.prefixes)

  def eval_feature_converter(self):
    """Eval: history + [MASK], unpacked, the held-out item as the target."""
    from recjax.data.converters import ItemSequenceEvalConverter
    return ItemSequenceEvalConverter()

  def output_table(self, net: Bert4RecNetwork, frozen=None):
    """(embeddings [V, D], bias [V]) that queries are scored against, float32; subclasses
    may build it from frozen inputs too (FLARE's `output_text`)."""
    return net.item_table()

  def score_logits(self, net: Bert4RecNetwork, queries, frozen=None):
    """Full-vocabulary logits (float32); PAD, MASK and table padding pushed to -inf."""
    table, bias = self.output_table(net, frozen)
    logits = jnp.einsum("...d,vd->...v", queries, table.astype(queries.dtype),
                        preferred_element_type=jnp.float32) + bias
    ids = jnp.arange(logits.shape[-1])
    return jnp.where((ids < NUM_RESERVED) | (ids >= self.vocab_size), -jnp.inf, logits)

  def loss_fn(self, net: Bert4RecNetwork, batch, rng: jax.Array | None):
    """Cloze loss: softmax cross-entropy over the catalog at the masked positions.

    Only masked positions are scored (gathered into a fixed capacity, so the logits are
    [capacity, V] instead of [B * L, V]); the loss is normalised by the number of
    targets in the batch. Returns (loss, metrics) with float32 sums.
    """
    deterministic = rng is None
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    if deterministic or self.train_loss != "sampled":
      hidden = self.hidden(net, batch, deterministic=deterministic, rngs=rngs)
      return self.cloze_loss(net, hidden, batch)
    rng, neg_rng = jax.random.split(rng)  # dropout and negatives from separate streams
    hidden = self.hidden(net, batch, deterministic=False, rngs=nnx.Rngs(dropout=rng))
    return self.cloze_loss(net, hidden, batch, neg_rng)

  def item_ids(self, batch, rng: jax.Array | None):
    """Every item id whose table rows `loss_fn(net, batch, rng)` reads (the model contract's
    sparse gradients, base.py): inputs, targets (in-batch negatives are targets) and the
    sampled negatives, drawn from the stream `loss_fn` draws them from. None when the loss
    reads whole tables (full / chunked softmax, or no rng)."""
    if rng is None or self.train_loss != "sampled":
      return None
    return self._item_ids(batch, jax.random.split(rng)[1])

  def _item_ids(self, batch, neg_rng):
    negatives = losses.negative_ids(neg_rng, **self._sampling(batch.get("frozen")))
    return jnp.concatenate([batch["inputs"].reshape(-1), batch["targets"].reshape(-1), negatives])

  def _sampling(self, frozen) -> dict:
    """The sampled loss's arguments besides the scores: the same for drawing and scoring."""
    return dict(lo=NUM_RESERVED, hi=self.vocab_size, num_negatives=self.num_negatives, sampler=self.negatives,
                popularity_mix=self.popularity_mix, in_batch=self.in_batch_negatives, frozen=frozen)

  def gather_targets(self, net: Bert4RecNetwork, hidden, batch):
    """(queries [C, D], targets [C], weights [C], index [C]) of the loss positions,
    gathered into a fixed capacity C (index: their flat positions); slots past the
    batch's targets have weight 0."""
    weights = batch["weights"].reshape(-1)
    n = weights.shape[0]
    capacity = min(n, math.ceil(n * self.max_predictions_fraction) + 8)
    (index,) = jnp.nonzero(weights > 0, size=capacity, fill_value=0)
    valid = (jnp.arange(capacity) < jnp.sum(weights > 0)).astype(jnp.float32)
    return net.query(hidden.reshape(n, -1)[index]), batch["targets"].reshape(-1)[index], weights[index] * valid, index

  def excluded_ids(self, batch):
    """[B * L, K] ids each position's softmax leaves out, or None: every item competes
    (SASRec's `loss_excludes_history` overrides it)."""
    del batch
    return None

  def cloze_loss(self, net: Bert4RecNetwork, hidden, batch, rng=None):
    """(loss, metrics) of the cloze objective given the hidden states [B, L, D]; `rng`
    (training) draws a sampled loss's negatives."""
    queries, targets, w, index = self.gather_targets(net, hidden, batch)
    excluded = self.excluded_ids(batch)
    nll, correct = self.output_loss(net, queries, targets, w, batch.get("frozen"), rng, batch.get("item_rows"),
                                    excluded=None if excluded is None else excluded[index])
    return self.loss_and_metrics(nll, correct, w, batch)

  def output_loss(self, net: Bert4RecNetwork, queries, targets, w, frozen, rng, item_rows=None, excluded=None):
    """(nll [C], correct [C]) of the configured loss; without an rng (evaluation) a
    sampled loss falls back to the exact chunked one. `item_rows` (a sampled loss in a
    step that differentiates gathered rows): the output table is read through it.
    `excluded` [C, K] (full or chunked softmax): ids left out of each position's softmax
    (losses.exclude_from_softmax); `correct` still compares against every item."""
    kind = self.train_loss
    if kind == "sampled" and rng is None:
      kind = "chunked"
    if item_rows is not None and kind != "sampled":
      raise ValueError(f"the {kind} softmax reads the whole item table; gathered rows serve a sampled loss only")
    table, bias = self.output_table(net, frozen) if item_rows is None else net.item_table(item_rows)
    bounds = dict(lo=NUM_RESERVED, hi=self.vocab_size)
    if kind in ("full", "chunked"):
      if kind == "full":
        nll, correct = losses.full_softmax_xent(queries, table, bias, targets, **bounds)
      else:
        chunk = self.loss_chunk or max(256, (6400 * 256) // queries.shape[0])
        nll, correct = losses.chunked_softmax_xent(queries, table, bias, targets, chunk=chunk, **bounds)
      if excluded is not None:
        nll = losses.exclude_from_softmax(nll, queries, table, bias, targets, excluded, **bounds)
      return nll, correct
    if excluded is not None:
      raise ValueError("a sampled softmax cannot leave ids out of the catalogue's softmax; use the full or chunked loss")
    nll, correct, _ = losses.sampled_softmax_xent(queries, table, bias, targets, w, rng, **self._sampling(frozen))
    return nll, correct

  def loss_and_metrics(self, nll, correct, w, batch):
    """The mean loss over the batch's targets, and the float32 sums the trainer logs."""
    weights = batch["weights"]
    loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    metrics = {
        "loss_sum": jnp.sum(nll * w),
        "targets": jnp.sum(w),
        "accuracy_sum": jnp.sum(correct * w),
        "dropped_targets": jnp.sum(weights) - jnp.sum(w),
        "items": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }
    return loss, metrics

  def queries(self, net: Bert4RecNetwork, batch):
    """Eval: the query vector at each row's MASK position, float32 [B, D]."""
    hidden = self.hidden(net, batch, deterministic=True)
    at_mask = jnp.take_along_axis(hidden, batch["mask_position"][:, None, None], axis=1)[:, 0]
    return net.query(at_mask).astype(jnp.float32)


