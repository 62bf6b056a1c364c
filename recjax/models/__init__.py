"""Model families. Parameters carry logical axis names; `recjax.train` shards them.

Flax's eager per-variable sharding is turned off: recjax creates parameters already
sharded by jitting the initializer with `out_shardings` from the logical axis rules
(`recjax.train.mesh`), which works the same on one device and on a pod.
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
