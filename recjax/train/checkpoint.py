"""Orbax checkpoints of (train state, data-iterator position, operative config).

A checkpoint step directory holds three items:
  state   the TrainState arrays (sharded save/restore through orbax)
  data    the data iterator's JSON state, so training resumes on exactly the next batch
  config  the operative gin config, the parameter shapes of the model that wrote it and
          the identity of its dataset (recjax.data.identity), so a checkpoint from a
          different model or of a re-prepared dataset is refused with one clear sentence

Orbax commits a step atomically (written under a temporary name, renamed when complete),
so a kill during an async save leaves the previous step as the latest. It does not
notice flipped bytes, and a truncated file surfaces as a TensorStore error naming no
file; so once a step is committed its files' sha256 go to
MODEL_DIR/checkpoint_checksums/STEP.json (at the next save or at close: hashing is off the
step loop). `latest_step` skips a step whose files no longer match, with a warning
naming both steps, so training and evaluation fall back to the newest valid one.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from recjax import integrity

log = logging.getLogger("recjax.train")


class CheckpointMismatchError(ValueError):
  pass


class CheckpointCorrupt(ValueError):
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
    self.checksum_dir = self.directory.parent / "checkpoint_checksums"
    try:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save)
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "config"))
    except OSError as e:
      raise integrity.output_error(self.directory, e, "checkpoints to") from None
    self._in_flight: int | None = None  # the step an async save may still be writing
    self._verdicts: dict[int, str | None] = {}  # step -> why it is corrupt (None: valid)

  def latest_step(self) -> int | None:
    """The newest step whose files match their checksums (steps saved before checksums
    existed, or whose checksums were not written yet, count as valid)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      problem = self.corruption(step)
      if problem is None:
        return step
      fallback = next((s for s in steps[i + 1:] if self.corruption(s) is None), None)
      log.warning("checkpoint step %d is corrupt (%s); %s", step, problem,
                  f"falling back to step {fallback}" if fallback is not None else "no valid step is left")
    return None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def corruption(self, step: int) -> str | None:
    """Why `step`'s files do not match their checksums, or None."""
    if step == self._in_flight:
      return None
    if step not in self._verdicts:
      try:
        integrity.verify_checksums(self.directory / str(step), "checkpoint",
                                   name=self._checksum_name(step), required=False)
        self._verdicts[step] = None
      except integrity.IntegrityError as e:
        self._verdicts[step] = str(e)
    return self._verdicts[step]

  def _checksum_name(self, step: int) -> str:
    # verify_checksums resolves names against the step directory.
    return str(self.checksum_dir / f"{step}.json")

  def _seal(self, exclude: int | None = None) -> None:
    """Writes checksums of every committed step lacking them; drops those of deleted steps."""
    if jax.process_index() != 0:
      return
    steps = set(self.manager.all_steps())
    self.checksum_dir.mkdir(parents=True, exist_ok=True)
    for f in self.checksum_dir.glob("*.json"):
      if f.stem.isdigit() and int(f.stem) not in steps:
        f.unlink(missing_ok=True)
    for step in steps - {exclude}:
      target = self.checksum_dir / f"{step}.json"
      d = self.directory / str(step)
      if target.exists() or not d.is_dir():
        continue
      tmp = self.checksum_dir / f".{step}.json.tmp"
      try:
        files = [str(p.relative_to(d)) for p in sorted(d.rglob("*")) if p.is_file()]
        integrity.write_checksums(d, files, name=str(tmp))
        tmp.replace(target)
      except FileNotFoundError:  # orbax's max_to_keep removed the step meanwhile
        tmp.unlink(missing_ok=True)

  def _quarantine(self, step: int) -> None:
    """Moves a corrupt step out of orbax's way (a run that fell back past it saves that
    step again) into MODEL_DIR/corrupt_checkpoints, kept for inspection."""
    if jax.process_index() == 0:
      target = self.directory.parent / "corrupt_checkpoints" / str(step)
      target.parent.mkdir(parents=True, exist_ok=True)
      suffix = 0
      while target.exists():
        suffix += 1
        target = target.with_name(f"{step}.{suffix}")
      (self.directory / str(step)).replace(target)
      (self.checksum_dir / f"{step}.json").unlink(missing_ok=True)
      log.warning("moved corrupt checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"recjax_quarantine_{step}")
    self._verdicts.pop(step, None)
    self.manager.reload()

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
    if self._verdicts.get(step) is not None and step in self.manager.all_steps():
      self._quarantine(step)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config)), force=force)
      # save() waited for the previous async save: every other step is committed now.
      self._in_flight = step if saved else self._in_flight
      self._seal(exclude=self._in_flight)
    except OSError as e:
      raise integrity.output_error(self.directory / str(step), e, "checkpoint") from None
    return saved

  def read_config(self, step: int) -> dict[str, Any]:
    out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out.config

  def restore(self, step: int, abstract_state, expected_shapes: dict[str, list[int]], *,
              task: str | None = None, allow_dataset_change: bool | None = None):
    """Restores (state, data_state, config) after checking the files' checksums, the
    model's shapes and (for `task`, else the task it was trained on) the dataset."""
    where = self.directory / str(step)
    problem = self.corruption(step)
    if problem is not None:
      raise CheckpointCorrupt(f"checkpoint {where} is corrupt ({problem}); delete it to use an earlier step")
    try:
      config = self.read_config(step)
    except (OSError, ValueError, json.JSONDecodeError) as e:
      raise CheckpointCorrupt(f"cannot read the config of checkpoint {where}: {str(e).splitlines()[0][:200]}; "
                              "the checkpoint is incomplete or corrupt; delete it to use an earlier step") from None
    saved = config.get("param_shapes", {})
    if saved != expected_shapes:
      raise CheckpointMismatchError(_mismatch_sentence(where, saved, expected_shapes))
    self.check_dataset(step, config, task, allow_dataset_change)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise CheckpointCorrupt(f"cannot restore checkpoint {where}: {str(e).splitlines()[0][:200]}; "
                                "delete it to use an earlier step") from None
      raise CheckpointMismatchError(
          f"checkpoint {where} has the same parameters but a differently shaped "
          "optimizer state (e.g. gradient clipping or the optimizer changed); resume with the "
          "optimizer configuration it was trained with, or use a fresh MODEL_DIR") from None
    except Exception as e:  # TensorStore / orbax errors on truncated or missing files
      raise CheckpointCorrupt(f"cannot restore checkpoint {where} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); it is corrupt: delete it to use an "
                              "earlier step") from None
    return out.state, out.data, out.config

  def check_dataset(self, step: int, config: dict, task: str | None, allow_change: bool | None) -> None:
    """allow_change None: not training (evaluate, infer, export), where a model must meet
    the ids it was trained with."""
    from recjax.data import identity
    task = task or config.get("task")
    if not task:
      return
    way_out = ("use a fresh MODEL_DIR, or --gin.loop.train.allow_dataset_change=True to continue "
               "training on the new data deliberately" if allow_change is not None else
               "use the dataset it was trained on (prepared again from the same files and options), "
               "or train a new model in a fresh MODEL_DIR")
    try:
      identity.check(config.get("dataset"), task, f"checkpoint {self.directory / str(step)}", way_out)
    except identity.DatasetChanged as e:
      if not allow_change:
        raise
      log.warning("%s (allowed by allow_dataset_change)", e)

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._in_flight = None
    self._seal()

  def close(self) -> None:
    self.wait()
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
