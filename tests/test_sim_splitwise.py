"""Splitwise cluster DES: single-request closed forms, layer-wise transfer, routing, bursts."""

import numpy as np
import pytest

from glinthawk_jax.sim import cost_model
from glinthawk_jax.sim.profiles import HardwareProfile
from glinthawk_jax.sim.splitwise import Cluster
from glinthawk_jax.sim.traces import Request, load_azure, poisson, rescale
from models.model_config import ModelConfig

MODEL = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64, dtype="bfloat16")
HW = HardwareProfile("m", "accelerator", "datasheet", memory_gb=0.05, mem_bandwidth_gbs=10, peak_tflops=0.1,
                     network_gbps=0.08, price_per_hour=2.0, usable_memory_fraction=1.0)


def test_one_request_unsplit_matches_closed_form():
  r = Request(1.0, prompt_tokens=100, output_tokens=4)
  res = Cluster(MODEL, HW, {"mixed": 1}).run([r])
  prefill = cost_model.prefill_time(HW, MODEL, [100])
  steps = [cost_model.decode_time(HW, MODEL, [100 + i]) for i in (1, 2, 3)]
  assert res.ttft["p50"] == pytest.approx(prefill, rel=1e-12)
  assert res.e2e["p50"] == pytest.approx(prefill + sum(steps), rel=1e-12)
  assert res.tbt["p99"] == pytest.approx(np.percentile(steps, 99), rel=1e-12)
  assert res.output_tokens == 4


def test_one_request_split_pays_the_layerwise_transfer_residue():
  r = Request(0.0, prompt_tokens=100, output_tokens=2)
  c = Cluster(MODEL, HW, {"prefill": 1, "decode": 1})
  res = c.run([r])
  prefill = cost_model.prefill_time(HW, MODEL, [100])
  total = 100 * c.kv_token_bytes / HW.network
  transfer = max(total - prefill, total / MODEL.num_layers)
  assert c.kv_transfer_delay(100, prefill) == pytest.approx(transfer)
  assert res.e2e["p50"] == pytest.approx(prefill + transfer + cost_model.decode_time(HW, MODEL, [101]),
                                         rel=1e-12)


def test_prompt_router_joins_the_shortest_queue():
  reqs = [Request(0.0, 200, 1), Request(0.0, 50, 1), Request(0.0, 50, 1), Request(0.0, 50, 1)]
  c = Cluster(MODEL, HW, {"prefill": 2, "decode": 1})
  c.run(reqs)
  first, second = c.machines[0], c.machines[1]
  assert first.busy_time > 0 and second.busy_time > 0
  # 200 -> m0; 50 -> m1; 50 -> m1 (50 < 200); 50 -> m1 (100 < 200): m0 ran one prompt.
  assert first.busy_time == pytest.approx(cost_model.prefill_time(HW, MODEL, [200]))


@pytest.mark.parametrize("pools", [{"mixed": 2}, {"prefill": 1, "decode": 2}, {"prefill": 1, "mixed": 1}])
def test_burst_drops_nothing_and_respects_kv_memory(pools):
  c = Cluster(MODEL, HW, pools, max_prefill_tokens=2048)
  reqs = [Request(0.0, 300 + 7 * i, 20 + i % 13) for i in range(150)]
  res = c.run(reqs)
  assert res.requests == 150 and res.output_tokens == sum(r.output_tokens for r in reqs)
  cap = c.kv_capacity_tokens * c.kv_token_bytes / 1e9
  assert max(res.peak_kv_gb.values()) <= cap + 1e-12
  assert all(0 < u <= 1 + 1e-9 for u in res.utilization.values())


def test_request_larger_than_a_machine_is_named():
  c = Cluster(MODEL, HW, {"mixed": 1})
  with pytest.raises(ValueError, match="request 0"):
    c.run([Request(0.0, c.kv_capacity_tokens, 5)])


def test_littles_law_on_the_cluster():
  """Mean requests in the system = completion rate x mean E2E (exact on the sample path)."""
  reqs = poisson(rate=3.0, n=300, prompt_tokens=120, output_tokens=30, seed=1)
  c = Cluster(MODEL, HW, {"prefill": 1, "decode": 2})
  res = c.run(reqs)
  t = np.linspace(0, reqs[0].arrival_s + res.makespan_s, 200001)
  arrive = np.array([r.arrival_s for r in reqs])
  done = sorted(c.finished, key=lambda s: s.index)
  leave = arrive + np.array([s.token_times[-1] - s.req.arrival_s for s in done])
  in_system = (arrive[None, :] <= t[:, None]).sum(1) - (leave[None, :] <= t[:, None]).sum(1)
  area = np.sum(in_system[:-1] * np.diff(t))
  assert area == pytest.approx(np.sum(leave - arrive), rel=2e-3)


def test_azure_trace_loads_and_rescales():
  reqs = load_azure("code", limit=500)
  assert len(reqs) == 500 and reqs[0].arrival_s == 0.0
  assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
  fast = rescale(reqs, rate=10.0)
  assert fast[-1].arrival_s == pytest.approx(499 / 10.0)
  assert [r.prompt_tokens for r in fast] == [r.prompt_tokens for r in reqs]
