"""Export a trained checkpoint to a self-contained directory.

A scoring model (Bert4Rec, SASRec+, FLARE):

  EXPORT_DIR/
    params.npz          inference parameters only (no optimizer state), flat "a/b/c" keys
    item_table.npz      the scored item table and bias (what ranking uses)
    queries.jaxexport   serialized jax.export: (params, batch) -> query vectors [b, D]
    recommend.jaxexport serialized jax.export: (params, batch) -> top-k (scores, item ids),
                        history items excluded; the batch dimension is symbolic
    config.gin          the operative gin config of the run
    metadata.json       step, task, vocab size, input length, top_k, feature names
    items.tsv           item_id -> original id, short id, title (when the dataset is known)

A generative model (TIGER):

    params.npz          inference parameters
    trie.npz            the decoding trie of the task's semantic IDs (level_0 .. level_L-1)
    generate.jaxexport  serialized jax.export: (params, trie, batch) -> (items [b, K],
                        scores [b, K]) by trie-constrained beam search; b symbolic
    config.gin, metadata.json ("evaluator": "generative_retrieval", the trie's offsets and
                        sizes, num_beams, the eval converter), items.tsv

An LM recommender that writes (LUMEN, FLARE + LLM's LM; evaluator "lumen"):

    params.npz          inference parameters
    frozen.npz          the model's frozen inputs, when it has any
    generate_recommend.jaxexport  serialized jax.export: (params, frozen, batch) -> {"items",
                        "item_scores", "target_rank", "text"}: the item softmax after "ID:"
                        (top num_items), then the narrative decoded greedily after the top item
    generate_text.jaxexport       the same without the item: {"text"} after the prompt
                        (batch: `PrefixLMEvalConverter` rows, a fixed batch of `batch_size`)
    vocabulary.model    the task's SentencePiece model (decodes "text" without the task registry)
    config.gin, metadata.json ("evaluator": "lumen", num_items, max_new_tokens, the task's
                        lengths, the eval converter with its placeholder id), items.tsv

Serving needs only jax (`jax.export.deserialize(...).call(params, batch)`), not recjax's
model code; `recjax evaluate --exported DIR` re-computes the checkpoint's metrics from
these files.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from recjax import integrity
from recjax.data import identity
from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import evaluators
from recjax.evaluation import exported as exported_lib
from recjax.evaluation import generative
from recjax.evaluation import ranking
from recjax.models import base
from recjax.train import mesh as mesh_lib

# Readers of an export (they live with evaluation, which must not import this module).
load_scorer = exported_lib.load_scorer
load_recommender = exported_lib.load_recommender
load_generator = exported_lib.load_generator
exported_step = exported_lib.exported_step
load_eval_converter = exported_lib.load_eval_converter

BATCH_FEATURES = ("inputs", "segment_ids", "positions", "mask_position")


def _flatten(params) -> tuple[dict[str, np.ndarray], list[str], object]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves]
  flat = {k: np.asarray(jax.device_get(v)) for k, (_, v) in zip(keys, leaves)}
  return flat, keys, jax.tree_util.tree_structure(params)


def _batch_spec(length: int, b, critiques: bool = False):
  spec = {"inputs": jax.ShapeDtypeStruct((b, length), jnp.int32),
          "segment_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
          "positions": jax.ShapeDtypeStruct((b, length), jnp.int32),
          "mask_position": jax.ShapeDtypeStruct((b,), jnp.int32)}
  if critiques:  # critique tasks: per-position critique ids, the target's at the MASK
    spec["critiques"] = jax.ShapeDtypeStruct((b, length), jnp.int32)
  return spec


def _has_critiques(task_name: str) -> bool:
  import seqio
  import recjax.tasks  # noqa: F401
  return "critiques" in seqio.get_mixture_or_task(task_name).output_features


def export(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
           task_feature_lengths: dict = gin.REQUIRED, model_dir: str = gin.REQUIRED,
           export_dir: str = gin.REQUIRED, top_k: int = 20, checkpoint_step: int | None = None,
           num_beams: int = 20, batch_size: int | None = None, mesh_fn: Callable = mesh_lib.create_mesh,
           logical_axis_rules=mesh_lib.DEFAULT_RULES, checkpoint: str = "latest") -> str:
  """Writes EXPORT_DIR (see the module docstring); returns its path. `num_beams`: the
  beams (= items returned) a generative model's export decodes; `top_k`: the items an LM
  recommender's export returns; `batch_size`: their fixed batch (None: symbolic; an LM
  recommender needs one). Evaluated with the same batch size as the checkpoint, a fixed
  batch compiles the same program, so near-tied beams order alike and the metrics match
  exactly; the reader pads smaller batches."""
  mesh = mesh_fn()
  source = evaluators.Source.from_checkpoint(model, mixture_or_task_name,
                                             eval_lib.checkpoint_dir(model_dir, checkpoint), mesh,
                                             logical_axis_rules, checkpoint_step, task_feature_lengths)
  out = integrity.begin_staged(export_dir, "export")  # moved to export_dir when complete
  kind = base.evaluator_name(source.model)
  if kind in ("generative_retrieval", "lumen"):
    if kind == "generative_retrieval":
      _export_generative(source, out, mixture_or_task_name, task_feature_lengths, num_beams, batch_size)
    else:  # `top_k`: the items recommended after "ID:"
      _export_text_generation(source, out, mixture_or_task_name, task_feature_lengths, top_k, batch_size)
    integrity.finish_staged(out, export_dir, "export")
    print(f"exported step {source.step} of {model_dir} to {export_dir}")
    return str(export_dir)
  scorer, step = eval_lib.params_scorer(source.model, source.trainer, source.params), source.step
  flat, keys, treedef = _flatten(scorer.params)
  np.savez(out / "params.npz", **flat)
  np.savez(out / "item_table.npz", table=np.asarray(jax.device_get(scorer.item_table)),
           bias=np.asarray(jax.device_get(scorer.bias)))
  length = task_feature_lengths["items"]
  vocab_size = scorer.vocab_size

  def unflatten(flat_params):
    return jax.tree_util.tree_unflatten(treedef, [flat_params[k] for k in keys])

  def queries(flat_params, batch):
    return scorer.queries_fn(unflatten(flat_params), batch)

  def recommend(flat_params, batch, item_table, item_bias):
    q = queries(flat_params, batch)
    return ranking.top_k(q, item_table, item_bias, k=top_k, exclude=batch["inputs"],
                         vocab_size=vocab_size)

  (b,) = jax.export.symbolic_shape("b")
  critiques = _has_critiques(mixture_or_task_name)
  params_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  table_spec = jax.ShapeDtypeStruct(scorer.item_table.shape, jnp.float32)
  bias_spec = jax.ShapeDtypeStruct(scorer.bias.shape, jnp.float32)
  exported_q = jax.export.export(jax.jit(queries))(params_spec, _batch_spec(length, b, critiques))
  exported_r = jax.export.export(jax.jit(recommend))(params_spec, _batch_spec(length, b, critiques), table_spec,
                                                     bias_spec)
  (out / "queries.jaxexport").write_bytes(exported_q.serialize())
  (out / "recommend.jaxexport").write_bytes(exported_r.serialize())
  (out / "config.gin").write_text(gin.operative_config_str())
  metadata = {"step": int(step), "task": mixture_or_task_name, "vocab_size": int(vocab_size),
              "length": int(length), "top_k": int(top_k), "batch_features": list(BATCH_FEATURES) + (["critiques"] if critiques else []),
              "item_ids": {"pad": 0, "mask": 1, "first": 2}, "platforms": list(exported_q.platforms),
              "usage": "jax.export.deserialize(open('recommend.jaxexport','rb').read()).call("
                       "params, batch, table, bias) -> (scores [b, top_k], item ids [b, top_k])",
              "dataset": identity.of_task(mixture_or_task_name)}
  (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  _write_items(out, mixture_or_task_name)
  integrity.finish_staged(out, export_dir, "export")
  print(f"exported step {step} of {model_dir} to {export_dir}")
  return str(export_dir)


def _write_items(out: pathlib.Path, task_name: str) -> None:
  """items.tsv from the task's prepared dataset, when the task records where it lives."""
  import recjax.tasks as tasks
  data_dir = tasks.data_dir_of(task_name)
  if data_dir is None:
    return
  from recjax.data.prepared import PreparedDataset
  table = PreparedDataset(data_dir).items(["item_id", "original_id", "short_id", "title"]).to_pydict()
  with open(out / "items.tsv", "w") as f:
    f.write("item_id\toriginal_id\tshort_id\ttitle\n")
    for row in zip(*table.values()):
      f.write("\t".join("" if v is None else str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")


def _export_generative(source, out: pathlib.Path, task_name: str, task_feature_lengths, num_beams: int,
                       batch_size: int | None) -> None:
  import recjax.tasks as tasks
  model, trainer = source.model, source.trainer
  tables = generative.trie_tables(tasks.semantic_ids_of(task_name))
  flat, keys, treedef = _flatten(source.params)
  np.savez(out / "params.npz", **flat)
  np.savez(out / "trie.npz", **{f"level_{l}": np.asarray(c) for l, c in enumerate(tables.children)})
  converter = model.eval_feature_converter()
  lengths = converter.get_model_feature_lengths(task_feature_lengths)
  features = ["encoder_input_tokens"]

  def generate(flat_params, children, batch):
    params = jax.tree_util.tree_unflatten(treedef, [flat_params[k] for k in keys])
    trie = type(tables)(children=tuple(children), offsets=tables.offsets, sizes=tables.sizes)
    return model.predict_batch(trainer.network(params), batch, trie, num_beams=num_beams)

  b = batch_size or jax.export.symbolic_shape("b")[0]
  params_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  children_spec = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in tables.children)
  batch_spec = {"encoder_input_tokens": jax.ShapeDtypeStruct((b, lengths["encoder_input_tokens"]), jnp.int32)}
  exported = jax.export.export(jax.jit(generate))(params_spec, children_spec, batch_spec)
  (out / "generate.jaxexport").write_bytes(exported.serialize())
  (out / "config.gin").write_text(gin.operative_config_str())
  metadata = {"step": int(source.step), "task": task_name, "evaluator": "generative_retrieval",
              "vocab_size": int(model.vocab_size), "num_beams": int(num_beams), "batch_features": features,
              "batch_size": batch_size,
              "task_feature_lengths": {k: int(v) for k, v in task_feature_lengths.items()},
              "trie": {"offsets": [int(o) for o in tables.offsets], "sizes": [int(z) for z in tables.sizes]},
              "converter": {"class": type(converter).__name__,
                            "kwargs": {"input_unit": converter.input_unit, "start_token": converter.start_token,
                                       "user_buckets": converter.user_buckets,
                                       "user_token_start": converter.user_token_start}},
              "platforms": list(exported.platforms),
              "usage": "jax.export.deserialize(open('generate.jaxexport','rb').read()).call(params, "
                       "(level_0, ..., level_L-1), {'encoder_input_tokens': int32 [b, E]}) -> "
                       "(item ids [b, num_beams], scores [b, num_beams]); -1 = no item",
              "dataset": identity.of_task(task_name)}
  (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  _write_items(out, task_name)


def _export_text_generation(source, out: pathlib.Path, task_name: str, task_feature_lengths, top_k: int,
                            batch_size: int | None) -> None:
  """The `lumen` evaluator's generation (`text_generation.checkpoint_generator`), one
  serialized function per `recommend`, the parameters and frozen inputs as arguments."""
  import seqio
  import shutil
  import recjax.tasks  # noqa: F401
  from recjax.evaluation import text_generation
  model, trainer = source.model, source.trainer
  if not batch_size:
    raise ValueError("exporting an LM recommender needs a fixed batch: bind export_lib.export.batch_size "
                     "(e.g. = %EVAL_BATCH_SIZE, as experiments/lumen_synthetic.gin does)")
  flat, keys, treedef = _flatten(source.params)
  np.savez(out / "params.npz", **flat)
  frozen = {k: np.asarray(jax.device_get(v)) for k, v in (trainer.frozen or {}).items()}
  if frozen:
    np.savez(out / "frozen.npz", **frozen)
  converter = model.eval_feature_converter()
  lengths = converter.get_model_feature_lengths(task_feature_lengths)
  max_new_tokens = int(task_feature_lengths["targets"])
  features = [k for k in text_generation.FEATURES if k in lengths]  # soft-prompt slots only when used
  batch_spec = {k: jax.ShapeDtypeStruct((batch_size, lengths[k]) if k != "item_target" else (batch_size,), jnp.int32)
                for k in features}
  params_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
  frozen_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in frozen.items()}
  functions = {}
  for recommend, name in ((True, "generate_recommend"), (False, "generate_text")):
    def generate(flat_params, frozen_inputs, batch, recommend=recommend):
      params = jax.tree_util.tree_unflatten(treedef, [flat_params[k] for k in keys])
      if frozen_inputs:
        batch = dict(batch, frozen=frozen_inputs)
      return model.predict_batch(trainer.network(params), batch, num_items=top_k, max_new_tokens=max_new_tokens,
                                 recommend=recommend)
    exported = jax.export.export(jax.jit(generate))(params_spec, frozen_spec, batch_spec)
    (out / f"{name}.jaxexport").write_bytes(exported.serialize())
    functions[name] = list(exported.platforms)
  vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
  spm = getattr(vocabulary, "sentencepiece_model_file", None)
  if spm:
    shutil.copyfile(spm, out / "vocabulary.model")
  (out / "config.gin").write_text(gin.operative_config_str())
  metadata = {"step": int(source.step), "task": task_name, "evaluator": "lumen", "kind": "text_generation",
              "vocab_size": int(model.vocab_size), "num_items": int(top_k), "max_new_tokens": max_new_tokens,
              "batch_features": features, "batch_size": int(batch_size),
              "feature_lengths": {k: int(lengths[k]) for k in features},
              "task_feature_lengths": {k: int(v) for k, v in task_feature_lengths.items()},
              "frozen": sorted(frozen), "vocabulary": "vocabulary.model" if spm else None,
              "converter": {"class": type(converter).__name__,
                            "kwargs": {"placeholder_id": int(converter.placeholder_id),
                                       "soft_tokens": int(converter.soft_tokens)}},
              "platforms": functions["generate_recommend"],
              "usage": "recjax.evaluation.exported.load_text_generator(DIR)(batch, recommend) -> {'items', "
                       "'item_scores', 'target_rank', 'text'}; or jax.export.deserialize(open("
                       "'generate_recommend.jaxexport','rb').read()).call(params, frozen, batch) with batch = "
                       "{prompt_tokens, prompt_item_ids, prompt_mask: int32 [batch_size, W], item_target: int32 "
                       "[batch_size]}; 'text' ids end at EOS (1), decode them with vocabulary.model",
              "dataset": identity.of_task(task_name)}
  (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
  _write_items(out, task_name)
