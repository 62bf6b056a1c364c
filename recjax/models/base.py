"""The model contract: what the trainer, the evaluators and export know of a model.

A recjax model is a (gin-configured) dataclass of hyper-parameters. gin's `MODEL` names its
class; the entrypoints build it as `MODEL(vocab_size=V)`, with V the vocabulary size of the
task feature named by `VOCAB_FEATURE` ("items" for item-ID models, "targets" for
semantic-ID ones). The network is a Flax NNX module; everything else is a pure function
of (network, batch), so the trainer can jit one step over (graphdef, params) and shard it
with the logical axis names the parameters carry (t5x's `BaseModel` is the reference).

Two kinds of models, chosen by `EVALUATOR` (the name of the evaluator registered in
`recjax.evaluation.evaluators` that evaluates it by default):

  scoring    ("ranking")  `queries(net, batch)` -> [B, D] and `output_table(net, frozen)`
             -> (table [V, D], bias [V]): full-catalogue ranking is queries . table + bias
             (Bert4Rec, SASRec+, FLARE)
  generating ("generative_retrieval")  `predict_batch(net, batch, tables, num_beams=K)` ->
             (items [B, K], scores [B, K]), best first; `tables` is the decoding trie of
             the task's semantic IDs (TIGER; Mender later)

Frozen inputs (FLARE's cached text-encoder states, Mender's benchmark embeddings, every
item's semantic-ID tokens) are *named*, not built, by a model: the optional
`frozen_input_specs()` -> {key: spec} returns `TaskArray` / `ItemTextStates` / `StringStates` /
`TrainItemCounts` specs, which the
trainer fetches (`recjax.train.frozen`) from the task and its artifacts; the optional
`finish_frozen(arrays)` -> {name: (array, logical axes)} post-processes what was fetched
(pure numpy). The trainer places them on the mesh once and hands them to `loss_fn` /
`queries` as batch["frozen"]; they are never differentiated or checkpointed. A scoring
model may also derive frozen inputs from its parameters for inference:
`inference_frozen(net, frozen)` -> {name: array}, computed once per parameter set by the
scorer (evaluation, export) and added to batch["frozen"] (FLARE's per-item text vectors).

Sparse item-table gradients (optional, scoring models): `item_ids(batch, rng)` -> int32 ids
(any static shape, duplicates allowed) of every item row `loss_fn(net, batch, rng)` reads
from the item tables (the network's top-level parameters `items`, `output_items`,
`output_bias`: every parameter whose rows are items), or None when the loss reads whole
tables (full or chunked softmax, evaluation). With it and the sparse optimizer
(`recjax.train.sparse`), the trainer gathers those rows once, differentiates only them and
calls `loss_fn` with batch["item_rows"] = `ItemRows`; the network's item tables are then
constants, so the model must read every item row through `ItemRows.take` / `view` (a row
read directly gets no gradient). Ids keep their global values everywhere else (frozen
tables, popularity, PAD / MASK tests). A model without `item_ids` trains on dense
gradients of its tables.

Task fields (optional): `TASK_FIELDS` = {constructor argument: (task feature, vocabulary
attribute)} are passed to MODEL too, e.g. LUMEN's {"num_items": ("inputs_item_ids",
"vocab_size")} or ReAT's {"spm_model": ("targets", "sentencepiece_model_file")}.

Pretrained starts (optional): `initial_params(fresh)` -> the initial Param state, given the
freshly initialised one (e.g. a T5 / Gemma checkpoint's weights in its layout); the trainer
calls it once, before the first step, never on resumption.

Models import nothing from `recjax.train`, `recjax.evaluation`, `tasks`,
`recjax.data.formats` or `recjax.data.prepare` (tests/test_layering.py checks this).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@runtime_checkable
class Model(Protocol):
  """What every model provides."""

  vocab_size: int
  VOCAB_FEATURE: str  # the task feature whose vocabulary sets `vocab_size`
  EVALUATOR: str  # the evaluator that evaluates it by default

  def network(self, rngs: nnx.Rngs) -> nnx.Module:
    """A freshly initialised network (parameters carry logical axis names)."""

  def loss_fn(self, net: nnx.Module, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Metrics]:
    """(mean loss, float32 sums) of a batch; `rng` None means deterministic (no dropout).

    The sums the trainer reads: "loss_sum", "targets", "accuracy_sum", "items",
    "dropped_targets"; auxiliary losses add "<name>_sum" and "<name>_count"."""

  def feature_converter(self, pack: bool = True, seed: int = 0) -> Any:
    """The seqio.FeatureConverter of training batches."""

  def eval_feature_converter(self) -> Any:
    """The seqio.FeatureConverter of evaluation batches (one example per row)."""


@runtime_checkable
class ScoringModel(Model, Protocol):

  def queries(self, net: nnx.Module, batch: Batch) -> jax.Array:
    """float32 [B, D] query vectors of an evaluation batch."""

  def output_table(self, net: nnx.Module, frozen: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """(table [V, D], bias [V]) the queries are scored against."""


@runtime_checkable
class GenerativeModel(Model, Protocol):

  def predict_batch(self, net: nnx.Module, batch: Batch, tables: Any, *, num_beams: int,
                    constrained: bool = True, free: bool = False) -> tuple[jax.Array, jax.Array]:
    """(items [B, K], scores [B, K]) for K = num_beams, best first; item -1 names no item."""


@dataclasses.dataclass(frozen=True)
class TaskArray:
  """An array the task provides by name (`recjax.tasks.frozen_array`), e.g.
  "semantic_id_tokens", "item_embeddings", "preference_embeddings"."""
  name: str
  axes: tuple


@dataclasses.dataclass(frozen=True)
class ItemTextStates:
  """A frozen text encoder's token states of the task's item texts (row = item id, padded to
  `rows`) and, for tasks with critiques, of its critique strings; cached on disk. Fetched
  as {key: [rows, T, D], key_mask, and critique_text / critique_text_mask when present}."""
  encoder: str
  item_length: int
  critique_length: int
  rows: int
  item_fields: tuple[str, ...]  # which item fields make the text (recjax.models.text.cache.item_texts)
  cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class StringStates:
  """A frozen text encoder's token states of a list of strings the task provides by name
  (e.g. "preference_texts"), cached on disk. Fetched as {key: [N, length, D], key_mask}."""
  name: str
  encoder: str
  length: int
  cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainItemCounts:
  """How often each item id occurs in the task's training split, int64 [rows] (PAD / MASK
  0): a popularity sampler's source."""
  rows: int


def vocab_feature(model_factory) -> str:
  """The task feature whose vocabulary size a model class (or gin factory) is built with."""
  return getattr(model_factory, "VOCAB_FEATURE", "items")


def evaluator_name(model) -> str:
  return getattr(model, "EVALUATOR", "ranking")


class ItemRows:
  """The rows of the item tables one train step differentiates (see `item_ids`).

  ids: [K] the distinct item ids of the step, sorted, padded with an id past every table
  (no lookup matches it); rows: {table name: [K, ...] that table's rows at `ids`}, the
  variables the step differentiates. An id missing from `ids` (the step's row capacity
  ran out) reads the constant table: the forward stays exact, that row gets no gradient."""

  def __init__(self, ids: jax.Array, rows: dict[str, jax.Array]):
    self.ids, self.rows = ids, rows

  def take(self, name: str, table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] (global ids, any shape), differentiable through rows[name]."""
    local = jnp.minimum(jnp.searchsorted(self.ids, ids), self.ids.shape[0] - 1)
    hit = (self.ids[local] == ids).reshape(*ids.shape, *([1] * (table.ndim - 1)))
    return jnp.where(hit, self.rows[name][local], jax.lax.stop_gradient(table)[ids])

  def view(self, name: str, table: jax.Array) -> "RowView":
    return RowView(self, name, table)


class RowView:
  """An item table as `take` reads it: only indexing (`view[ids]`) is supported, which is
  all a sampled loss does with its table (`recjax.models.losses`)."""

  def __init__(self, item_rows: ItemRows, name: str, table: jax.Array):
    self.item_rows, self.name, self.table = item_rows, name, table
    self.shape, self.dtype = table.shape, table.dtype

  def __getitem__(self, ids):
    return self.item_rows.take(self.name, self.table, ids)
