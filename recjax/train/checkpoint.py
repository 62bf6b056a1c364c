"""Orbax checkpoints of (train state, data-iterator position, operative config).

A checkpoint step directory holds three items:
  state   the TrainState arrays (sharded save/restore through orbax)
  data    the data iterator's JSON state, so training resumes on exactly the next batch
  config  the operative gin config and the parameter shapes of the model that wrote it,
          so a checkpoint from a different model is refused with one clear sentence
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  pass


def param_shapes(params) -> dict[str, list[int]]:
  """{'path/to/param': shape} of a parameter tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(_key(k) for k in path): list(x.shape) for path, x in flat}


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


class Checkpointer:
  """Keep-N checkpoint manager over MODEL_DIR/checkpoints."""

  def __init__(self, model_dir, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(model_dir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=force)

  def read_config(self, step: int) -> dict[str, Any]:
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out.config

  def restore(self, step: int, abstract_state, expected_shapes: dict[str, list[int]]):
    """Restores (state, data_state, config) after checking the model's shapes match."""
    config = self.read_config(step)
    saved = config.get("param_shapes", {})
    if saved != expected_shapes:
      raise CheckpointMismatchError(_mismatch_sentence(self.directory / str(step), saved, expected_shapes))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} has the same parameters but a differently shaped "
          "optimizer state (e.g. gradient clipping or the optimizer changed); resume with the "
          "optimizer configuration it was trained with, or use a fresh MODEL_DIR") from None
    return out.state, out.data, out.config

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _mismatch_sentence(where, saved: dict, expected: dict) -> str:
  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  differ = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if differ:
    k = differ[0]
    what = f"parameter {k} has shape {tuple(saved[k])} in the checkpoint but {tuple(expected[k])} here"
  elif missing:
    what = f"the checkpoint has no parameter {missing[0]}"
  else:
    what = f"the checkpoint has a parameter {extra[0]} this model lacks"
  return (f"checkpoint {where} was written by a different model: {what} "
          f"({len(differ) + len(missing) + len(extra)} mismatches); use a fresh MODEL_DIR or the "
          "model configuration it was trained with")
