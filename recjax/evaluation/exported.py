"""Reading an export directory (written by `recjax.export`) without model code.

Evaluation and infer load exports through here; `recjax.export` writes them. Neither
module imports the other.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from recjax import integrity
from recjax.evaluation.scorer import Scorer
from recjax.models import beam_search as bs


def metadata(export_dir) -> dict:
  """The export's metadata, after every file's checksum is verified (a tampered or
  truncated export is refused naming the file)."""
  integrity.verify_export(export_dir)
  return json.loads((pathlib.Path(export_dir) / "metadata.json").read_text())


def _params(d: pathlib.Path) -> dict:
  with np.load(d / "params.npz") as z:
    return {k: jnp.asarray(z[k]) for k in z.files}


def _load(export_dir):
  d = pathlib.Path(export_dir)
  with np.load(d / "item_table.npz") as z:
    table, bias = jnp.asarray(z["table"]), jnp.asarray(z["bias"])
  return d, _params(d), table, bias, metadata(d)


def kind(export_dir) -> str:
  """"ranking" (a scoring model) or "generative_retrieval" (a generating one)."""
  return metadata(export_dir).get("evaluator", "ranking")


def load_scorer(export_dir) -> Scorer:
  d, params, table, bias, meta = _load(export_dir)
  exported = jax.export.deserialize((d / "queries.jaxexport").read_bytes())
  return Scorer(exported.call, params, table, bias, meta["vocab_size"])


def load_recommender(export_dir):
  """(fn(batch) -> (scores, ids), metadata) from a ranking export."""
  d, params, table, bias, meta = _load(export_dir)
  exported = jax.export.deserialize((d / "recommend.jaxexport").read_bytes())
  return (lambda batch: exported.call(params, batch, table, bias)), meta


def load_generator(export_dir):
  """(predict(features) -> (items [b, K], scores [b, K]), metadata) from a generative
  export: the serialized constrained beam search, its parameters and its trie."""
  d = pathlib.Path(export_dir)
  meta, params = metadata(d), _params(d)
  with np.load(d / "trie.npz") as z:
    children = tuple(jnp.asarray(z[f"level_{l}"]) for l in range(len(meta["trie"]["sizes"])))
  exported = jax.export.deserialize((d / "generate.jaxexport").read_bytes())
  features, fixed = meta["batch_features"], meta.get("batch_size")

  def predict(batch):
    batch = {k: jnp.asarray(batch[k]) for k in features}
    n = len(batch[features[0]])
    if fixed is None or n == fixed:
      return exported.call(params, children, batch)
    if n > fixed:
      raise ValueError(f"{d} decodes batches of {fixed} rows, got {n}")
    pad = {k: jnp.pad(v, [(0, fixed - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    return jax.tree.map(lambda x: x[:n], exported.call(params, children, pad))

  return predict, meta


def trie_from_export(export_dir) -> bs.TrieTables:
  d = pathlib.Path(export_dir)
  meta = metadata(d)["trie"]
  with np.load(d / "trie.npz") as z:
    children = tuple(jnp.asarray(z[f"level_{l}"]) for l in range(len(meta["sizes"])))
  return bs.TrieTables(children=children, offsets=tuple(meta["offsets"]), sizes=tuple(meta["sizes"]))


def exported_step(export_dir) -> int:
  return metadata(export_dir)["step"]


def load_eval_converter(export_dir):
  meta = metadata(export_dir)
  if "converter" in meta:
    from recjax.data import converters
    spec = meta["converter"]
    return getattr(converters, spec["class"])(**spec["kwargs"])
  from recjax.data.converters import ItemSequenceEvalConverter
  return ItemSequenceEvalConverter()
