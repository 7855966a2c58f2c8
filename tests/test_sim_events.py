"""Event loop and station: ordering, deterministic service, Little's law."""

import numpy as np
import pytest

from glinthawk_jax.sim.events import EventLoop, Station


def test_events_run_in_time_order_ties_in_schedule_order():
  loop, seen = EventLoop(), []
  loop.at(2.0, seen.append, "c")
  loop.at(1.0, seen.append, "a")
  loop.at(1.0, seen.append, "b")
  loop.run()
  assert seen == ["a", "b", "c"] and loop.now == 2.0


def test_scheduling_in_the_past_is_refused():
  loop = EventLoop()
  loop.at(1.0, lambda: None)
  loop.run()
  with pytest.raises(ValueError, match="before now"):
    loop.at(0.5, lambda: None)


def test_one_station_deterministic_throughput_is_one_over_service_time():
  loop = EventLoop()
  st = Station(loop, "s")
  done = []
  for _ in range(50):
    st.submit(0.25, lambda: done.append(loop.now))
  loop.run()
  assert np.allclose(np.diff(done), 0.25, rtol=0, atol=1e-12)
  assert done[-1] == pytest.approx(50 * 0.25, abs=1e-12)
  assert st.busy_time == pytest.approx(loop.now, abs=1e-12)


def test_priority_serves_lowest_first_fifo_among_equals():
  loop, st, order = EventLoop(), None, []
  st = Station(loop, "s")
  st.submit(1.0, order.append, "first")  # starts at once
  st.submit(1.0, order.append, "low", priority=5)
  st.submit(1.0, order.append, "high1", priority=1)
  st.submit(1.0, order.append, "high2", priority=1)
  loop.run()
  assert order == ["first", "high1", "high2", "low"]


def test_littles_law_on_a_poisson_queue():
  """M/D/1, lambda = 0.6, service 1: L = lambda W holds exactly on a path that starts and ends
  empty, and W matches Pollaczek-Khinchine within sampling error for this seed."""
  rng = np.random.default_rng(7)
  lam, service, n = 0.6, 1.0, 20000
  loop = EventLoop()
  st = Station(loop, "q")
  for t in np.cumsum(rng.exponential(1 / lam, n)):
    loop.at(float(t), st.submit, service, lambda: None)
  loop.run()
  big_l, w = st.mean_in_system(), st.mean_sojourn()
  lam_hat = st.departures / loop.now
  assert big_l == pytest.approx(lam_hat * w, rel=1e-9)
  rho = lam * service
  w_theory = service + rho * service / (2 * (1 - rho))  # P-K mean sojourn of M/D/1
  assert w == pytest.approx(w_theory, rel=0.05)
  assert big_l == pytest.approx(lam * w_theory, rel=0.06)
