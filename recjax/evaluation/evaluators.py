"""Evaluators registered by name (big_vision's `evaluators/` is the model).

An evaluator is a function `(source, mixture_or_task_name, task_feature_lengths, splits,
batch_size, ks, **options) -> (results {"split/name": metrics}, protocol line)`. `source`
is what is evaluated: a restored checkpoint (model + parameters) or an export directory
(no model code). `recjax evaluate` picks the model's own evaluator (`EVALUATOR` in the
model contract) unless gin names one (`eval_lib.evaluate.evaluator = 'NAME'`); options
of an evaluator are gin bindings of its function (e.g.
`evaluators.generative_retrieval.num_beams = 20`).

  ranking               full-catalogue ranking (queries . item table), popularity baseline
  generative_retrieval  decode K items (constrained beams), rank the target among them
  lumen                 LM recommenders that write (LUMEN, FLARE + LLM's LM): item metrics
                        from the item softmax, narrative metrics of the generated texts
  reat                  text-to-text (ReAT): beams parsed to items (retrieval, ranking),
                        rating AUC-ROC, popularity on the same rows
  preference_axes       the preference-discerning benchmark's test axes (recommendation,
                        fine / coarse steering, consolidation: Recall / NDCG; sentiment
                        following: m@k) of a model over semantic IDs (TIGER, Mender_Emb)

Critiquing (`recjax critique`) and the preference-discerning axes reuse the same metrics
core (`recjax.evaluation.ranking.RankingMetrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gin
import jax
import numpy as np

from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import generative

EVALUATORS: dict[str, Callable] = {}


def register(name: str):
  def add(fn):
    if name in EVALUATORS:
      raise ValueError(f"evaluator {name!r} is registered twice")
    EVALUATORS[name] = fn
    return fn
  return add


def get(name: str) -> Callable:
  """The evaluator function, with its gin bindings applied when a gin file names it."""
  if name not in EVALUATORS:
    raise ValueError(f"unknown evaluator {name!r}; registered: {sorted(EVALUATORS)}")
  fn = EVALUATORS[name]
  try:
    return gin.get_configurable(fn)
  except ValueError:  # no gin file mentions it: its defaults
    return fn


@dataclasses.dataclass
class Source:
  """What is evaluated: a checkpoint's model + parameters, or an export directory."""

  step: int
  model: Any = None
  trainer: Any = None
  params: Any = None
  export_dir: str | None = None

  @classmethod
  def from_checkpoint(cls, model_factory, task, model_dir, mesh, rules, step=None, task_feature_lengths=None):
    model, trainer, params, step = eval_lib.restore_checkpoint(model_factory, task, model_dir, mesh, rules, step,
                                                               task_feature_lengths)
    return cls(step=int(step), model=model, trainer=trainer, params=params)

  @classmethod
  def from_export(cls, export_dir):
    from recjax.evaluation import exported
    return cls(step=exported.exported_step(export_dir), export_dir=str(export_dir))

  def put(self, local: np.ndarray) -> jax.Array:
    """This process's rows as the global batch every process computes on."""
    if self.trainer is None:
      return jax.numpy.asarray(local)
    return jax.make_array_from_process_local_data(self.trainer.batch_sharding, np.asarray(local))


@register("ranking")
def ranking(*, source: Source, max_rows: int | None = None, **kwargs) -> tuple[dict, str]:
  """Full-catalogue ranking of each split's targets; `max_rows` (gin) ranks the first
  users of each split only, e.g. a quick look at a catalogue-scale test split."""
  if source.export_dir:
    from recjax.evaluation import exported
    scorer, converter = exported.load_scorer(source.export_dir), exported.load_eval_converter(source.export_dir)
  else:
    scorer = eval_lib.params_scorer(source.model, source.trainer, source.params)
    converter = source.model.eval_feature_converter()
  return eval_lib.rank_with_scorer(scorer=scorer, converter=converter, max_rows=max_rows, **kwargs)


@register("generative_retrieval")
def generative_retrieval(*, source: Source, mixture_or_task_name: str, task_feature_lengths, splits,
                         batch_size: int, ks, num_beams: int = 20, constrained: bool = True, free: bool = False,
                         **_) -> tuple[dict, str]:
  """Decodes `num_beams` items per user and ranks the target among them (TIGER's protocol:
  history not excluded); ks above num_beams are dropped."""
  ks = tuple(k for k in ks if k <= num_beams)
  if not ks:
    raise ValueError(f"every cutoff in ks exceeds num_beams = {num_beams}")
  if source.export_dir:
    from recjax.evaluation import exported
    predict, meta = exported.load_generator(source.export_dir)
    if not constrained or meta["num_beams"] != num_beams:
      raise ValueError(f"{source.export_dir} decodes {meta['num_beams']} trie-constrained beams, but "
                       f"{num_beams} {'constrained' if constrained else 'unconstrained'} ones were asked for; "
                       "set NUM_BEAMS alike for export and evaluation, or re-export")
    converter = exported.load_eval_converter(source.export_dir)
  else:
    import recjax.tasks as tasks
    tables = generative.trie_tables(tasks.semantic_ids_of(mixture_or_task_name))
    predict = generative.checkpoint_predictor(source.model, source.trainer, source.params, tables,
                                              num_beams=num_beams, constrained=constrained, free=free)
    converter = source.model.eval_feature_converter()
  results = {}
  for split in splits:
    for task in eval_lib.eval_task_names(mixture_or_task_name):
      batches = eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size)
      results[f"{split}/model" if task == mixture_or_task_name else f"{split}/{task}/model"] = (
          generative.rank_generated(predict, batches, ks=ks, put=source.put))
  mode = "trie-constrained" if constrained else ("free" if free else "per-level codebooks")
  protocol = (f"generative retrieval: {num_beams} beams, {mode} decoding, target ranked among the decoded "
              "items, history not excluded")
  return results, protocol


@register("lumen")
def lumen(*, source: Source, mixture_or_task_name: str, task_feature_lengths, splits, batch_size: int, ks,
          max_rows: int | None = None, sentence_encoder: str | None = "minilm", **_) -> tuple[dict, str]:
  """Item metrics (full catalogue, nothing excluded) and narrative metrics per task
  (`recjax.evaluation.text_generation`); `max_rows` caps the rows of each task and split,
  `sentence_encoder` (None: none) scores the narratives' similarity."""
  import seqio
  import recjax.tasks  # noqa: F401
  from recjax.evaluation import text_generation
  max_new_tokens = int(task_feature_lengths["targets"])
  if source.export_dir:
    from recjax.evaluation import exported
    generate = exported.load_text_generator(source.export_dir)
    if generate.metadata["max_new_tokens"] != max_new_tokens:
      raise ValueError(f"{source.export_dir} writes {generate.metadata['max_new_tokens']} tokens, but the "
                       f"task's 'targets' length is {max_new_tokens}: evaluate with the export's "
                       f"TASK_FEATURE_LENGTHS {generate.metadata['task_feature_lengths']}")
    converter = exported.load_eval_converter(source.export_dir)
  else:
    generate = text_generation.checkpoint_generator(source.model, source.trainer, source.params,
                                                    num_items=max(ks), max_new_tokens=max_new_tokens)
    converter = source.model.eval_feature_converter()
  encoder = None
  if sentence_encoder:
    from recjax.models.text import load_text_encoder
    encoder = load_text_encoder(sentence_encoder)
  vocabulary = seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary
  return text_generation.evaluate(generate=generate, converter=converter, vocabulary=vocabulary,
                                  mixture_or_task_name=mixture_or_task_name,
                                  task_feature_lengths=task_feature_lengths, splits=splits, batch_size=batch_size,
                                  ks=ks, put=source.put, max_rows=max_rows, encoder=encoder)


@register("reat")
def reat(*, source: Source, num_beams: int = 20, max_rows: int | None = None, **kwargs) -> tuple[dict, str]:
  """Text-to-text recommendation (ReAT): retrieval / ranking from `num_beams` beams parsed
  back to items, rating AUC-ROC, popularity on the same rows; `max_rows` evaluates the
  first rows of each split only (recjax/evaluation/reat.py)."""
  from recjax.evaluation import reat as reat_lib
  return reat_lib.evaluate(source=source, num_beams=num_beams, max_rows=max_rows, **kwargs)


@register("preference_axes")
def preference_axes(*, source: Source, mixture_or_task_name: str, task_feature_lengths, batch_size: int, ks,
                    num_beams: int = 20, **_) -> tuple[dict, str]:
  """Every test axis of the benchmark the task belongs to, decoded with `num_beams`
  trie-constrained beams (Mender's protocol: history not excluded)."""
  import recjax.tasks as tasks
  from recjax.evaluation import preferences as prefs_lib
  if source.export_dir:
    raise ValueError("preference_axes evaluates checkpoints (a generative export reads no preferences)")
  ks = tuple(k for k in ks if k <= num_beams)
  if not ks:
    raise ValueError(f"every cutoff in ks exceeds num_beams = {num_beams}")
  tables = generative.trie_tables(tasks.semantic_ids_of(mixture_or_task_name))
  predict = generative.checkpoint_predictor(source.model, source.trainer, source.params, tables,
                                            num_beams=num_beams)
  converter = source.model.eval_feature_converter()
  results = {}
  for axis, task in tasks.preference_axes(mixture_or_task_name).items():
    batches = eval_lib.eval_batches(task, "test", converter, task_feature_lengths, batch_size)
    if axis != "sentiment":
      results[f"test/{axis}"] = generative.rank_generated(predict, batches, ks=ks, put=source.put)
      continue
    # The positive rows, then the row-aligned negative ones (tasks/preferences.py).
    items, targets = generative.decode(predict, batches, top=max(ks))
    half = len(targets) // 2
    pos, neg, target = items[:half], items[half:], targets[:half]
    k = max(ks)
    results["test/sentiment"] = {f"m@{k}": prefs_lib.sentiment_following(pos, neg, target, k),
                                 f"hit_positive@{k}": float(prefs_lib.hit_at_k(pos, target, k).mean()),
                                 f"hit_negative@{k}": float(prefs_lib.hit_at_k(neg, target, k).mean()),
                                 "count": int(half)}
  protocol = (f"preference discerning: {num_beams} trie-constrained beams, target ranked among the decoded "
              "items, history not excluded; sentiment m@k = hit with the positive and missed with the "
              "negative preference")
  return results, protocol
