"""Starts tier-2 servers as child processes (launch/tier2.py) and waits for their ready lines.

Used by the tier-1 launcher (tier2.spawn), tests and benchmarks. Each child is told this process's pid
(--exit_with_parent_pid), so on Linux a tier 1 killed with SIGKILL leaves no server holding its KV pool.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO_ROOT, "launch", "tier2.py")
_READY = re.compile(r"^tier2 ready on (\S+:\d+)$", re.M)


class ServerProcess:
  """A running server: `address` is "host:port"; `stop()` ends it (SIGTERM, then SIGKILL). Subclasses
  for other launchers set `launcher`, `ready` (the ready line's pattern) and `label`."""

  launcher = LAUNCHER
  ready = _READY

  def __init__(self, args: list[str], env: dict[str, str] | None = None):
    self.args = args
    # The child writes through a copy of this file's descriptor, which shares its offset: without O_APPEND
    # its writes would land wherever output()'s seek(0) last left it, over its earlier lines.
    self.log = tempfile.TemporaryFile(mode="w+")
    fcntl.fcntl(self.log.fileno(), fcntl.F_SETFL, fcntl.fcntl(self.log.fileno(), fcntl.F_GETFL) | os.O_APPEND)
    self.process = subprocess.Popen(
        [sys.executable, self.launcher, *args, f"--exit_with_parent_pid={os.getpid()}"], cwd=REPO_ROOT,
        env={**os.environ, **env} if env else None, stdout=self.log, stderr=subprocess.STDOUT, text=True)
    self.address = ""

  @property
  def label(self) -> str:
    return f"tier-2 server {self.args}"

  def wait_ready(self, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      match = self.ready.search(self.output())
      if match:
        self.address = match.group(1)
        return self.address
      if self.process.poll() is not None:
        raise RuntimeError(f"{self.label} exited with {self.process.returncode}:\n{self.output()[-3000:]}")
      time.sleep(0.05)
    log_tail = self.output()[-3000:]
    self.stop()
    raise TimeoutError(f"{self.label}: no ready line in {timeout_s} s:\n{log_tail}")

  def output(self) -> str:
    self.log.seek(0)
    return self.log.read()

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.log.close()


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_env(on: bool = True) -> dict[str, str]:
  """GLIBC_TUNABLES for a child whose large allocations (the KV pool) glibc should back with transparent
  huge pages (madvise; the host's THP mode must be always or madvise; the kernel's page walks over a pool
  of many GiB otherwise miss the TLB at every 4 KiB page), or, with on=False, should not: this process's
  tunables either way, its huge-page setting replaced."""
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
  return {"GLIBC_TUNABLES": ":".join(tunables + ([HUGE_PAGES_TUNABLE] if on else []))}


def start_servers(arg_lists: list[list[str]], timeout_s: float = 120.0) -> list[ServerProcess]:
  """Starts one server per argument list (all at once) and returns them once all are ready."""
  servers = [ServerProcess(args) for args in arg_lists]
  try:
    for server in servers:
      server.wait_ready(timeout_s)
  except Exception:
    stop_servers(servers)
    raise
  return servers


def stop_servers(servers: list[ServerProcess]) -> None:
  """Stops all at once (SIGTERM to each first, so their shutdowns overlap)."""
  for server in servers:
    if server.process.poll() is None:
      server.process.terminate()
  for server in servers:
    server.stop()
