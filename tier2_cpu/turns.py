"""Sections in arrival order: a server that serves calls on several threads still runs their KV pool work
in the order the calls came (a call's K, V written before a later call reads them)."""

from __future__ import annotations

import contextlib
import threading


class Turns:
  """Tickets in arrival order; ticket t's turn starts once every earlier ticket has ended."""

  def __init__(self):
    self._cond = threading.Condition()
    self._issued = 0
    self._next = 0  # the lowest ticket not yet ended
    self._ended: set[int] = set()  # ended tickets above _next

  def take(self) -> int:
    with self._cond:
      self._issued += 1
      return self._issued - 1

  @contextlib.contextmanager
  def turn(self, ticket: int):
    """Waits for every earlier ticket to end, runs the block, then ends `ticket`."""
    with self._cond:
      self._cond.wait_for(lambda: self._next == ticket)
    try:
      yield
    finally:
      self.end(ticket)

  def end(self, ticket: int) -> None:
    """Ends `ticket` (again is a no-op): a call that fails before its turn must still end it."""
    with self._cond:
      if ticket < self._next:
        return
      self._ended.add(ticket)
      while self._next in self._ended:
        self._ended.remove(self._next)
        self._next += 1
      self._cond.notify_all()
