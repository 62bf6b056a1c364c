"""Multi-process start-up: one call before any JAX work, the same on every launcher.

`initialize()` reads the environment the launchers in launch/ set:
  RECJAX_COORDINATOR_ADDRESS, RECJAX_NUM_PROCESSES, RECJAX_PROCESS_ID
      explicit (launch/local.py, launch/gpu_multinode.sh, any custom launcher);
  SLURM_* with SLURM_NTASKS > 1, or RECJAX_DISTRIBUTED=auto (launch/tpu_pod.sh)
      jax.distributed.initialize() detects the cluster itself (SLURM, TPU pod metadata).
On CPU the cross-process collectives use gloo. A single process does nothing.
"""

from __future__ import annotations

import os

import jax

_done = False


def initialize() -> bool:
  """Initializes jax.distributed when the environment asks for it; True if it did."""
  global _done
  if _done:
    return True
  address = os.environ.get("RECJAX_COORDINATOR_ADDRESS")
  if address:
    num = int(os.environ["RECJAX_NUM_PROCESSES"])
    pid = int(os.environ["RECJAX_PROCESS_ID"])
    if num > 1:
      _cpu_collectives()
      local = os.environ.get("RECJAX_LOCAL_DEVICE_IDS")
      jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                                 local_device_ids=[int(x) for x in local.split(",")] if local else None)
      _done = True
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("RECJAX_DISTRIBUTED") == "auto":
    _cpu_collectives()
    jax.distributed.initialize()
    _done = True
  return _done


def _cpu_collectives() -> None:
  # Only matters when the processes compute on CPU (tests, CPU clusters); harmless otherwise.
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not os.environ.get("JAX_PLATFORMS"):
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
      pass


def finish() -> None:
  """Waits for every process, then leaves jax.distributed together.

  Processes finish at different times (the primary commits checkpoints and writes
  summaries); without this barrier the faster one reaches jax's shutdown barrier alone
  and the coordination service times out.
  """
  global _done
  if not _done or jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("recjax: command finished")
  jax.distributed.shutdown()
  _done = False
