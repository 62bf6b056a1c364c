"""Orbax checkpoints of a fit in progress (RQ-VAE, WALS), kept in the artifact's build dir.

A fit's state is any pytree of arrays; it is saved as its flat list of leaves and restored
into the structure of a freshly initialised one, so the fitting code (in `recjax.models`)
needs no knowledge of files. `extra` is JSON beside it (e.g. the loss history).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


class FitInterrupted(Exception):
  """Raised by a fit told to stop after N steps (tests, time-boxed runs); its checkpoint stays."""

  def __init__(self, step: int, directory):
    super().__init__(f"fit stopped at step {step}; rerun the same command to resume from {directory}")
    self.step = step


class FitCheckpoints:
  """Keep-N synchronous orbax checkpoints under `directory`."""

  def __init__(self, directory, *, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree, extra: dict) -> None:
    leaves = {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                    extra=ocp.args.JsonSave(extra)), force=True)
    self.manager.wait_until_finished()

  def restore(self, template):
    """(tree shaped like `template`, extra, step) of the latest checkpoint, or None."""
    step = self.latest_step()
    if step is None:
      return None
    leaves, treedef = jax.tree.flatten(template)
    abstract = {str(i): jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for i, x in enumerate(leaves)}
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             extra=ocp.args.JsonRestore()))
    tree = jax.tree.unflatten(treedef, [out.state[str(i)] for i in range(len(leaves))])
    return tree, out.extra, step

  def close(self) -> None:
    self.manager.close()
