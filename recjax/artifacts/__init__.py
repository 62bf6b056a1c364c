"""Derived artifacts of a prepared dataset, built by gin-configured fits (`recjax fit`).

  manifest              the layout <data>/artifacts/<kind>/<name>/ + manifest.json, require()
  text_embeddings       frozen sentence-encoder embeddings of the item texts
  semantic_ids          RQ-VAE semantic IDs (TIGER, Mender)
  wals                  WALS collaborative item / user vectors
  preference_benchmark  the preference-discerning benchmark (Mender)
  fit                   the `recjax fit` entrypoint

Submodules are imported on use: `manifest` needs no JAX, the fits do.
"""
