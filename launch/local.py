#!/usr/bin/env python3
"""Run a recjax command as N processes on this machine (multi-host code path, one host).

  python launch/local.py --num_processes 2 -- recjax train --gin_file=gin/experiments/quickstart.gin

Each process gets RECJAX_COORDINATOR_ADDRESS / RECJAX_NUM_PROCESSES / RECJAX_PROCESS_ID, which
`recjax.train.distributed.initialize()` turns into `jax.distributed.initialize` (gloo
collectives on CPU). Output of process i is prefixed with [i]. Exit status: the first
non-zero one, else 0. On Ctrl-C / SIGTERM every process gets SIGTERM (and checkpoints).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices each process exposes (XLA host platform device count)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given (put it after --)")
  address = f"127.0.0.1:{args.port or free_port()}"
  procs = []
  for i in range(args.num_processes):
    env = dict(os.environ, RECJAX_COORDINATOR_ADDRESS=address, RECJAX_NUM_PROCESSES=str(args.num_processes),
               RECJAX_PROCESS_ID=str(i))
    if args.devices_per_process > 1:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={args.devices_per_process}").strip()
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1))

  def forward(i, p):
    for line in p.stdout:
      sys.stdout.write(f"[{i}] {line}")
      sys.stdout.flush()

  threads = [threading.Thread(target=forward, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for t in threads:
    t.start()

  def stop(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  codes = [p.wait() for p in procs]
  for t in threads:
    t.join()
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
