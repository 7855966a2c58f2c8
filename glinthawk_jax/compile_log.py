"""Counts this process's XLA compilations through jax.monitoring: how many, their seconds, per function.

JAX records one backend-compile event per compile request, a persistent-cache load included (each is a
stall at a shape's first use); `compile_log()` registers the one listener of the process.
"""

from __future__ import annotations

import collections
import threading

from jax import monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog:
  """Running totals of the process's backend compiles (thread-safe)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    self.seconds = 0.0
    self.by_function: collections.Counter = collections.Counter()

  def _listen(self, event: str, duration_secs: float, **meta) -> None:
    if event != BACKEND_COMPILE_EVENT:
      return
    with self._lock:
      self.count += 1
      self.seconds += duration_secs
      self.by_function[str(meta.get("fun_name", "?"))] += 1

  def snapshot(self) -> dict:
    """{"count", "seconds", "by_function": {name: count}} so far."""
    with self._lock:
      return {"count": self.count, "seconds": self.seconds, "by_function": dict(self.by_function)}


_LOG: CompileLog | None = None
_LOG_LOCK = threading.Lock()


def compile_log() -> CompileLog:
  """The process's CompileLog, listening from the first call on."""
  global _LOG
  with _LOG_LOCK:
    if _LOG is None:
      _LOG = CompileLog()
      monitoring.register_event_duration_secs_listener(_LOG._listen)  # noqa: SLF001
    return _LOG

