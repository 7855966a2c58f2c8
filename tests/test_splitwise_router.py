"""The Splitwise router policy: worker choice, the mixed pool, waiting instead of dropping."""

import numpy as np

from glinthawk_jax.splitwise.router import Route, Router, WorkerLoad


def _router(*roles, capacity=1000, slots=4):
  return Router([WorkerLoad(f"{r}{i}", r, capacity, slots) for i, r in enumerate(roles)])


def test_prefill_by_pending_tokens_decode_by_least_kv():
  r = _router("prefill", "prefill", "decode", "decode")
  r.update("prefill0", pending_prompt_tokens=50)
  r.update("decode2", kv_reserved_tokens=100, num_seqs=1)
  r.update("decode3", kv_reserved_tokens=40, num_seqs=1)
  assert r.route(10, 5) == Route("prefill1", "decode3")
  assert r.workers["prefill1"].pending_prompt_tokens == 10
  assert r.workers["decode3"].kv_reserved_tokens == 55 and r.workers["decode3"].num_seqs == 2


def test_routes_spread_a_burst():
  r = _router("prefill", "prefill", "decode", "decode", capacity=10_000, slots=100)
  routes = [r.route(100, 10) for _ in range(8)]
  assert {x.prefill for x in routes} == {"prefill0", "prefill1"}
  assert {x.decode for x in routes} == {"decode2", "decode3"}


def test_idle_decode_worker_prefills_when_prefill_pool_is_busy():
  r = _router("prefill", "decode")
  r.update("prefill0", pending_prompt_tokens=500)
  assert r.route(10, 5) == Route("decode1", "decode1")
  # Once the decode worker holds work it is not idle: the prefill worker's queue is used.
  assert r.route(10, 5) == Route("prefill0", "decode1")


def test_idle_prefill_worker_decodes_when_decode_pool_is_full():
  r = _router("prefill", "decode", capacity=100)
  r.update("decode1", kv_reserved_tokens=95, num_seqs=1)
  assert r.route(10, 5) == Route("prefill0", "prefill0")


def test_request_waits_when_no_worker_has_room():
  r = _router("prefill", "decode", capacity=100, slots=1)
  r.update("prefill0", pending_prompt_tokens=1)
  r.update("decode1", num_seqs=1)
  assert r.route(10, 5) is None
  r.update("decode1", num_seqs=0)
  assert r.route(10, 5) == Route("decode1", "decode1")  # idle, so it prefills too


def test_dead_workers_are_skipped_and_colocated_is_both_pools():
  r = _router("prefill", "decode", "colocated")
  r.update("colocated2", kv_reserved_tokens=10)
  assert r.route(10, 5) == Route("prefill0", "decode1")
  r.mark_dead("decode1")
  assert r.route(10, 5) == Route("colocated2", "colocated2")
  r.mark_dead("colocated2")
  r.update("prefill0", pending_prompt_tokens=0)
  assert r.route(10, 5) == Route("prefill0", "prefill0")  # the only one left does everything
  r.mark_dead("prefill0")
  assert r.route(10, 5) is None


def test_burst_never_drops_and_every_request_is_routed_once_room_frees():
  """A burst larger than every worker's slots: routes until full, then None; as work finishes
  (load reports drop) the rest are routed, in order; none lost."""
  rng = np.random.default_rng(0)
  r = _router("prefill", "prefill", "decode", "decode", capacity=400, slots=3)
  queue = [(int(rng.integers(1, 100)), int(rng.integers(1, 50))) for _ in range(200)]
  routed, held = [], {"decode2": [], "decode3": []}
  while queue:
    route = r.route(*queue[0])
    if route is None:  # finish the oldest request everywhere, as a worker would report
      for name, reqs in held.items():
        if reqs:
          reqs.pop(0)
        r.update(name, num_seqs=len(reqs), kv_reserved_tokens=sum(p + m for p, m in reqs))
      for name in ("prefill0", "prefill1"):
        r.update(name, pending_prompt_tokens=0)
      continue
    req = queue.pop(0)
    routed.append(req)
    held[route.decode if route.decode in held else "decode2"].append(req)
  assert len(routed) == 200


def test_strict_pools_without_mixed_pool():
  r = Router([WorkerLoad("p", "prefill", 100, 4), WorkerLoad("d", "decode", 100, 4)], mixed_pool=False)
  r.update("p", pending_prompt_tokens=500)
  assert r.route(10, 5) == Route("p", "d")
  r.update("d", kv_reserved_tokens=95)
  r.update("p", pending_prompt_tokens=0)
  assert r.route(10, 5) is None
