"""Ties a spawned tier-2 server's life to the process that started it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> None:
  """Asks the kernel for SIGTERM when the parent dies, even by SIGKILL (Linux); exits at once if
  `parent_pid` is already gone. Elsewhere does nothing: the parent's own clean-up must suffice."""
  if not sys.platform.startswith("linux"):
    return
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  if os.getppid() != parent_pid:  # the parent died before the request took effect
    sys.exit(f"tier-2 server: parent process {parent_pid} is gone; exiting")
