"""Derived artifacts of a prepared dataset, built by gin-configured fits (`recjax fit`).

  manifest              the layout <data>/artifacts/<kind>/<name>/ + manifest.json, require()
  text_embeddings       frozen sentence-encoder embeddings of the item texts
  semantic_ids          RQ-VAE semantic IDs (TIGER, Mender)
  wals                  WALS collaborative item / user vectors
  preference_benchmark  the preference-discerning benchmark (Mender)
  fit                   the `recjax fit` entrypoint

Submodules are imported on use: `manifest` needs no JAX, the fits do.
"""

import importlib

LOADERS = {  # kind -> module whose load(data_dir, name) returns the artifact as an object
    "text_embeddings": "recjax.artifacts.text_embeddings",  # (embeddings [vocab, D], manifest)
    "semantic_ids": "recjax.artifacts.semantic_ids",  # SemanticIds
    "wals": "recjax.artifacts.wals",  # WALSModel
    "preference_benchmark": "recjax.artifacts.preference_benchmark",  # Benchmark
}


def load(data_dir, kind: str, name: str | None = None):
  """Artifact kind/name of a prepared dataset as its Python object, for code that names
  artifacts generically (a model's frozen inputs); name defaults to the kind's default.
  Missing or stale: one sentence (`manifest.require`)."""
  from recjax.artifacts import manifest
  if kind not in LOADERS:
    raise ValueError(f"unknown artifact kind {kind!r}; choose from {', '.join(LOADERS)}")
  return importlib.import_module(LOADERS[kind]).load(data_dir, name or manifest.FITS[kind][1])
