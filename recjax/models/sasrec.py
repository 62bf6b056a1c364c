"""SASRec with full cross-entropy ("SASRec+"): causal attention, a next-item target at
every position, softmax over the whole catalog.

Kang & McAuley (2018) trained SASRec with one sampled negative per position; Klenitskiy
& Vasilev (2023) showed that the same network trained with full-catalog cross-entropy
beats Bert4Rec on the usual benchmarks. Here it is the Bert4Rec network with
`causal=True` fed by `NextItemPackingConverter` (inputs items[:-1], targets items[1:],
all positions weighted): one pass trains on every prefix of every sequence. The loss is
Bert4Rec's gathered-positions cross-entropy with room for every position.

`num_negatives=N` (> 0) swaps the full softmax for a sampled one during training: N
item ids drawn uniformly (with replacement) per step, shared by every position, scored
next to each position's own target (a negative equal to the target is masked). Uniform
proposals need no log-Q correction (it is one constant per logit). The output layer then
costs N instead of V dot products per position, which is most of a step's FLOPs at 12K
items; evaluation and the validation loss stay full-catalog.

Evaluation shares Bert4Rec's converter (history, MASK, padding): the query is the hidden
state of the last history item, which under causal attention never sees the MASK that
follows it. So export, `recjax evaluate` and `recjax infer` work unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.models import bert4rec


@dataclasses.dataclass
class SASRec(bert4rec.Bert4Rec):
  causal: bool = True
  max_predictions_fraction: float = 1.0  # every non-padding position is a target
  num_negatives: int = 0  # > 0: sampled softmax over this many shared uniform negatives

  def __post_init__(self):
    if not self.causal:
      raise ValueError("SASRec predicts the next item at every position, which needs causal=True "
                       "(a bidirectional encoder would see the target); use Bert4Rec for cloze training")
    if self.num_negatives < 0:
      raise ValueError(f"SASRec.num_negatives must be >= 0 (0 = full softmax), got {self.num_negatives}")

  def loss_fn(self, net, batch, rng):
    if rng is None or self.num_negatives == 0:
      return super().loss_fn(net, batch, rng)
    rng, neg_rng = jax.random.split(rng)
    hidden = self.hidden(net, batch, deterministic=False, rngs=nnx.Rngs(dropout=rng))
    queries, targets, w = self.gather_targets(net, hidden, batch)
    table, bias = self.output_table(net, batch.get("frozen"))
    negatives = jax.random.randint(neg_rng, (self.num_negatives,), bert4rec.NUM_RESERVED, self.vocab_size)
    dot = lambda q, t: jnp.einsum("...d,...d->...", q, t.astype(q.dtype), preferred_element_type=jnp.float32)
    positive = dot(queries, table[targets]) + bias[targets]
    negative = jnp.einsum("cd,nd->cn", queries, table[negatives].astype(queries.dtype),
                          preferred_element_type=jnp.float32) + bias[negatives]
    negative = jnp.where(negatives[None, :] == targets[:, None], -jnp.inf, negative)
    nll = jnp.logaddexp(positive, jax.nn.logsumexp(negative, axis=-1)) - positive
    correct = (positive > jnp.max(negative, axis=-1)).astype(jnp.float32)  # among the sampled
    return self.loss_and_metrics(nll, correct, w, batch)

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
