"""Full-catalog next-item evaluation of a checkpoint (or an export) on valid/test splits.

Every user is evaluated (the last batch is padded and masked, never dropped). For each
split the table holds the model, and a popularity baseline ranked by the same code
(training-split item counts as scores), so every number comes with its reference point.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from recjax.data import identity
from recjax.evaluation import ranking
from recjax.evaluation import scorer as scorer_lib
from recjax.evaluation.scorer import Scorer  # noqa: F401  (re-exported: callers build Scorers)
from recjax.train import mesh as mesh_lib

NUM_RESERVED = ranking.NUM_RESERVED


# Seconds between evaluation progress lines (a catalogue-scale split ranks for half an hour).
PROGRESS_EVERY_S = 60.0


def eval_batches(mixture_or_task_name: str, split: str, converter, task_feature_lengths,
                 batch_size: int, max_rows: int | None = None,
                 progress_every_s: float | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of a split as fixed-size numpy batches with a "valid" mask;
  `max_rows`: the split's first examples only (all processes together). Process 0 prints a
  progress line (batches, rows, rate, ETA) every `progress_every_s` (PROGRESS_EVERY_S).

  Processes take interleaved shards and all yield the same number of batches (the
  shortest shard is padded), so a jitted global computation stays in lock-step.
  """
  import seqio
  import recjax.tasks  # noqa: F401
  task = seqio.get_mixture_or_task(mixture_or_task_name)
  n_proc, index = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise ValueError(f"eval batch_size {batch_size} is not divisible by {n_proc} processes")
  local = batch_size // n_proc
  # The lengths reach the preprocessors (text prompts keep the newest whole items that
  # fit, as in training); the converters, not seqio, cut what remains.
  ds = task.get_dataset(sequence_length=dict(task_feature_lengths), split=split, shuffle=False,
                        trim_output_features=False)
  total = task.num_input_examples(split)
  if max_rows is not None:
    if max_rows < 1:
      raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    ds, total = ds.take(max_rows), min(total, max_rows)
  ds = converter(ds, task_feature_lengths)
  if n_proc > 1:
    ds = ds.shard(n_proc, index)
  per_process = -(-total // n_proc)
  num_batches = -(-per_process // local)
  # A shard that runs out early still yields all-padding batches (every process must step).
  empty = {k: np.zeros((0, *(d or 0 for d in v.shape)), v.dtype.as_numpy_dtype)
           for k, v in ds.element_spec.items()}
  it = ds.batch(local).prefetch(4).as_numpy_iterator()
  every = PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
  report = jax.process_index() == 0 and num_batches > 1
  printed = False  # a closing line (rate over the whole split) only after progress lines
  for i in range(num_batches):
    batch = next(it, None) or empty
    n = len(next(iter(batch.values())))
    valid = np.arange(local) < n
    batch = {k: np.concatenate([v, np.zeros((local - n, *v.shape[1:]), v.dtype)]) if n < local else v
             for k, v in batch.items()}
    batch["valid"] = valid
    yield batch
    now = time.perf_counter()
    if i == 0:
      start = last = now  # clocks start after the first batch: the rate leaves out compilation
    elif report and (now - last >= every or (printed and i == num_batches - 1)):
      last, printed, rate = now, True, i / max(now - start, 1e-9)  # batches after the first, per second
      rows = min((i + 1) * batch_size, total)
      print(f"evaluating {mixture_or_task_name}/{split}: batch {i + 1:,}/{num_batches:,}, {rows:,} of "
            f"{total:,} rows, {rate * batch_size:,.0f} rows/s, ETA {_clock((num_batches - 1 - i) / rate)}",
            flush=True)


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def eval_task_names(name: str) -> list[str]:
  """A task evaluates as itself; a mixture as each of its tasks (a mixture's examples are
  sampled endlessly, so it has no finite split to rank)."""
  import seqio
  import recjax.tasks  # noqa: F401
  provider = seqio.get_mixture_or_task(name)
  return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [name]


def train_popularity(mixture_or_task_name: str, vocab_size: int) -> np.ndarray:
  """Item counts over the training split (the popularity baseline's scores)."""
  import recjax.tasks  # noqa: F401
  from recjax.data import pipeline
  return pipeline.train_item_counts(mixture_or_task_name, vocab_size).astype(np.float32)


def checkpoint_dir(model_dir, checkpoint: str = "latest") -> pathlib.Path:
  """Where a command restores from: MODEL_DIR ('latest': its newest checkpoint) or
  MODEL_DIR/best ('best': the one kept by the run's `loop.EarlyStopping`)."""
  if checkpoint == "latest":
    return pathlib.Path(model_dir)
  if checkpoint != "best":
    raise ValueError(f"CHECKPOINT is {checkpoint!r}; choose 'latest' or 'best'")
  best = pathlib.Path(model_dir) / "best"
  if not (best / "checkpoints").is_dir():
    raise FileNotFoundError(f"no best checkpoint in {best}: it is kept by training with a validator and "
                            "loop.train.early_stopping; evaluate the latest one with CHECKPOINT = 'latest'")
  return best


def restore_checkpoint(model, mixture_or_task_name: str, model_dir, mesh, rules, step=None,
                       task_feature_lengths=None):
  """(model, trainer, params, step) of MODEL_DIR's checkpoint (the latest, or `step`)."""
  from recjax.train import checkpoint as ckpt_lib
  from recjax.train import loop
  net_model = loop.build_model(model, mixture_or_task_name, task_feature_lengths)
  trainer = loop.Trainer(net_model, mesh, tuple(rules), optimizer_fn=_training_optimizer(),
                         frozen_inputs=loop.frozen_inputs(net_model, mixture_or_task_name))
  checkpointer = ckpt_lib.Checkpointer(model_dir)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train first")
  state, _, _ = checkpointer.restore(step, trainer.abstract_state, trainer.param_shapes,
                                     task=mixture_or_task_name)
  checkpointer.close()
  return net_model, trainer, state.params, step


def _training_optimizer() -> Callable:
  """The optimizer the experiment trains with (its gin `loop.train.optimizer`, e.g. the
  sparse one): the checkpoint's optimizer state restores only into the same structure."""
  from recjax.train import loop
  try:
    ref = gin.query_parameter("loop.train.optimizer")
  except (ValueError, KeyError):  # no training binding in this config: the default optimizer
    return loop.make_optimizer
  return getattr(ref, "scoped_configurable_fn", ref)


def checkpoint_scorer(model, mixture_or_task_name: str, model_dir, mesh, rules, step=None) -> tuple[Scorer, int]:
  net_model, trainer, params, step = restore_checkpoint(model, mixture_or_task_name, model_dir, mesh, rules, step)
  return params_scorer(net_model, trainer, params), step


def _scorer_fns(net_model, trainer) -> tuple[Callable, Callable, Callable | None]:
  def build():
    @jax.jit
    def queries_fn(params, batch):
      if params["frozen"]:
        batch = dict(batch, frozen=params["frozen"])
      return net_model.queries(trainer.network(params["params"]), batch)

    table_fn = jax.jit(lambda p: net_model.output_table(trainer.network(p["params"]), p["frozen"]))
    derive = getattr(net_model, "inference_frozen", None)
    derive_fn = jax.jit(lambda p: derive(trainer.network(p["params"]), p["frozen"])) if derive else None
    return queries_fn, table_fn, derive_fn

  return scorer_lib.jitted_for(trainer, (id(net_model), "scorer"), build)


def params_scorer(net_model, trainer, params) -> Scorer:
  """A Scorer of in-memory parameters (a restored checkpoint, or a run in progress)."""
  # Frozen inputs travel with the parameters (an export saves them as well).
  full = {"params": params, "frozen": trainer.frozen}
  queries_fn, table_fn, derive_fn = _scorer_fns(net_model, trainer)
  if derive_fn is not None:  # tables of these parameters that every query reads (FLARE's item texts)
    full["frozen"] = {**full["frozen"], **derive_fn(full)}
  table, bias = table_fn(full)
  return Scorer(queries_fn, full, table, bias, net_model.vocab_size, batch_sharding=trainer.batch_sharding)


_MODEL_FEATURES = ("inputs", "segment_ids", "positions", "mask_position", "critiques")


def rank_split(scorer: Scorer, batches, *, exclude_history: bool, ks, popularity=None) -> dict[str, dict]:
  """Ranks every batch's target; returns {"model": metrics, "popularity": metrics}."""
  model_acc = ranking.RankingMetrics(ks)
  pop_acc = ranking.RankingMetrics(ks) if popularity is not None else None
  for batch in batches:
    # Global arrays (see Scorer.put): the metric sums below are then sums over every
    # process's users, the same on each process.
    exclude = scorer.put(batch["inputs"]) if exclude_history else None
    features = {k: scorer.put(batch[k]) for k in _MODEL_FEATURES if k in batch}
    query = scorer.queries_fn(scorer.params, features)
    targets = scorer.put(np.where(batch["valid"], batch["target"], 0))
    valid = scorer.put(batch["valid"])
    ranks = ranking.target_ranks(query, scorer.item_table, targets, scorer.bias, exclude=exclude,
                                 vocab_size=scorer.vocab_size)
    model_acc.update(ranks, valid)
    if pop_acc is not None:
      ones = scorer.put(np.ones((len(batch["target"]), 1), np.float32))
      pop_ranks = ranking.target_ranks(ones, popularity, targets, exclude=exclude,
                                       vocab_size=scorer.vocab_size)
      pop_acc.update(pop_ranks, valid)
  out = {"model": model_acc.result()}
  if pop_acc is not None:
    out["popularity"] = pop_acc.result()
  return out


def rank_with_scorer(*, scorer: Scorer, converter, mixture_or_task_name: str, task_feature_lengths, splits,
                     batch_size: int, ks, exclude_history: bool = True, popularity_baseline: bool = True,
                     max_rows: int | None = None, **_) -> tuple[dict, str]:
  """The "ranking" evaluator: full-catalogue ranking + a popularity baseline per split;
  `max_rows` ranks each split's first users only (a quick look at a large split)."""
  popularity = None
  if popularity_baseline:
    counts = train_popularity(mixture_or_task_name, scorer.item_table.shape[0])
    popularity = jnp.asarray(counts)[:, None]
  results: dict[str, Any] = {}
  names = eval_task_names(mixture_or_task_name)
  for split in splits:
    for task in names:
      batches = eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows)
      for name, metrics in rank_split(scorer, batches, exclude_history=exclude_history, ks=ks,
                                      popularity=popularity).items():
        results[f"{split}/{name}" if len(names) == 1 else f"{split}/{task}/{name}"] = metrics
  return results, ranking.ranking_protocol(scorer.vocab_size, exclude_history)


def evaluate(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: dict = gin.REQUIRED, model_dir: str = gin.REQUIRED,
             batch_size: int = 256, splits: Sequence[str] = ("validation", "test"),
             ks: Sequence[int] = (1, 5, 10, 20), exclude_history: bool = True,
             mesh_fn: Callable = mesh_lib.create_mesh, logical_axis_rules=mesh_lib.DEFAULT_RULES,
             checkpoint_step: int | None = None, exported_dir: str | None = None,
             popularity_baseline: bool = True, evaluator: str | None = None,
             verbose: bool = True, checkpoint: str = "latest") -> dict[str, Any]:
  """Evaluates the latest (or best: `checkpoint`) checkpoint in `model_dir`, or
  `exported_dir`; writes JSON there (eval_step_N.json, eval_best_step_N.json).

  `evaluator` names a registered evaluator (`recjax.evaluation.evaluators`); None takes
  the model's own (`EVALUATOR` of the model contract, or the export's)."""
  from recjax.evaluation import evaluators
  from recjax.models import base
  mesh = mesh_fn()
  if exported_dir:
    from recjax.evaluation import exported
    kind = exported.kind(exported_dir)  # verifies every file's checksum first
    identity.check_export(exported_dir, mixture_or_task_name)
    name = evaluator or kind
    source = evaluators.Source.from_export(exported_dir)
    out_dir = pathlib.Path(exported_dir)
  else:
    # Built outside the mesh context: nnx.eval_shape inside one would read the logical axis
    # names as mesh axes. The arrays carry their shardings; jit follows them.
    source = evaluators.Source.from_checkpoint(model, mixture_or_task_name, checkpoint_dir(model_dir, checkpoint),
                                               mesh, logical_axis_rules, checkpoint_step, task_feature_lengths)
    name = evaluator or base.evaluator_name(source.model)
    out_dir = pathlib.Path(model_dir)
  results, protocol = evaluators.get(name)(
      source=source, mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      splits=tuple(splits), batch_size=batch_size, ks=tuple(ks), exclude_history=exclude_history,
      popularity_baseline=popularity_baseline)
  step = source.step
  source_kind = "export" if exported_dir else ("best checkpoint" if checkpoint == "best" else "checkpoint")
  payload = {"step": step, "task": mixture_or_task_name, "evaluator": name, "protocol": protocol,
             "results": results, "source": source_kind}
  if jax.process_index() == 0:
    fname = ("eval_export.json" if exported_dir else
             f"eval_best_step_{step}.json" if checkpoint == "best" else f"eval_step_{step}.json")
    (out_dir / fname).write_text(json.dumps(payload, indent=2) + "\n")
    if verbose:
      present = {c for metrics in results.values() for c in metrics}
      columns = [c for c in [*(f"recall@{k}" for k in ks), *(f"ndcg@{k}" for k in ks), "mrr",
                             "invalid_id_fraction"] if c in present]
      columns += sorted(present - {*columns, "count"}) + ["count"]  # e.g. sentiment's m@k
      print(ranking.format_metrics_table(results, columns, protocol))
  return payload
