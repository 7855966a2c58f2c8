"""Running totals of a kind of duration (the tier-2 client's timing counters)."""

from __future__ import annotations

import dataclasses


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
