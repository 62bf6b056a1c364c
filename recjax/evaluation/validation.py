"""The evaluator a training run calls every `loop.train.eval_every` steps.

`Validation` ranks one split (the validation split by default) with a registered
evaluator (`recjax.evaluation.evaluators`: the model's own unless gin names another) on
the parameters in memory, and returns flat metrics ({"recall@10": ..., "ndcg@10": ...})
for the loop's log and its `loop.EarlyStopping`. Gin hands it to the loop:

  loop.train.validator = @validation.Validation()
  loop.train.eval_every = 500
  loop.train.early_stopping = @loop.EarlyStopping()
  loop.EarlyStopping.metric = 'ndcg@10'

so the training loop imports no evaluation code (the layering in .importlinter).
"""

from __future__ import annotations

from typing import Sequence

import gin

from recjax.evaluation import evaluators

# Evaluators that rank a named split (the preference axes always read their test splits).
_SPLIT_EVALUATORS = ("ranking", "generative_retrieval")


class Validation:
  """Metrics of the parameters being trained on one split, for the training loop."""

  def __init__(self, *, mixture_or_task_name: str = gin.REQUIRED, task_feature_lengths: dict = gin.REQUIRED,
               evaluator: str | None = None, split: str = "validation", batch_size: int = 256,
               ks: Sequence[int] = (10, 20), exclude_history: bool = True):
    if evaluator is not None and evaluator not in _SPLIT_EVALUATORS:
      raise ValueError(f"validation.Validation.evaluator is {evaluator!r}; a validation evaluator ranks one "
                       f"split: choose one of {list(_SPLIT_EVALUATORS)}")
    self.task, self.feature_lengths = mixture_or_task_name, task_feature_lengths
    self.evaluator, self.split, self.batch_size = evaluator, split, batch_size
    self.ks, self.exclude_history = tuple(ks), exclude_history

  def __call__(self, model, trainer, params, step: int) -> dict[str, float]:
    from recjax.models import base
    name = self.evaluator or base.evaluator_name(model)
    if name not in _SPLIT_EVALUATORS:
      raise ValueError(f"{type(model).__name__} is evaluated by {name!r}, which does not rank a single split; "
                       f"set validation.Validation.evaluator to one of {list(_SPLIT_EVALUATORS)}")
    source = evaluators.Source(step=step, model=model, trainer=trainer, params=params)
    results, _ = evaluators.get(name)(
        source=source, mixture_or_task_name=self.task, task_feature_lengths=self.feature_lengths,
        splits=(self.split,), batch_size=self.batch_size, ks=self.ks, exclude_history=self.exclude_history,
        popularity_baseline=False)
    return _pooled(results)


def _pooled(results: dict[str, dict]) -> dict[str, float]:
  """One task's metrics as they are; a mixture's tasks pooled, weighted by their counts."""
  parts = list(results.values())
  if len(parts) == 1:
    return {k: float(v) for k, v in parts[0].items() if k != "count"}
  total = sum(p["count"] for p in parts)
  keys = set.intersection(*(set(p) for p in parts)) - {"count"}
  return {k: sum(p[k] * p["count"] for p in parts) / max(total, 1) for k in sorted(keys)}
