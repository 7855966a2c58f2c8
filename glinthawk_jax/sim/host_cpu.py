"""CPU time of processes and the cores this host gives us now (Linux /proc; for measured profiles).

Tier 1's host threads and tier-2 servers on one host share its cores: when their work per round trip
exceeds what the cores give, the run is CPU-bound however deep the pipeline (sim/generation.py)."""

from __future__ import annotations

import multiprocessing
import os
import time


def cpu_seconds(pid: int) -> float:
  """CPU seconds the live threads of process `pid` have run (nanosecond counters of
  /proc/PID/task/*/schedstat; a thread that has ended drops out, so take deltas over long-lived ones)."""
  total = 0
  task_dir = f"/proc/{pid}/task"
  try:
    tids = os.listdir(task_dir)
  except FileNotFoundError:
    raise ProcessLookupError(f"process {pid} has exited (a tier-2 server that died?): no CPU time to read") from None
  for tid in tids:
    try:
      with open(f"{task_dir}/{tid}/schedstat") as f:
        total += int(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
      pass  # a thread that ended meanwhile
  return total / 1e9


def _spin(ready, seconds: float, out) -> None:
  ready.wait(timeout=60)  # all spin at once, however late each started
  cpu, begun = time.process_time(), time.monotonic()
  while time.monotonic() < begun + seconds:
    pass
  out.put((time.process_time() - cpu) / max(time.monotonic() - begun, 1e-9))  # its share of a core


def available_cores(seconds: float = 0.3) -> float:
  """Cores a CPU-bound job gets now: one spinning process per core of this process's affinity for
  `seconds`, the sum of their CPU seconds over wall seconds (less than the core count while others'
  jobs run)."""
  ctx = multiprocessing.get_context("spawn")  # no fork of a process holding JAX's threads
  out = ctx.Queue()
  cores = len(os.sched_getaffinity(0))
  ready = ctx.Barrier(cores)
  procs = [ctx.Process(target=_spin, args=(ready, seconds, out)) for _ in range(cores)]
  for p in procs:
    p.start()
  shares = sum(out.get(timeout=60 + seconds) for _ in procs)
  for p in procs:
    p.join()
  return shares
