"""A tier-2 server serving shared-memory calls on several threads (--serve_threads, or a pool for
injected delay): page-table steps and pool work keep arrival order (Turns), so in-flight appends and
attentions give the float64 reference's outputs."""

import threading

import numpy as np
import pytest

from glinthawk_jax.config import model_config
from glinthawk_jax.tier2_client import Tier2Client
from configs import tiny
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import start_servers, stop_servers
from tier2_cpu.turns import Turns

CFG = model_config(tiny.get_config())  # 2 layers, 4 heads, 2 KV heads, head dim 16


def test_turns_run_in_ticket_order_and_an_ended_ticket_lets_later_ones_go():
  turns, ran = Turns(stages=2), []
  tickets = [turns.take() for _ in range(4)]

  def run(ticket):
    with turns.turn(ticket, 0):
      pass
    with turns.turn(ticket, 1):
      ran.append(ticket)

  threads = [threading.Thread(target=run, args=(t,)) for t in reversed(tickets) if t != 1]
  for thread in threads:
    thread.start()
  threads[-1].join(timeout=10)  # ticket 0 runs at once
  assert ran == [0]
  turns.end(1)  # a call that failed before its turn
  turns.end(1)  # ending twice is harmless
  for thread in threads:
    thread.join(timeout=10)
  assert ran == [0, 2, 3]


@pytest.fixture(scope="module", params=["--serve_threads=3", "--inject_delay_ms=20"])
def server(request):
  procs = start_servers([["--config=configs/tiny.py", "--port=0", "--kv_cache_gb=0.001", "--kv_dtype=float32",
                          request.param]])
  yield procs[0].address
  stop_servers(procs)


def test_calls_in_flight_together_match_the_reference(server):
  rng = np.random.default_rng(0)
  ref = ReferenceKV()
  seqs = [1, 2, 3, 4]
  h, kv, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
  with Tier2Client.for_model([server], CFG, timeout_s=30) as client:
    assert client.transports == ["shm"]
    client.allocate(seqs, expected_tokens=40)
    lengths = {s: 0 for s in seqs}
    for step in range(6):
      calls = []
      for s in seqs:
        n = 8 if step == 0 else 1  # a prompt appended, then decode steps
        pos = list(range(lengths[s], lengths[s] + n))
        q, k, v = (rng.standard_normal((n, heads, d)).astype(np.float32) for heads in (h, kv, kv))
        for layer in range(CFG.num_layers):
          if step == 0:  # append only, then (without waiting) a query at the next position reads it
            client.append_async(layer, [s] * n, pos, k, v)
            ref.attend(layer, [s] * n, pos, q, k, v)
            q1, k1, v1 = (rng.standard_normal((1, heads, d)).astype(np.float32) for heads in (h, kv, kv))
            calls.append((client.attend_async(layer, [s], [n], q1, k1, v1),
                          ref.attend(layer, [s], [n], q1, k1, v1)))
          else:
            calls.append((client.attend_async(layer, [s] * n, pos, q, k, v), ref.attend(layer, [s] * n, pos, q, k, v)))
        lengths[s] += n + (step == 0)
      for future, expected in calls:
        np.testing.assert_allclose(future.result(timeout=30).astype(np.float64), expected, rtol=1e-5, atol=1e-6)
    stats = client.stats()[0]
    assert stats["tokens_served"] == len(seqs) * CFG.num_layers * (8 + 1 + 5)
    client.release(seqs)
    assert client.stats()[0]["pages_in_use"] == 0
