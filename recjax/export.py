"""Export a trained checkpoint to a self-contained directory.

  EXPORT_DIR/
    params.npz          inference parameters only (no optimizer state), flat "a/b/c" keys
    item_table.npz      the scored item table and bias (what ranking uses)
    queries.jaxexport   serialized jax.export: (params, batch) -> query vectors [b, D]
    recommend.jaxexport serialized jax.export: (params, batch) -> top-k (scores, item ids),
                        history items excluded; the batch dimension is symbolic
    config.gin          the operative gin config of the run
    metadata.json       step, task, vocab size, input length, top_k, feature names
    items.tsv           item_id -> original id, short id, title (when the dataset is known)

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
from recjax.evaluation import ranking
from recjax.train import mesh as mesh_lib

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
           mesh_fn: Callable = mesh_lib.create_mesh, logical_axis_rules=mesh_lib.DEFAULT_RULES) -> str:
  """Writes EXPORT_DIR (see the module docstring); returns its path."""
  mesh = mesh_fn()
  scorer, step = eval_lib.checkpoint_scorer(model, mixture_or_task_name, model_dir, mesh,
                                            logical_axis_rules, checkpoint_step)
  out = integrity.begin_staged(export_dir, "export")  # moved to export_dir when complete
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


# --- loading (no model code) -----------------------------------------------------


def _load(export_dir):
  d = pathlib.Path(export_dir)
  integrity.verify_export(d)
  with np.load(d / "params.npz") as z:
    params = {k: jnp.asarray(z[k]) for k in z.files}
  with np.load(d / "item_table.npz") as z:
    table, bias = jnp.asarray(z["table"]), jnp.asarray(z["bias"])
  metadata = json.loads((d / "metadata.json").read_text())
  return d, params, table, bias, metadata


def load_scorer(export_dir) -> eval_lib.Scorer:
  d, params, table, bias, metadata = _load(export_dir)
  exported = jax.export.deserialize((d / "queries.jaxexport").read_bytes())
  return eval_lib.Scorer(exported.call, params, table, bias, metadata["vocab_size"])


def load_recommender(export_dir):
  """(fn(batch) -> (scores, ids), metadata) from an export directory."""
  d, params, table, bias, metadata = _load(export_dir)
  exported = jax.export.deserialize((d / "recommend.jaxexport").read_bytes())
  return (lambda batch: exported.call(params, batch, table, bias)), metadata


def exported_step(export_dir) -> int:
  return json.loads((pathlib.Path(export_dir) / "metadata.json").read_text())["step"]


def load_eval_converter(export_dir):
  from recjax.data.converters import ItemSequenceEvalConverter
  return ItemSequenceEvalConverter()
