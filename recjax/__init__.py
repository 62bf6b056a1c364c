"""recjax: hybrid item-ID + language recommenders in JAX/Flax."""

import os as _os

# TensorFlow is only the input pipeline's engine; keep its C++ start-up chatter out of the
# console unless the user asked for it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
