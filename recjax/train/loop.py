"""The training loop, top to bottom (big_vision style).

  1. mesh + logical rules           (gin)
  2. data: task -> converter -> DataIterator (per-process shard, resumable)
  3. model: eval_shape, shardings from logical names, jit(init, out_shardings)
  4. optimizer + jitted step        (in/out shardings, donated state)
  5. restore from MODEL_DIR if a checkpoint exists
  6. loop: step; every `log_every` steps fetch metrics once (the only host sync),
     check for NaN/Inf, write TensorBoard + progress bar; checkpoint every
     `checkpoint_every` steps and on SIGTERM
  7. optionally, every `eval_every` steps: a validation evaluator (gin passes it in; it
     lives in recjax.evaluation), the best checkpoint kept in MODEL_DIR/best by a named
     metric, and early stopping after `patience` evaluations without a gain
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any, Callable

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax.data import identity
from recjax.train import checkpoint as ckpt_lib
from recjax.train import mesh as mesh_lib

log = logging.getLogger("recjax.train")


class TrainingDiverged(ValueError):
  """NaN/Inf loss; a ValueError so the command line reports it as one sentence."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(total_steps: int, *, learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.99,
                   eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0,
                   schedule: str = "constant", end_learning_rate_fraction: float = 0.0,
                   clip_norm: float | None = 1.0):
  """AdamW (FLARE: beta1 0.9, beta2 0.99) with warmup + decay and global-norm clipping.

  Weight decay applies to matrices only (not biases, LayerNorm scales). Returns
  (optax transformation, schedule function) so the loop can log the learning rate.
  """
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  end = learning_rate * end_learning_rate_fraction
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "constant":
    decay = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_learning_rate_fraction)
  elif schedule == "linear":
    decay = optax.linear_schedule(learning_rate, end, decay_steps)
  else:
    raise ValueError(f"unknown schedule {schedule!r}; choose constant, cosine or linear")
  lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                            [warmup_steps]) if warmup_steps else decay
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), lr


@dataclasses.dataclass
class Trainer:
  """Model + mesh + optimizer + jitted functions; shared by train, evaluate and export.

  Build it outside `jax.set_mesh`: nnx.eval_shape under an active mesh reads the logical
  axis names as mesh axes."""

  model: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  seed: int = 0
  total_steps: int = 1
  optimizer_fn: Callable = make_optimizer
  # Frozen model inputs (e.g. FLARE's cached text-encoder states), named by the model and
  # fetched by `recjax.train.frozen`: {name: (numpy array, logical axes)}; the numpy arrays
  # are swapped for the device ones once placed (`frozen`). They reach `loss_fn` and
  # `queries` as batch["frozen"], are never differentiated, and are not checkpointed
  # (they are a function of the data and the frozen encoder, cached on disk).
  frozen_inputs: dict = dataclasses.field(default_factory=dict)
  # Functions jitted around this trainer by its users (evaluation's scorer and predictor),
  # built once per trainer and freed with it.
  jit_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __post_init__(self):
    abstract = nnx.eval_shape(lambda: self.model.network(nnx.Rngs(self.seed)))
    self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    self.tx, self.schedule = self.optimizer_fn(self.total_steps)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.param_shardings = mesh_lib.tree_shardings(abstract_params, self.mesh, self.rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=mesh_lib.tree_shardings(abstract_opt, self.mesh, self.rules))
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh, self.rules)
    self.replicated = replicated
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt),
        self.state_shardings)
    self.param_shapes = ckpt_lib.param_shapes(abstract_params)
    self.frozen_shardings = {k: mesh_lib.named_sharding(self.mesh, self.rules, axes)
                             for k, (_, axes) in self.frozen_inputs.items()}
    self._frozen = None

  @property
  def frozen(self) -> dict[str, jax.Array]:
    """The frozen inputs on device (placed once, with their shardings). The host copies
    are then released: at catalogue scale a text-state table is several GB of host memory,
    dead weight once it sits on an accelerator (on CPU, JAX may alias the numpy buffer)."""
    if self._frozen is None:
      self._frozen = {k: jax.make_array_from_callback(v.shape, self.frozen_shardings[k], lambda i, v=v: v[i])
                      for k, (v, _) in self.frozen_inputs.items()}
      self.frozen_inputs = {k: (self._frozen[k], axes) for k, (_, axes) in self.frozen_inputs.items()}
    return self._frozen

  # -- state ------------------------------------------------------------------------

  def init_state(self) -> TrainState:
    """Parameters born sharded: the initializer is jitted with out_shardings. A model with
    `initial_params(fresh)` (a pretrained start, recjax/models/base.py) then replaces them,
    outside the jit so that a checkpoint's arrays never become compiled constants."""
    def init():
      params = nnx.state(self.model.network(nnx.Rngs(self.seed)), nnx.Param)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))
    state = jax.jit(init, out_shardings=self.state_shardings)()
    initial_params = getattr(self.model, "initial_params", None)
    if initial_params is None:
      return state
    params = jax.device_put(initial_params(state.params), self.param_shardings)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return TrainState(step=state.step, params=params, opt_state=opt_state)

  def network(self, params):
    return nnx.merge(self.graphdef, params)

  # -- steps ------------------------------------------------------------------------

  def make_train_step(self):
    base_key = jax.random.key(self.seed)
    # The sparse optimizer (recjax/train/sparse.py) with a model that lists the item rows
    # its loss reads (`item_ids`, recjax/models/base.py): only those rows are differentiated.
    gathered_update = getattr(self.tx, "gathered_update", None)
    item_ids = getattr(self.model, "item_ids", None) if gathered_update is not None else None

    def step(state: TrainState, batch, frozen):
      rng = jax.random.fold_in(base_key, state.step)  # a pure function of the step: resumable
      if frozen:
        batch = dict(batch, frozen=frozen)
      ids = item_ids(batch, rng) if item_ids is not None else None
      if ids is not None:
        loss_of = lambda params, rows: self.model.loss_fn(self.network(params), dict(batch, item_rows=rows), rng)
        (loss, metrics), grad_norm, params, opt_state = gathered_update(loss_of, ids, state.params, state.opt_state)
      else:
        def loss_fn(params):
          return self.model.loss_fn(self.network(params), batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
      metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                     learning_rate=jnp.asarray(self.schedule(state.step), jnp.float32))
      return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding, self.frozen_shardings),
                     out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    return lambda state, batch: jitted(state, batch, self.frozen)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


def frozen_inputs(model, task_name: str) -> dict:
  """The frozen inputs `model` names, fetched for a task ({} for models without any)."""
  from recjax.train import frozen
  return frozen.fetch(model, task_name)


def item_vocab_size(task_name: str, feature: str = "items") -> int:
  import seqio
  import recjax.tasks  # noqa: F401  (registers the tasks)
  provider = seqio.get_mixture_or_task(task_name)
  if feature not in provider.output_features:
    raise ValueError(f"task {task_name!r} has no feature {feature!r} (it has {sorted(provider.output_features)}); "
                     "is MODEL the right model for MIXTURE_OR_TASK_NAME?")
  return provider.output_features[feature].vocabulary.vocab_size


def task_fields(model_factory: Callable, task_name: str) -> dict[str, Any]:
  """The constructor arguments a model class takes from its task's vocabularies
  (`TASK_FIELDS` = {argument: (feature, vocabulary attribute)}, recjax/models/base.py)."""
  import seqio
  import recjax.tasks  # noqa: F401  (registers the tasks)
  provider = seqio.get_mixture_or_task(task_name)
  out = {}
  for arg, (feature, attribute) in getattr(model_factory, "TASK_FIELDS", {}).items():
    if feature not in provider.output_features:
      raise ValueError(f"task {task_name!r} has no feature {feature!r} (it has {sorted(provider.output_features)}), "
                       f"which MODEL reads for {arg!r}; is MODEL the right model for MIXTURE_OR_TASK_NAME?")
    value = getattr(provider.output_features[feature].vocabulary, attribute)
    out[arg] = str(value) if isinstance(value, (bytes, pathlib.Path)) else value
  return out


def build_model(model_factory: Callable, task_name: str, task_feature_lengths: dict | None = None):
  """MODEL(vocab_size=...) for a task (the model contract, recjax/models/base.py); a model
  that states the feature lengths it reads (`task_feature_lengths()`) must agree with
  TASK_FEATURE_LENGTHS."""
  from recjax.models import base
  model = model_factory(vocab_size=item_vocab_size(task_name, base.vocab_feature(model_factory)),
                        **task_fields(model_factory, task_name))
  wants = getattr(model, "task_feature_lengths", None)
  if task_feature_lengths is not None and wants is not None:
    bad = {k: (task_feature_lengths.get(k), v) for k, v in wants().items() if task_feature_lengths.get(k) != v}
    if bad:
      raise ValueError(f"TASK_FEATURE_LENGTHS {dict(task_feature_lengths)} does not fit {type(model).__name__}: "
                       + ", ".join(f"{k!r} is {got} but the model reads {need}" for k, (got, need) in bad.items()))
  return model


@dataclasses.dataclass
class EarlyStopping:
  """Best-checkpoint tracking on a validation metric, with patience (gin: `loop.EarlyStopping`).

  `metric` names a key of the validator's result (e.g. 'ndcg@10'); `mode` 'max' or 'min';
  `patience` evaluations without an improvement larger than `min_delta` stop the run (0:
  never stop, only keep the best checkpoint). Its state travels in every checkpoint's
  config, so a resumed run continues the same count and keeps the same best step.
  """

  metric: str = "ndcg@10"
  mode: str = "max"
  patience: int = 0
  min_delta: float = 0.0
  best_value: float | None = None
  best_step: int | None = None
  bad_evals: int = 0
  stopped: bool = False

  def __post_init__(self):
    if self.mode not in ("max", "min"):
      raise ValueError(f"loop.EarlyStopping.mode is {self.mode!r}; choose 'max' or 'min'")
    if self.patience < 0:
      raise ValueError(f"loop.EarlyStopping.patience is {self.patience}; it must be >= 0 (0: never stop)")

  def update(self, step: int, metrics: dict[str, float]) -> bool:
    """Records one evaluation; True when it is the best so far (its checkpoint is kept)."""
    if self.metric not in metrics:
      raise ValueError(f"loop.EarlyStopping.metric {self.metric!r} is not among the validator's "
                       f"metrics {sorted(metrics)}")
    value = float(metrics[self.metric])
    if not math.isfinite(value):  # a NaN never counts as an improvement
      improved = False
    elif self.best_value is None:
      improved = True
    else:
      gain = value - self.best_value if self.mode == "max" else self.best_value - value
      improved = gain > self.min_delta
    if improved:
      self.best_value, self.best_step, self.bad_evals = value, step, 0
    else:
      self.bad_evals += 1
      self.stopped = self.patience > 0 and self.bad_evals >= self.patience
    return improved

  def state(self) -> dict:
    return {"metric": self.metric, "mode": self.mode, "best_value": self.best_value,
            "best_step": self.best_step, "bad_evals": self.bad_evals, "stopped": self.stopped}

  def load(self, saved: dict | None) -> None:
    if not saved:
      return
    if (saved["metric"], saved["mode"]) != (self.metric, self.mode):
      raise ValueError(f"the checkpoint tracked {saved['mode']} {saved['metric']!r} but this run tracks "
                       f"{self.mode} {self.metric!r}; resume with the same loop.EarlyStopping or use a fresh "
                       "MODEL_DIR")
    self.best_value, self.best_step = saved["best_value"], saved["best_step"]
    self.bad_evals, self.stopped = saved["bad_evals"], saved["stopped"]


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (no work in the handler)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def _all_processes(obj) -> list:
  """Every process's JSON-able `obj`, in process order (a collective when multi-process).

  Orbax writes JSON items from the primary process only, but each process reads its own
  data shard, so the checkpoint stores every process's iterator position.
  """
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size]))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(gathered[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def _data_checkpoint(data) -> dict:
  return {"per_process": _all_processes(data.state())}


def _restore_data(data, saved: dict) -> None:
  states = saved["per_process"]
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint holds data positions of {len(states)} processes but this run has "
                     f"{jax.process_count()}; resume with the same number of processes")
  data.restore(states[jax.process_index()])


def _summarize(fetched: list[dict], elapsed: float, steps: int) -> dict[str, float]:
  total = {k: float(np.sum([m[k] for m in fetched])) for k in fetched[0]}
  last = fetched[-1]
  targets = max(total["targets"], 1.0)
  # Auxiliary losses report "<name>_sum" and "<name>_count" (e.g. FLARE's contrastive).
  aux = {k[:-4]: total[k] / max(total[k[:-4] + "_count"], 1.0) for k in total
         if k.endswith("_sum") and k[:-4] + "_count" in total}
  return {
      **aux,
      "loss": total["loss_sum"] / targets,
      "accuracy": total["accuracy_sum"] / targets,
      "learning_rate": float(last["learning_rate"]),
      "grad_norm": float(last["grad_norm"]),
      "steps_per_sec": steps / max(elapsed, 1e-9),
      "items_per_sec": total["items"] / max(elapsed, 1e-9),
      "dropped_targets": total["dropped_targets"],
  }


def _checked(window, t0: float, step, checkpointer) -> dict[str, float]:
  """Summarizes the window; a NaN/Inf loss stops the run, keeping the last good checkpoint.

  The clock is read after the window's metrics arrive: steps dispatch asynchronously, so
  the host reaches a log step well before the device finishes the steps before it."""
  fetched = jax.device_get(window)
  summary = _summarize(fetched, time.time() - t0, len(window))
  if not math.isfinite(summary["loss"]):
    checkpointer.wait()
    latest = checkpointer.latest_step()
    raise TrainingDiverged(f"loss became {summary['loss']} between steps {step - len(window)} and {step}; "
                           f"training stopped; the last good checkpoint is step {latest} in "
                           f"{checkpointer.directory}")
  return summary


def train(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          model_dir: str = gin.REQUIRED, batch_size: int = 128, seed: int = 0,
          mesh_fn: Callable = mesh_lib.create_mesh, logical_axis_rules=mesh_lib.DEFAULT_RULES,
          optimizer: Callable = make_optimizer, log_every: int = 50, checkpoint_every: int = 500,
          keep_checkpoints: int = 3, pack: bool = True, progress: bool = True,
          stop_after_steps: int | None = None, reuse_rows: bool | None = None,
          allow_dataset_change: bool = False, validator: Callable | None = None, eval_every: int = 0,
          early_stopping: EarlyStopping | None = None) -> dict[str, Any]:
  """Trains `model` on a SeqIO task; resumes from MODEL_DIR. Returns the last metrics.

  `stop_after_steps` ends this invocation early (with a checkpoint) without changing
  the schedule, as a preemption would; tests use it. `reuse_rows`: see
  `pipeline.DataIterator` (None = automatic; False resumes a run whose data position was
  saved while its rows were converted every epoch). `allow_dataset_change` resumes a
  checkpoint whose dataset was re-prepared (a deliberate fine-tune; refused otherwise).

  `validator(model, trainer, params, step) -> {metric: value}` runs every `eval_every`
  steps and at the end (e.g. `@validation.Validation()` of recjax.evaluation: gin hands
  it in, so this module imports no evaluation code). Each evaluation step is also a
  checkpoint step; with `early_stopping` the best one is kept in MODEL_DIR/best.
  """
  from recjax.data import pipeline

  model_dir = pathlib.Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  net_model = build_model(model, mixture_or_task_name, task_feature_lengths)
  mesh = mesh_fn()
  trainer = Trainer(net_model, mesh, tuple(logical_axis_rules), seed=seed, total_steps=train_steps,
                    optimizer_fn=optimizer, frozen_inputs=frozen_inputs(net_model, mixture_or_task_name))
  converter = net_model.feature_converter(pack=pack, seed=seed)
  data = pipeline.DataIterator(mixture_or_task_name, split="train", feature_converter=converter,
                               task_feature_lengths=task_feature_lengths, batch_size=batch_size,
                               shuffle=True, seed=seed, reuse_rows=reuse_rows)
  checkpointer = ckpt_lib.Checkpointer(model_dir, keep=keep_checkpoints)
  if (validator is None) != (eval_every <= 0):
    raise ValueError("loop.train: validator and eval_every > 0 go together (got validator "
                     f"{'set' if validator else 'None'}, eval_every {eval_every})")
  if early_stopping is not None and validator is None:
    raise ValueError("loop.train.early_stopping needs a validator (loop.train.validator + eval_every)")
  best = ckpt_lib.Checkpointer(model_dir / "best", keep=1) if early_stopping is not None else None
  # Operative config: every binding actually used so far (model, optimizer, mesh, train).
  config = {"gin": gin.operative_config_str(), "param_shapes": trainer.param_shapes,
            "task": mixture_or_task_name, "model": type(net_model).__name__,
            "dataset": identity.of_task(mixture_or_task_name)}

  with jax.set_mesh(mesh):
    start = checkpointer.latest_step()
    if start is None:
      state = trainer.init_state()
      start = 0
    else:
      state, data_state, saved_config = checkpointer.restore(start, trainer.abstract_state, trainer.param_shapes,
                                                             task=mixture_or_task_name,
                                                             allow_dataset_change=allow_dataset_change)
      _restore_data(data, data_state)
      if early_stopping is not None:
        early_stopping.load(saved_config.get("early_stopping"))
      log.info("resumed from step %d", start)
    step_fn = trainer.make_train_step()
    writer = _metric_writer(model_dir)
    (model_dir / "config.gin").write_text(config["gin"])

    bar = None  # created after the compilation, so its rate and ETA are the steps' own
    window, last_metrics = [], {}
    t0, step = time.time(), start
    run_start, compile_s = t0, None
    end = train_steps if stop_after_steps is None else min(train_steps, start + stop_after_steps)
    if early_stopping is not None and early_stopping.stopped:
      end = step  # stopped early before this resumption: nothing left to train
      if progress and jax.process_index() == 0:
        print(f"early stopping ended this run at step {step} (best {early_stopping.metric} "
              f"{early_stopping.best_value:.4f} at step {early_stopping.best_step})", flush=True)
    with _Preemption() as preemption:
      while step < end:
        state, metrics = step_fn(state, trainer.to_global(next(data)))
        window.append(metrics)
        step += 1
        at_log = _is_log_step(step, start, log_every, end)
        if at_log:
          summary = _checked(window, t0, step, checkpointer)
          if compile_s is None:
            # The first window is the compilation plus one step: reported apart, so the
            # rate and ETA that follow are the steps' own.
            compile_s = time.time() - t0
            del summary["steps_per_sec"], summary["items_per_sec"]
            summary["compile_seconds"] = compile_s
            if progress and jax.process_index() == 0:
              print(f"step {step}: compiled and ran the first step in {compile_s:.1f}s (loss "
                    f"{summary['loss']:.4f})", flush=True)
            bar = _progress(progress, train_steps, step)
          writer.write_scalars(step, summary)
          _append_log(model_dir, step, time.time() - run_start, summary)
          bar.set_postfix(loss=f"{summary['loss']:.4f}",
                          items_s=f"{summary.get('items_per_sec', 0.0):.0f}", refresh=False)
          bar.update(step - bar.n)
          last_metrics, window, t0 = summary, [], time.time()
        # One process: the flag is a Python bool, free to read every step. Several: agree at
        # log steps (a collective), so every process saves the same step.
        if (jax.process_count() == 1 and preemption.requested) or (at_log and preemption.any_process()):
          if window:
            _checked(window, t0, step, checkpointer)
          checkpointer.save(step, state, _data_checkpoint(data), config, force=True)
          checkpointer.close()
          log.warning("SIGTERM: saved checkpoint at step %d; exiting", step)
          print(f"preempted: checkpoint saved at step {step}", flush=True)
          if bar is not None:
            bar.close()
          return dict(last_metrics, step=step, preempted=True)
        at_eval = validator is not None and (step % eval_every == 0 or step == train_steps)
        if step % checkpoint_every == 0 or step == end or at_eval:
          if window:  # never checkpoint a state whose loss was not checked
            _checked(window, t0, step, checkpointer)
          if at_eval:
            eval_start = time.time()
            message = _validate(validator, net_model, trainer, state, step, early_stopping, best, writer,
                                model_dir, (data, config))
            t0 += time.time() - eval_start  # the training rate leaves the evaluation out
            if progress and jax.process_index() == 0:
              (bar.write if bar is not None else print)(message)
            if early_stopping is not None:
              config["early_stopping"] = early_stopping.state()
          checkpointer.save(step, state, _data_checkpoint(data), config, force=True)
          if early_stopping is not None and early_stopping.stopped:
            message = (f"early stopping at step {step}: {early_stopping.metric} did not improve for "
                       f"{early_stopping.bad_evals} evaluations (best {early_stopping.best_value:.4f} at step "
                       f"{early_stopping.best_step}, kept in {best.directory})")
            if progress and jax.process_index() == 0:
              (bar.write if bar is not None else print)(message)
            break
    if bar is not None:
      bar.close()
    checkpointer.close()
    if best is not None:
      best.close()
    writer.flush()
  if progress and jax.process_index() == 0:
    print(_final_summary(start, step, time.time() - run_start, compile_s, last_metrics, checkpointer.directory,
                         model_dir), flush=True)
  out = dict(last_metrics, step=step)
  if early_stopping is not None:
    out.update(best_step=early_stopping.best_step, best_value=early_stopping.best_value,
               stopped_early=early_stopping.stopped)
  return out


def _validate(validator, net_model, trainer, state, step, early_stopping, best, writer, model_dir,
              data_and_config) -> str:
  """One validation evaluation: logged next to the training metrics; with early stopping,
  a new best is saved to MODEL_DIR/best before the regular checkpoint of this step (a kill
  in between replays the step from the previous checkpoint and saves the same best)."""
  t = time.time()
  metrics = {k: float(v) for k, v in validator(net_model, trainer, state.params, step).items()}
  seconds = time.time() - t
  writer.write_scalars(step, {f"validation/{k}": v for k, v in metrics.items()})
  _append_log(model_dir, step, None, {"validation": metrics, "validation_seconds": round(seconds, 3)})
  note = ""
  if early_stopping is not None and early_stopping.update(step, metrics):
    data, config = data_and_config
    if step in best.all_steps():
      best.manager.delete(step)
    best.save(step, state, _data_checkpoint(data), dict(config, early_stopping=early_stopping.state()),
              force=True)
    note = " (best so far)"
  shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
  return f"step {step}: validation {shown} in {seconds:.1f}s{note}"


def _is_log_step(step: int, start: int, log_every: int, end: int) -> bool:
  """Every `log_every` steps and the last; and, early in a run, after 1, 2, 4, 8, ... steps
  (the first is the compilation), so rate and ETA show from the first steps. A function of
  the step alone: every process logs (and agrees on preemption) at the same steps."""
  k = step - start
  return step % log_every == 0 or step == end or (k < log_every and k & (k - 1) == 0)


def _append_log(model_dir: pathlib.Path, step: int, seconds: float | None, summary: dict) -> None:
  """One JSON line per log step (and per validation) in MODEL_DIR/train_log.jsonl (primary process)."""
  if jax.process_index() == 0:
    head = {"step": step} if seconds is None else {"step": step, "seconds": round(seconds, 3)}
    with open(model_dir / "train_log.jsonl", "a") as f:
      f.write(json.dumps({**head, **summary}) + "\n")


def _final_summary(start, step, seconds, compile_s, metrics, checkpoints, model_dir) -> str:
  shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "accuracy", "steps_per_sec") if k in metrics)
  return (f"trained steps {start} -> {step} in {seconds:.0f}s"
          + (f" ({compile_s:.1f}s compiling)" if compile_s is not None else "")
          + (f"; last: {shown}" if shown else "") + f"\ncheckpoints: {checkpoints}\nTensorBoard: "
          f"{model_dir / 'tensorboard'}\nlog: {model_dir / 'train_log.jsonl'}")

class _MetricWriter:
  """TensorBoard event files in MODEL_DIR/tensorboard (primary process only).

  tf.summary writes the event files; TensorFlow is already loaded by the input pipeline.
  """

  def __init__(self, logdir: pathlib.Path):
    self._writer = None
    if jax.process_index() == 0:
      import tensorflow as tf
      self._tf = tf
      self._writer = tf.summary.create_file_writer(str(logdir))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default(step=step):
      for k, v in scalars.items():
        self._tf.summary.scalar(k, v)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def _metric_writer(model_dir: pathlib.Path) -> _MetricWriter:
  return _MetricWriter(model_dir / "tensorboard")


def _progress(enabled: bool, total: int, initial: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled or
              jax.process_index() > 0, dynamic_ncols=True)


def write_json(path, payload) -> None:
  pathlib.Path(path).write_text(json.dumps(payload, indent=2) + "\n")
