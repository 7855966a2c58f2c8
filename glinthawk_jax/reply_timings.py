"""When tier-2 replies come: running totals of durations, and the client's counters of how far apart a
multi-shard call's replies arrive (Tier2Client.timings, server_lateness, recent_spreads)."""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

SPREAD_LOG = 1 << 16  # the latest multi-shard calls whose spreads ReplyTimings.recent gives


@dataclasses.dataclass
class Durations:
  """Seconds in all, the longest, and how many; callers that share one hold their own lock around add."""
  total_s: float = 0.0
  max_s: float = 0.0
  count: int = 0

  def add(self, seconds: float) -> None:
    self.total_s, self.max_s, self.count = self.total_s + seconds, max(self.max_s, seconds), self.count + 1

  def __add__(self, other: "Durations") -> "Durations":
    return Durations(self.total_s + other.total_s, max(self.max_s, other.max_s), self.count + other.count)


class ReplyTimings:
  """Over the tensor calls that span several of `num_shards` shards: "spread", a call's first shard reply
  read to its last (how long its fastest shards' answers wait for the slowest); where every reply came
  through shared memory, "server_spread", the servers' first reply sent to their last (the servers' part of
  it), and per shard its lateness, how long after the call's first server it replied (one server always
  late is slow, all alike is jitter). Thread-safe."""

  def __init__(self, num_shards: int):
    self._lock = threading.Lock()
    self._spread, self._server_spread = Durations(), Durations()
    self._lateness = [Durations() for _ in range(num_shards)]
    self._log: collections.deque = collections.deque(maxlen=SPREAD_LOG)

  def add(self, seconds: float, server_sent_at: list[tuple[int, float | None]]) -> None:
    """Counts a call's spread; server_sent_at: (shard, its reply's server send time or None) each."""
    times = [t for _, t in server_sent_at]
    with self._lock:
      self._spread.add(seconds)
      server_spread = float("nan")
      if None not in times:
        server_spread = max(times) - min(times)
        self._server_spread.add(server_spread)
        for i, t in server_sent_at:
          self._lateness[i].add(t - min(times))
      self._log.append((seconds, server_spread))

  def spreads(self) -> dict[str, Durations]:
    """Copies of "spread" and "server_spread"."""
    with self._lock:
      return {"spread": dataclasses.replace(self._spread), "server_spread": dataclasses.replace(self._server_spread)}

  def lateness(self) -> list[Durations]:
    """Copies of each shard's lateness."""
    with self._lock:
      return [dataclasses.replace(d) for d in self._lateness]

  def recent(self, count: int) -> np.ndarray:
    """The latest `count` (at most SPREAD_LOG) calls' spreads, oldest first: [n, 2] seconds, the replies
    read and the servers' (NaN where a reply did not come through shared memory)."""
    with self._lock:
      latest = list(self._log)[-count:] if count > 0 else []
    return np.array(latest, np.float64).reshape(-1, 2)
