"""CPU time of processes and the host's free cores (glinthawk_jax/sim/host_cpu.py), measured for real."""

import os
import subprocess
import sys
import time

from glinthawk_jax.sim import host_cpu


def test_cpu_seconds_counts_every_thread_of_another_process():
  """A child whose two worker threads each spin 0.15 s of CPU while its main thread sleeps: the
  total counts both threads (the main thread alone has next to none); a sleeping child's stays flat."""
  spin = ("import threading, time\n"
          "def work():\n  t = time.thread_time()\n  while time.thread_time() - t < 0.15: pass\n  time.sleep(30)\n"
          "for _ in range(2): threading.Thread(target=work, daemon=True).start()\ntime.sleep(30)")
  busy = subprocess.Popen([sys.executable, "-c", spin])
  idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  try:
    deadline = time.monotonic() + 30
    while host_cpu.cpu_seconds(busy.pid) < 0.3 and time.monotonic() < deadline:
      time.sleep(0.05)
    spun, slept = host_cpu.cpu_seconds(busy.pid), host_cpu.cpu_seconds(idle.pid)
    assert 0.3 <= spun < 5.0, spun
    time.sleep(0.2)
    assert host_cpu.cpu_seconds(idle.pid) - slept < 0.05  # asleep: no CPU
  finally:
    busy.kill()
    idle.kill()


def test_available_cores_is_within_this_process_cores():
  cores = host_cpu.available_cores(seconds=0.2)
  assert 0.1 < cores <= len(os.sched_getaffinity(0)) * 1.05, cores
