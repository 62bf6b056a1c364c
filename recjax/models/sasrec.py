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
  EVAL_QUERY_OFFSET = 1  # the query is the last history item, the MASK after it is never read

  def __post_init__(self):
    if not self.causal:
      raise ValueError("SASRec predicts the next item at every position, which needs causal=True "
                       "(a bidirectional encoder would see the target); use Bert4Rec for cloze training")
    super().__post_init__()

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
