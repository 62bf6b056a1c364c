"""recjax: hybrid item-ID + language recommenders in JAX/Flax."""

__version__ = "0.1.0"
