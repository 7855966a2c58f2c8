"""The event loop and a single-server station: the two pieces every simulated system is built from."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Callable


class EventLoop:
  """Runs callbacks in time order; ties run in the order they were scheduled."""

  def __init__(self):
    self.now = 0.0
    self._heap: list[tuple[float, int, Callable, tuple]] = []
    self._seq = itertools.count()

  def at(self, time: float, fn: Callable, *args: Any) -> None:
    if time < self.now:
      raise ValueError(f"event at t={time} is before now={self.now}")
    heapq.heappush(self._heap, (time, next(self._seq), fn, args))

  def after(self, delay: float, fn: Callable, *args: Any) -> None:
    if delay < 0:
      raise ValueError(f"delay={delay}: expected >= 0")
    self.at(self.now + delay, fn, *args)

  def run(self, until: float = math.inf, stop: Callable[[], bool] | None = None) -> None:
    """Processes events up to time `until` (inclusive), or until `stop()` turns true."""
    while self._heap and self._heap[0][0] <= until:
      time, _, fn, args = heapq.heappop(self._heap)
      self.now = time
      fn(*args)
      if stop is not None and stop():
        return
    if until != math.inf:
      self.now = max(self.now, until)

  @property
  def pending(self) -> int:
    return len(self._heap)


class Station:
  """One server with a waiting line. Jobs are served lowest `priority` first, FIFO among equals.

  Keeps the statistics Little's law needs: the time integral of jobs present (waiting + in
  service), arrivals, and the summed sojourn time of departed jobs.
  """

  def __init__(self, loop: EventLoop, name: str):
    self.loop = loop
    self.name = name
    self._queue: list[tuple[Any, int, float, float, Callable, tuple]] = []
    self._seq = itertools.count()
    self.busy = False
    self.busy_time = 0.0
    self.arrivals = 0
    self.departures = 0
    self.sojourn_sum = 0.0
    self._present = 0
    self._area = 0.0
    self._last = 0.0

  def submit(self, service_time: float, on_done: Callable, *args: Any, priority: Any = 0) -> None:
    """Queues a job needing `service_time` seconds; calls on_done(*args) when it leaves."""
    if service_time < 0:
      raise ValueError(f"station {self.name}: service_time={service_time} < 0")
    self._account()
    self.arrivals += 1
    self._present += 1
    heapq.heappush(self._queue, (priority, next(self._seq), service_time, self.loop.now, on_done, args))
    if not self.busy:
      self._start_next()

  def _start_next(self) -> None:
    _, _, service, arrived, on_done, args = heapq.heappop(self._queue)
    self.busy = True
    self.busy_time += service
    self.loop.after(service, self._finish, arrived, on_done, args)

  def _finish(self, arrived: float, on_done: Callable, args: tuple) -> None:
    self._account()
    self._present -= 1
    self.departures += 1
    self.sojourn_sum += self.loop.now - arrived
    self.busy = False
    if self._queue:
      self._start_next()
    on_done(*args)

  def _account(self) -> None:
    self._area += self._present * (self.loop.now - self._last)
    self._last = self.loop.now

  def mean_in_system(self) -> float:
    """Time-average number of jobs present since t=0 (L in Little's law)."""
    self._account()
    return self._area / self.loop.now if self.loop.now > 0 else 0.0

  def mean_sojourn(self) -> float:
    """Mean time departed jobs spent here (W in Little's law)."""
    return self.sojourn_sum / self.departures if self.departures else 0.0
