"""recjax: hybrid item-ID + language recommenders in JAX/Flax."""

import os as _os

# TensorFlow is only the input pipeline's engine; keep its C++ start-up chatter out of the
# console unless the user asked for it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before JAX / TensorFlow start threads: XLA's per-step host buffers are reused instead of
# mapped and page-faulted in every step (recjax/host_memory.py; RECJAX_TUNE_MALLOC=0: off).
from recjax import host_memory as _host_memory

_host_memory.tune_malloc()

__version__ = "0.1.0"
