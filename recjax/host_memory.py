"""Keep XLA's per-step host buffers off the kernel's page-fault path (glibc malloc).

XLA on the CPU allocates one temp buffer per executed computation (activations, logits,
gradients), hundreds of MB for a training step, with malloc, and frees it after the step.
glibc serves any request above 32 MB (the largest mmap threshold it allows) with a fresh
mmap and returns it with munmap on free. XLA runs on worker threads, and a worker
thread's malloc arena (heaps of at most 64 MB) maps anything larger regardless of the
threshold settings, so every step page-faulted its whole temp buffer in again: about
235,000 minor faults and ~45% of the CPU time in the kernel for SASRec+ on Beauty.

`tune_malloc` (run when `recjax` is imported, before JAX or TensorFlow start threads)
puts every thread on the main arena (M_ARENA_MAX=1), serves large blocks from the heap
rather than mmap (M_MMAP_MAX=0) and keeps freed memory for reuse instead of trimming it
(M_TRIM_THRESHOLD): the next step reuses the same pages. The process's resident memory
then stays at its peak rather than shrinking between steps. RECJAX_TUNE_MALLOC=0 turns it
off; it does nothing where glibc's mallopt is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None


def tune_malloc() -> bool:
  """Applies the settings once per process; True if glibc accepted them."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("RECJAX_TUNE_MALLOC", "1") == "0" or not os.uname().sysname == "Linux":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  _applied = all(mallopt(k, v) == 1 for k, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                  (M_TRIM_THRESHOLD, 2**31 - 1)))
  return _applied
