"""SASRec with full cross-entropy ("SASRec+"): causal attention, a next-item target at
every position, softmax over the whole catalog.

Kang & McAuley (2018) trained SASRec with one sampled negative per position; Klenitskiy
& Vasilev (2023) showed that the same network trained with full-catalog cross-entropy
beats Bert4Rec on the usual benchmarks. Here it is the Bert4Rec network with
`causal=True` fed by `NextItemPackingConverter` (inputs items[:-1], targets items[1:],
all positions weighted): one pass trains on every prefix of every sequence. The loss is
Bert4Rec's gathered-positions cross-entropy with room for every position.

The output layer's loss is Bert4Rec's, chosen in gin (`loss`, recjax/models/losses.py):
the full softmax, the exact chunked one (no [positions x catalogue] logits), or a sampled
softmax (`num_negatives=N`: N ids shared by every position, uniform, popularity or mixed,
plus `in_batch_negatives` of the step's targets, log-Q corrected). Sampled, the output
layer costs N instead of V dot products per position, which is most of a step's FLOPs at
12K items; evaluation and the validation loss stay full-catalog.

Evaluation shares Bert4Rec's converter (history, MASK, padding): the query is the hidden
state of the last history item, which under causal attention never sees the MASK that
follows it. So export, `recjax evaluate` and `recjax infer` work unchanged.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from recjax.models import bert4rec


@dataclasses.dataclass
class SASRec(bert4rec.Bert4Rec):
  causal: bool = True
  max_predictions_fraction: float = 1.0  # every non-padding position is a target
  # Leave the items a position has already read (its sequence up to it, the target
  # excepted) out of its softmax: ranking excludes the user's history, so training need
  # not push those items down, which with tied embeddings pulls against placing an item
  # near the items bought after it.
  loss_excludes_history: bool = False
  EVAL_QUERY_OFFSET = 1  # the query is the last history item, the MASK after it is never read

  def __post_init__(self):
    if not self.causal:
      raise ValueError("SASRec predicts the next item at every position, which needs causal=True "
                       "(a bidirectional encoder would see the target); use Bert4Rec for cloze training")
    super().__post_init__()
    if self.loss_excludes_history and self.train_loss == "sampled":
      raise ValueError(f"{type(self).__name__}.loss_excludes_history needs the full or chunked loss, "
                       "not a sampled one")

  def excluded_ids(self, batch):
    """With `loss_excludes_history`, each position's softmax leaves out the items of its
    sequence up to and including it (history_ids)."""
    return history_ids(batch) if self.loss_excludes_history else None

  def feature_converter(self, pack: bool = True, seed: int = 0):
    del seed  # next-item targets are deterministic
    from recjax.data.converters import NextItemPackingConverter
    return NextItemPackingConverter(pack=pack)

  def queries(self, net, batch):
    """Eval: the query at each row's last history item, float32 [B, D]."""
    hidden = self.hidden(net, batch, deterministic=True)
    # A row with no history (mask_position 0) falls back to the MASK position itself.
    last = jnp.maximum(batch["mask_position"] - 1, 0)
    at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return net.query(at_last).astype(jnp.float32)


def history_ids(batch):
  """[B * L, L]: per position, the input ids of its segment at it and before (0 elsewhere):
  what a causal query at that position has read."""
  inputs, segs = batch["inputs"], batch["segment_ids"]
  b, length = inputs.shape
  read = (segs[:, :, None] == segs[:, None, :]) & (segs[:, :, None] > 0) & jnp.tril(jnp.ones((length, length), bool))
  return jnp.where(read, inputs[:, None, :], 0).reshape(b * length, length)
