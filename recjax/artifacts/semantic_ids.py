"""The `semantic_ids` artifact: RQ-VAE semantic IDs of a prepared dataset's items.

  recjax fit --gin_file=fits/text_embeddings.gin --dataset beauty=DIR   # item text embeddings
  recjax fit --gin_file=fits/rqvae.gin --dataset beauty=DIR             # -> artifacts/semantic_ids/rqvae/
  sids = semantic_ids.load(DIR, "rqvae")     # a recjax.models.rqvae.SemanticIds

On disk: semantic_ids.npz (codes [vocab_size, levels] with rows 0/1 = -1, tokens, metadata
as JSON: codebook sizes, token offsets, vocab size, metrics, encoder, the RQ-VAE config and
loss history; the embedding standardization), rqvae_params.npz (the trained network, so
new items can be given codes: `load_rqvae`) and the manifest. The RQ-VAE trains with orbax
checkpoints in the build dir, so an interrupted fit resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable, Sequence

import numpy as np

from recjax.artifacts import manifest
from recjax.artifacts import text_embeddings
from recjax.models import rqvae
from recjax.models.rqvae import SemanticIds

KIND = "semantic_ids"
FILE = "semantic_ids.npz"
FORMAT_VERSION = 1


def _stderr(s: str) -> None:
  print(s, file=sys.stderr, flush=True)


def _metadata(data_dir, name: str, codes: np.ndarray, codebook_sizes: Sequence[int], metadata: dict) -> dict:
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  if codes.shape[0] != ds.vocab_size or len(codebook_sizes) != codes.shape[1]:
    raise ValueError(f"codes {codes.shape} do not fit {ds.vocab_size} item ids x {len(codebook_sizes)} levels")
  offsets = rqvae.token_offsets(codebook_sizes)
  return {"format_version": FORMAT_VERSION, "name": name, "levels": len(codebook_sizes),
          "codebook_sizes": [int(s) for s in codebook_sizes], "offsets": offsets,
          "special_tokens": {"pad": rqvae.PAD_TOKEN, "eos": rqvae.EOS_TOKEN},
          "vocab_size": offsets[-1] + int(codebook_sizes[-1]), "content_hash": ds.content_hash, **metadata}


def _write(directory, codes: np.ndarray, metadata: dict, arrays: dict | None) -> None:
  sids = SemanticIds(codes=codes, metadata=metadata)
  np.savez(directory / FILE, codes=codes, tokens=sids.tokens, metadata=np.asarray(json.dumps(metadata)),
           **(arrays or {}))


def save(data_dir, name: str, codes: np.ndarray, codebook_sizes: Sequence[int], metadata: dict | None = None,
         arrays: dict | None = None) -> SemanticIds:
  """Writes a semantic-ID artifact from given codes [vocab_size, levels] (rows 0/1 = -1):
  for IDs made elsewhere (tests, imported sets). Returns them as loaded."""
  codes = np.asarray(codes, np.int32)
  meta = _metadata(data_dir, name, codes, codebook_sizes, metadata or {})
  with manifest.build(data_dir, KIND, name, fit=f"{__name__}.save") as b:
    _write(b.dir, codes, meta, arrays)
  return load(data_dir, name)


def load(data_dir, name: str = "rqvae") -> SemanticIds:
  """The SemanticIds of artifact `name`; a missing or stale one is refused in one sentence."""
  path = manifest.require(data_dir, KIND, name)
  with np.load(path / FILE) as f:
    codes, metadata = f["codes"], json.loads(str(f["metadata"]))
  return SemanticIds(codes=codes, metadata=metadata)


PARAMS_FILE = "rqvae_params.npz"


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _save_params(model: rqvae.RQVAE, path) -> None:
  import jax
  from flax import nnx
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  np.savez(path, **{_path_key(p): np.asarray(v) for p, v in flat})


def load_rqvae(data_dir, name: str = "rqvae") -> tuple[rqvae.RQVAE, np.ndarray, np.ndarray]:
  """(the trained RQ-VAE, embedding mean, std) of a fitted artifact: codes for a new item's
  embedding e are `model((e - mean) / (std + 1e-6))["codes"]` (before the unique level)."""
  import jax
  from flax import nnx
  path = manifest.require(data_dir, KIND, name)
  if not (path / PARAMS_FILE).is_file():
    raise FileNotFoundError(f"the semantic_ids artifact {name!r} holds no RQ-VAE (given codes, not fitted)")
  with np.load(path / FILE) as f:
    meta, mean, std = json.loads(str(f["metadata"])), f["embedding_mean"], f["embedding_std"]
  cfg = meta["config"]
  model = rqvae.RQVAE(rqvae.RQVAEConfig(**{**cfg, "hidden_dims": tuple(cfg["hidden_dims"])}), rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  with np.load(path / PARAMS_FILE) as f:
    state = jax.tree_util.tree_map_with_path(lambda p, v: f[_path_key(p)], state)
  nnx.update(model, state)
  return model, mean, std


def fit(data_dir, name: str = "rqvae", *, embeddings: str = "minilm",
        config: rqvae.RQVAEConfig = rqvae.RQVAEConfig(), unique_codes: int | None = None,
        checkpoint_every: int = 500, stop_after_steps: int | None = None, gin_file: str | None = None,
        log: Callable[[str], None] | None = _stderr) -> dict:
  """Trains the RQ-VAE on the `embeddings` text-embedding artifact, adds the unique level and
  writes artifact `name`. Checkpoints every `checkpoint_every` steps in the build dir; a rerun
  after an interruption resumes there. `stop_after_steps` stops (with a checkpoint, raising
  FitInterrupted) once that many steps are done. Returns the metrics and the artifact path."""
  from recjax.artifacts import checkpoints
  manifest.check_name(KIND, name)
  if unique_codes is not None and unique_codes < 1:
    raise ValueError(f"unique_codes must be >= 1, got {unique_codes}")
  emb, emb_meta = text_embeddings.load(data_dir, embeddings)
  start = time.perf_counter()
  x, mean, std = rqvae.standardize(emb[rqvae.NUM_RESERVED_ITEMS:])
  config = dataclasses.replace(config, input_dim=x.shape[1])
  unique_codes = unique_codes or config.codebook_size
  settings = {"embeddings": embeddings, "embeddings_created": emb_meta["created"],
              "rqvae": dataclasses.asdict(config), "unique_codes": unique_codes, "checkpoint_every": checkpoint_every}
  with manifest.build(data_dir, KIND, name, fit=f"{__name__}.fit", config=settings, gin_file=gin_file) as b:
    ckpt = checkpoints.FitCheckpoints(b.checkpoint_dir)

    def restore(template):
      got = ckpt.restore(template)
      return None if got is None else (got[0], got[1]["history"])

    def save_checkpoint(step, carry, history):
      ckpt.save(step, carry, {"history": history})
      if stop_after_steps is not None and step >= stop_after_steps:
        ckpt.close()
        raise checkpoints.FitInterrupted(step, b.checkpoint_dir)

    result = rqvae.train_rqvae(x, config, log=log, checkpoint_every=checkpoint_every, restore=restore,
                               save=save_checkpoint)
    ckpt.close()
    metrics = dict(result.metrics)
    metrics["levels"] = config.num_levels
    full = rqvae.add_unique_level(result.codes, unique_codes)  # rows are items 2..: item-id order
    metrics["unique_level_codes_used"] = int(full[:, -1].max()) + 1
    metrics["unique_after_last_level"] = bool(len(np.unique(full, axis=0)) == len(full))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    codes = np.full((len(emb), full.shape[1]), -1, np.int32)
    codes[rqvae.NUM_RESERVED_ITEMS:] = full
    sizes = [config.codebook_size] * config.num_levels + [unique_codes]
    meta = _metadata(data_dir, name, codes, sizes, {
        "metrics": metrics, "embeddings": embeddings, "encoder": emb_meta["encoder_name"],
        "encoder_fingerprint": emb_meta["encoder_fingerprint"], "config": dataclasses.asdict(config),
        "history": result.history})
    _write(b.dir, codes, meta, {"embedding_mean": mean, "embedding_std": std})
    _save_params(result.model, b.dir / PARAMS_FILE)
    b.manifest.update(metrics=metrics, inputs={"text_embeddings": {"name": embeddings,
                                                                   "created": emb_meta["created"]}})
  if log:
    log("rqvae metrics: " + json.dumps(metrics))
  return {**metrics, "artifact": str(manifest.artifact_dir(data_dir, KIND, name))}


__all__ = ["SemanticIds", "fit", "load", "load_rqvae", "save"]
