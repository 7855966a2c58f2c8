"""Sections in arrival order: a server that serves calls on several threads still runs each stage of
their work (the page-table step, then the KV pool's) in the order the calls came, so a call's K, V are
placed and written before a later call checks and reads them, while one call's stage can run beside
another's. Arrival order is the order the calls reached the server, which a client may not send in."""

from __future__ import annotations

import contextlib
import threading


class Turns:
  """Tickets in arrival order; ticket t's turn at a stage starts once every earlier ticket has ended
  that stage."""

  def __init__(self, stages: int):
    self._cond = threading.Condition()
    self._issued = 0
    self._next = [0] * stages  # per stage: the lowest ticket that has not ended it
    self._ended: list[set[int]] = [set() for _ in range(stages)]  # per stage: ended tickets above _next

  def take(self) -> int:
    with self._cond:
      self._issued += 1
      return self._issued - 1

  @contextlib.contextmanager
  def turn(self, ticket: int, stage: int):
    """Waits for every earlier ticket to end `stage`, runs the block, then ends `stage` for `ticket`."""
    with self._cond:
      self._cond.wait_for(lambda: self._next[stage] == ticket)
    try:
      yield
    finally:
      self._end(ticket, [stage])

  def end(self, ticket: int) -> None:
    """Ends every stage of `ticket` (again is a no-op): a call that fails early must still end them."""
    self._end(ticket, range(len(self._next)))

  def _end(self, ticket: int, stages) -> None:
    with self._cond:
      for stage in stages:
        if ticket < self._next[stage]:
          continue
        self._ended[stage].add(ticket)
        while self._next[stage] in self._ended[stage]:
          self._ended[stage].remove(self._next[stage])
          self._next[stage] += 1
      self._cond.notify_all()
