"""recjax: hybrid item-ID + language recommenders in JAX/Flax."""

import contextlib as _contextlib
import importlib.abc as _abc
import os as _os
import sys as _sys

# TensorFlow is only the input pipeline's engine; keep its C++ start-up chatter out of the
# console unless the user asked for it (RECJAX_TF_LOGS=1, or their own TF_CPP_MIN_LOG_LEVEL).
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@_contextlib.contextmanager
def _native_stderr_silenced():
  """Points file descriptor 2 at /dev/null: TF's CUDA probing ("Could not find cuda
  drivers", "failed call to cuInit") is written by C++ before any log level applies."""
  try:
    _sys.stderr.flush()
    saved = _os.dup(2)
  except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to hide
    yield
    return
  devnull = _os.open(_os.devnull, _os.O_WRONLY)
  try:
    _os.dup2(devnull, 2)
    yield
  finally:
    _os.dup2(saved, 2)
    _os.close(saved)
    _os.close(devnull)


class _QuietTensorFlow(_abc.MetaPathFinder, _abc.Loader):
  """Imports TensorFlow (whoever asks first: seqio, a task, the pipeline) with its native
  stderr silenced, and hides the GPUs from it there (JAX owns them), then steps aside:
  the import that asked gets the module already loaded (create_module), nothing re-runs."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    import importlib.util  # pylint: disable=g-import-not-at-top
    _sys.meta_path.remove(self)
    with _native_stderr_silenced():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], "GPU")
      except (RuntimeError, ValueError):
        pass
    return importlib.util.spec_from_loader(fullname, self)

  def create_module(self, spec):
    return _sys.modules["tensorflow"]

  def exec_module(self, module):
    pass


if "tensorflow" not in _sys.modules and not _os.environ.get("RECJAX_TF_LOGS"):
  _sys.meta_path.insert(0, _QuietTensorFlow())

# Before JAX / TensorFlow start threads: XLA's per-step host buffers are reused instead of
# mapped and page-faulted in every step (recjax/host_memory.py; RECJAX_TUNE_MALLOC=0: off).
from recjax import host_memory as _host_memory

_host_memory.tune_malloc()

__version__ = "0.1.0"
