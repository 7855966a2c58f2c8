"""Where a process's Python threads spend their time: a thread samples every thread's innermost frames
(sys._current_frames) at a fixed interval between start() and stop(), and counts each (thread, frames)
pair.

A thread blocked in C (a lock, a socket, a device copy) shows the Python line that called it, so waits
and work both appear. Sampling takes the GIL for a few tens of microseconds a sample.
"""

from __future__ import annotations

import collections
import re
import sys
import threading


class StackSamples:
  """Samples every `interval_s` between start() and stop(); top() gives the commonest stacks per thread of
  what stop() returned, summed over calls."""

  def __init__(self, interval_s: float = 0.002, depth: int = 3):
    self.interval_s, self.depth = interval_s, depth
    self._recording = threading.Event()
    self._lock = threading.Lock()  # the counts: a sample lands wholly before stop() or after the next start()
    self._counts: collections.Counter = collections.Counter()
    self._samples = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, name="stack-samples", daemon=True)
    self._thread.start()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._recording.set()  # wakes the sampler if it waits for a start()
    self._thread.join()

  def start(self) -> None:
    with self._lock:
      self._counts, self._samples = collections.Counter(), 0
    self._recording.set()

  def stop(self) -> tuple[collections.Counter, int]:
    """(counts of (thread kind, frames), samples taken) since start()."""
    self._recording.clear()
    with self._lock:
      return self._counts, self._samples

  def _sample(self) -> None:
    me = threading.get_ident()
    while not self._stop.wait(self.interval_s):
      self._recording.wait()  # idle between calls
      with self._lock:
        if not self._recording.is_set():
          continue
        names = {t.ident: _thread_kind(t.name) for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
          if ident != me:
            self._counts[names.get(ident, "?"), self._frames(frame)] += 1
        self._samples += 1

  def _frames(self, frame) -> str:
    parts = []
    while frame is not None and len(parts) < self.depth:
      code = frame.f_code
      parts.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
      frame = frame.f_back
    return " < ".join(parts)


def top(recorded: list[tuple[collections.Counter, int]], per_thread: int = 8) -> dict[str, list[tuple[float, str]]]:
  """Per thread kind, over stop()'s results: its commonest stacks as (fraction of samples, frames innermost
  first). Threads of one kind (a pool) add up, so a fraction can pass 1."""
  counts, samples = collections.Counter(), 0
  for c, n in recorded:
    counts.update(c)
    samples += n
  by_thread: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
  for (thread, frames), n in counts.most_common():
    if len(by_thread[thread]) < per_thread:
      by_thread[thread].append((round(n / max(samples, 1), 4), frames))
  return dict(by_thread)


def _thread_kind(name: str) -> str:
  """A thread's name without its pool index ("tier2_3" -> "tier2", "Thread-7 (run)" -> "Thread (run)")."""
  return re.sub(r"[-_]\d+", "", name)


def print_top(stacks: dict[str, list[tuple[float, str]]], file=sys.stdout) -> None:
  """Prints top()'s result, thread by thread."""
  for thread, rows in sorted(stacks.items()):
    print(f"  thread {thread}:", file=file)
    for fraction, frames in rows:
      print(f"    {fraction:6.3f}  {frames}", file=file)

