"""The shared-memory regions a tier-2 server has mapped, by client session and request slot.

A session ends on ShmDetach (the client closing), when its doorbell connection closes, or, when the
client dies without either, at the first sweep after its process is gone (server.py sweeps on
attach, on Stats and periodically; the check is by pid, so client and server must share a pid
namespace, and a recycled pid keeps a dead session until the server stops). Dropping a session unmaps its regions once no request still
reads them.
"""

from __future__ import annotations

import os
import threading

from glinthawk_jax.protos.shm_wire import Region


class ShmSessions:
  """Thread-safe map (session, slot) -> Region."""

  def __init__(self):
    self._lock = threading.Lock()
    self._sessions: dict[int, tuple[int, dict[int, Region]]] = {}  # session -> (pid, slots)

  def attach(self, session: int, slot: int, name: str, size: int, pid: int) -> None:
    """Maps the named region as `slot` of `session`, replacing that slot's previous region.

    Raises OSError/ValueError (naming the region) if it cannot be mapped.
    """
    self.sweep()
    region = Region(name, size, create=False)
    with self._lock:
      owner, slots = self._sessions.setdefault(session, (pid, {}))
      if owner != pid:
        raise ValueError(f"shm session {session:x} belongs to pid {owner}, not {pid}")
      slots[slot] = region

  def detach(self, session: int) -> bool:
    """Drops a session; False if it was unknown."""
    with self._lock:
      return self._sessions.pop(session, None) is not None

  def pid_of(self, session: int) -> int:
    """The client pid that attached `session`; KeyError naming it if it is not attached."""
    with self._lock:
      if session not in self._sessions:
        raise KeyError(f"shm session {session:x} is not attached")
      return self._sessions[session][0]

  def region(self, session: int, slot: int) -> Region:
    """KeyError naming the session or slot if it was never attached (or has been dropped)."""
    with self._lock:
      if session not in self._sessions:
        raise KeyError(f"shm session {session:x} is not attached")
      slots = self._sessions[session][1]
      if slot not in slots:
        raise KeyError(f"shm session {session:x} has no slot {slot}")
      return slots[slot]

  def sweep(self) -> None:
    """Drops the sessions whose client process no longer exists."""
    with self._lock:
      for session, (pid, _) in list(self._sessions.items()):
        if not _alive(pid):
          del self._sessions[session]

  def totals(self) -> tuple[int, int]:
    """(sessions, bytes mapped), after a sweep."""
    self.sweep()
    with self._lock:
      return len(self._sessions), sum(r.size for _, slots in self._sessions.values()
                                      for r in slots.values())


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True
