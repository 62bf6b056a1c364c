"""What ranking evaluation needs from a scoring model: queries and the item table.

Below both `evaluate` (which ranks with it) and the export reader (which builds one from
an export directory), so neither imports the other.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def jitted_for(trainer, key: tuple, build: Callable[[], Callable]) -> Callable:
  """The jitted function `build()` made for this trainer (and `key`: model, options), built
  once and kept in the trainer's `jit_cache`: a run that validates every N steps compiles
  its evaluation functions once, and they are freed with the trainer."""
  if key not in trainer.jit_cache:
    trainer.jit_cache[key] = build()
  return trainer.jit_cache[key]


class Scorer:
  """What evaluation needs from a model: query vectors for a batch and the item table."""

  def __init__(self, queries_fn: Callable, params, item_table: jax.Array, bias: jax.Array, vocab_size: int,
               batch_sharding: jax.sharding.Sharding | None = None):
    self.queries_fn, self.params = queries_fn, params
    self.item_table, self.bias, self.vocab_size = item_table, bias, vocab_size
    self.batch_sharding = batch_sharding

  def put(self, local: np.ndarray) -> jax.Array:
    """This process's rows of a batch as the global array every process computes on.

    With several processes each holds different users: their rows must become one global
    batch, or a computation partitioned across processes would mix them. Without a batch
    sharding (an export, one device) the rows are simply placed on the default device."""
    if self.batch_sharding is None:
      return jnp.asarray(local)
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local))
