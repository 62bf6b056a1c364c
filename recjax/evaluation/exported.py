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
  """"ranking" (a scoring model), "generative_retrieval" (a generating one) or "lumen"
  (an LM recommender that writes)."""
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


def _pad_rows(batch: dict, fixed: int, what) -> tuple[dict, int]:
  n = len(next(iter(batch.values())))
  if n > fixed:
    raise ValueError(f"{what} decodes batches of {fixed} rows, got {n}")
  if n < fixed:
    batch = {k: jnp.pad(v, [(0, fixed - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
  return batch, n


def load_text_generator(export_dir):
  """generate(batch, recommend) -> {"items", "item_scores", "target_rank", "text"} (recommend)
  or {"text"} of an LM recommender's export (`recjax.export`, evaluator "lumen"): the same
  outputs as `text_generation.checkpoint_generator`, from the serialized functions and numpy
  parameters alone. `batch`: `PrefixLMEvalConverter` rows ("prompt_tokens", "prompt_item_ids",
  "prompt_mask" [b, W], "item_target" [b]; other keys are ignored), any b: run in chunks of
  the export's fixed batch size, the last padded; `.metadata` is the export's metadata."""
  d = pathlib.Path(export_dir)
  meta, params = metadata(d), _params(d)
  if meta.get("evaluator") != "lumen":
    raise ValueError(f"{d} is not an LM recommender's export (its evaluator is {meta.get('evaluator', 'ranking')!r})")
  frozen = {}
  if (d / "frozen.npz").is_file():
    with np.load(d / "frozen.npz") as z:
      frozen = {k: jnp.asarray(z[k]) for k in z.files}
  functions = {True: jax.export.deserialize((d / "generate_recommend.jaxexport").read_bytes()),
               False: jax.export.deserialize((d / "generate_text.jaxexport").read_bytes())}
  features, fixed, widths = meta["batch_features"], meta["batch_size"], meta["feature_lengths"]

  def generate(batch, recommend: bool):
    batch = {k: jnp.asarray(batch[k], jnp.int32) for k in features}
    for k, v in batch.items():
      if v.ndim == 2 and v.shape[1] != widths[k]:
        raise ValueError(f"{d} reads {k} of width {widths[k]} (task lengths {meta['task_feature_lengths']}), "
                         f"got {v.shape[1]}: use the export's TASK_FEATURE_LENGTHS")
    n = len(batch[features[0]])
    parts = []
    for start in range(0, max(n, 1), fixed):  # the export's fixed batch: chunks, the last padded
      chunk, m = _pad_rows({k: v[start:start + fixed] for k, v in batch.items()}, fixed, d)
      parts.append({k: v[:m] for k, v in functions[bool(recommend)].call(params, frozen, chunk).items()})
    return parts[0] if len(parts) == 1 else {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}

  generate.metadata = meta
  return generate


class SentencePieceVocabulary:
  """An export's `vocabulary.model`: `decode(ids)` (ids outside the model, e.g. PAD / EOS
  handled by the caller or padded vocabulary rows, are dropped) and `encode(text)`."""

  def __init__(self, model_file):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids) -> str:
    size = self.sp.get_piece_size()
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size])


def load_vocabulary(export_dir) -> SentencePieceVocabulary:
  """The text vocabulary of an LM recommender's export, without the task registry:
  `text_generation.decode_text(load_vocabulary(DIR), out["text"][r], after_item=recommend)`."""
  d = pathlib.Path(export_dir)
  name = metadata(d).get("vocabulary")
  if not name:
    raise ValueError(f"{d} holds no vocabulary (its task's vocabulary has no SentencePiece model file)")
  return SentencePieceVocabulary(d / name)


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
