"""ReplyTimings: spreads, per-shard lateness and the recent log, from given reply times."""

import numpy as np

from glinthawk_jax import reply_timings
from glinthawk_jax.reply_timings import Durations, ReplyTimings


def test_spreads_lateness_and_the_recent_log(monkeypatch):
  monkeypatch.setattr(reply_timings, "SPREAD_LOG", 2)
  t = ReplyTimings(num_shards=3)
  t.add(0.004, [(0, 10.0), (2, 10.003)])  # shard 2's server replied 3 ms after shard 0's
  t.add(0.002, [(1, 20.001), (2, 20.0)])
  t.add(0.001, [(0, 30.0), (1, None)])  # one reply over gRPC: no server spread, no lateness
  spreads = t.spreads()
  assert spreads["spread"] == Durations(0.007, 0.004, 3)
  assert spreads["server_spread"].count == 2 and np.isclose(spreads["server_spread"].total_s, 0.004)
  late = t.lateness()
  assert [d.count for d in late] == [1, 1, 2]
  assert np.isclose(late[1].total_s, 0.001) and np.isclose(late[2].max_s, 0.003)
  recent = t.recent(5)  # the log keeps the latest SPREAD_LOG calls
  assert recent.shape == (2, 2) and np.allclose(recent[0], [0.002, 0.001]) and np.isnan(recent[1, 1])
  assert t.recent(1)[0, 0] == 0.001 and t.recent(0).shape == (0, 2)
