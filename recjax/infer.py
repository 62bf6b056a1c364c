"""Top-k recommendations per user (`recjax infer`), as JSON lines in MODEL_DIR.

Each line: {"example_id": user id, "target": held-out item, "items": [top-k ids],
"scores": [...], and "original_ids" when the task's dataset is known}. A scoring model
never recommends history items; a generative one (TIGER, Mender_Emb) returns its decoded
items (trie-constrained beams, best first; scores are sequence log-probabilities); a
text-to-text one (ReAT) its beams' texts and the items they name.

An LM recommender that writes (LUMEN, FLARE + LLM's LM; evaluator "lumen") writes, per
task of the mixture, {"task", "user_id", "prompt", "target", "items" (its top-k after
"ID:", when the task's targets name an item), "generated", "reference"}; with `user` set
it prints that user's conversation instead: the prompt, the recommended items with their
titles, the generated narrative and the held-out item.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import gin
import jax.numpy as jnp
import numpy as np

from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import ranking
from recjax.train import mesh as mesh_lib


def infer(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict = gin.REQUIRED, model_dir: str = gin.REQUIRED,
          split: str = "test", top_k: int = 10, batch_size: int = 256, output: str | None = None,
          user: int | None = None, critique: str | None = None, max_rows: int | None = None,
          mesh_fn: Callable = mesh_lib.create_mesh, logical_axis_rules=mesh_lib.DEFAULT_RULES,
          checkpoint: str = "latest") -> str:
  """Writes every user's top-k as JSON lines; with `user` set, prints that user's history
  and top-k with and without a critique instead (`critique`: a string of the task's
  critique table, default the held-out item's own critique). `max_rows`: the first rows
  of each task only."""
  mesh = mesh_fn()
  restore_dir = eval_lib.checkpoint_dir(model_dir, checkpoint)
  # No mesh context here: see evaluate.evaluate.
  from recjax.models import base
  if base.evaluator_name(model) == "lumen":
    return _infer_text(model, mixture_or_task_name, task_feature_lengths, restore_dir, mesh, logical_axis_rules,
                       split=split, top_k=top_k, batch_size=batch_size, output=output, user=user,
                       max_rows=max_rows)
  if base.evaluator_name(model) == "reat":
    return _infer_reat(model, mixture_or_task_name, task_feature_lengths, restore_dir, mesh, logical_axis_rules,
                       split=split, top_k=top_k, batch_size=batch_size, output=output, max_rows=max_rows)
  if base.evaluator_name(model) != "ranking":
    return _infer_generative(model, mixture_or_task_name, task_feature_lengths, restore_dir, mesh,
                             logical_axis_rules, split=split, top_k=top_k, batch_size=batch_size, output=output,
                             max_rows=max_rows)
  scorer, step = eval_lib.checkpoint_scorer(model, mixture_or_task_name, restore_dir, mesh,
                                            logical_axis_rules)
  converter = model(vocab_size=scorer.vocab_size).eval_feature_converter()
  if user is not None:
    from recjax.evaluation import critiquing
    return critiquing.explain_user(scorer, mixture_or_task_name, converter, task_feature_lengths, user,
                                   critique=critique, split=split, top_k=top_k)
  path = pathlib.Path(output or pathlib.Path(model_dir) / f"infer_{split}_step_{step}.jsonl")
  names = _original_ids(mixture_or_task_name)
  with open(path, "w") as f:
    # A mixture's tasks hold the same users: recommend from its first task.
    task = eval_lib.eval_task_names(mixture_or_task_name)[0]
    for batch in eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows):
      features = {k: jnp.asarray(batch[k]) for k in eval_lib._MODEL_FEATURES if k in batch}
      query = scorer.queries_fn(scorer.params, features)
      scores, ids = ranking.top_k(query, scorer.item_table, scorer.bias, k=top_k,
                                  exclude=features["inputs"], vocab_size=scorer.vocab_size)
      scores, ids = np.asarray(scores), np.asarray(ids)
      for row in np.flatnonzero(batch["valid"]):
        record = {"example_id": int(batch.get("example_id", np.full(len(ids), -1))[row]),
                  "target": int(batch["target"][row]), "items": ids[row].tolist(),
                  "scores": [round(float(s), 6) for s in scores[row]]}
        if names is not None:
          record["original_ids"] = [names.get(int(i)) for i in ids[row]]
        f.write(json.dumps(record) + "\n")
  print(f"wrote top-{top_k} recommendations for split {split!r} to {path}")
  return str(path)


def _infer_generative(model_factory, task_name, task_feature_lengths, model_dir, mesh, rules, *, split, top_k,
                      batch_size, output, max_rows) -> str:
  import recjax.tasks as tasks
  from recjax.evaluation import generative
  net_model, trainer, params, step = eval_lib.restore_checkpoint(model_factory, task_name, model_dir, mesh, rules,
                                                                 task_feature_lengths=task_feature_lengths)
  tables = generative.trie_tables(tasks.semantic_ids_of(task_name))
  predict = generative.checkpoint_predictor(net_model, trainer, params, tables, num_beams=max(top_k, 1))
  path = pathlib.Path(output or pathlib.Path(model_dir) / f"infer_{split}_step_{step}.jsonl")
  names = _original_ids(task_name)
  converter = net_model.eval_feature_converter()
  with open(path, "w") as f:
    task = eval_lib.eval_task_names(task_name)[0]
    for batch in eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows):
      ids, scores = predict({k: jnp.asarray(batch[k]) for k in generative.FEATURES if k in batch})
      ids, scores = np.asarray(ids), np.asarray(scores)
      for row in np.flatnonzero(batch["valid"]):
        live = ids[row] >= 0  # fewer valid IDs than beams: dead beams name no item
        record = {"user_id": int(batch["user_id"][row]), "target": int(batch["target_item"][row]),
                  "items": ids[row][live].tolist(), "scores": [round(float(s), 6) for s in scores[row][live]]}
        if names is not None:
          record["original_ids"] = [names.get(int(i)) for i in ids[row][live]]
        f.write(json.dumps(record) + "\n")
  print(f"wrote top-{top_k} generated recommendations for split {split!r} to {path}")
  return str(path)


def _infer_text(model_factory, task_name, task_feature_lengths, model_dir, mesh, rules, *, split, top_k,
                batch_size, output, user, max_rows) -> str:
  import seqio
  from recjax.evaluation import text_generation
  net_model, trainer, params, step = eval_lib.restore_checkpoint(model_factory, task_name, model_dir, mesh, rules,
                                                                 task_feature_lengths=task_feature_lengths)
  generate = text_generation.checkpoint_generator(net_model, trainer, params, num_items=top_k,
                                                  max_new_tokens=int(task_feature_lengths["targets"]))
  vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
  converter = net_model.eval_feature_converter()
  titles = _item_titles(task_name)
  path = pathlib.Path(output or pathlib.Path(model_dir) / f"infer_{split}_step_{step}.jsonl")
  shown = None
  with open(path, "w") as f:
    for task in eval_lib.eval_task_names(task_name):
      batches = eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows)
      for record in text_generation.generated_rows(generate, batches, vocabulary):
        record = {"task": task, **record}
        f.write(json.dumps(record) + "\n")
        if user is not None and shown is None and record.get("user_id") == user:
          shown = record
  if user is not None:
    if shown is None:
      raise ValueError(f"infer.user = {user}: no {split} row of {task_name} for that user"
                       + (f" among the first {max_rows} of each task" if max_rows else ""))
    print(text_generation.conversation(shown, titles))
  print(f"wrote generated recommendations and narratives for split {split!r} to {path}")
  return str(path)


def _item_titles(task_name: str) -> dict[int, str]:
  import recjax.tasks as tasks
  data_dir = tasks.data_dir_of(task_name)
  if data_dir is None:
    return {}
  from recjax.data.prepared import PreparedDataset
  return PreparedDataset(data_dir).item_titles()


def _infer_reat(model_factory, task_name, task_feature_lengths, model_dir, mesh, rules, *, split, top_k,
                batch_size, output, max_rows) -> str:
  from recjax.evaluation import evaluators
  from recjax.evaluation import reat as reat_lib
  source = evaluators.Source.from_checkpoint(model_factory, task_name, model_dir, mesh, rules,
                                             task_feature_lengths=task_feature_lengths)
  path = pathlib.Path(output or pathlib.Path(model_dir) / f"infer_{split}_step_{source.step}.jsonl")
  rows = reat_lib.infer(source, task_name, task_feature_lengths, path, split=split, top_k=max(top_k, 1),
                        batch_size=batch_size, max_rows=max_rows)
  print(f"wrote {top_k} beams (texts and the items they name) for {rows} rows of split {split!r} to {path}")
  return str(path)


def _original_ids(task_name: str) -> dict[int, str] | None:
  import recjax.tasks as tasks
  data_dir = tasks.data_dir_of(task_name)
  if data_dir is None:
    return None
  from recjax.data.prepared import PreparedDataset
  table = PreparedDataset(data_dir).items(["item_id", "original_id"]).to_pydict()
  return dict(zip(table["item_id"], table["original_id"]))
