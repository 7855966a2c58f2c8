"""benchmarks/stack_samples.py: each thread's commonest stacks, sampled while recording."""

import threading
import time

from benchmarks import stack_samples


def _spin_in_here(stop: threading.Event) -> None:
  while not stop.is_set():
    sum(range(1000))


def test_stack_samples_find_where_each_thread_is():
  stop, idle = threading.Event(), threading.Event()
  busy = threading.Thread(target=_spin_in_here, args=(stop,), name="spinner-3")
  waiting = threading.Thread(target=idle.wait, name="waiter")
  busy.start()
  waiting.start()
  try:
    with stack_samples.StackSamples(interval_s=0.002) as samples:
      samples.start()
      time.sleep(0.3)
      first = samples.stop()
      time.sleep(0.05)  # not recorded
      samples.start()
      time.sleep(0.1)
      top = stack_samples.top([first, samples.stop()])
  finally:
    stop.set()
    idle.set()
    busy.join()
    waiting.join()
  assert first[1] > 20
  fraction, frames = top["spinner"][0]  # the pool index is dropped from the name
  assert "_spin_in_here" in frames.split(" < ")[0] and fraction > 0.5
  assert "wait" in top["waiter"][0][1].split(" < ")[0]
  assert "stack-samples" not in top


def test_thread_kinds_drop_only_the_pool_index():
  assert stack_samples._thread_kind("tier2_3") == "tier2"
  assert stack_samples._thread_kind("tier1-send_0") == "tier1-send"
  assert stack_samples._thread_kind("Thread-7 (run)") == "Thread (run)"
  assert stack_samples._thread_kind("MainThread") == "MainThread"
