"""Planner: memory fit, the rate formula, the search, equal-cost arithmetic, and the CLI."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from glinthawk_jax.sim import cost_model, planner
from glinthawk_jax.sim.profiles import HardwareProfile, Network
from glinthawk_jax.sim.splitwise import equal_cost_ratio
from glinthawk_jax.sim.two_tier import two_tier_times
from models.model_config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA2_70B = ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                         num_heads=64, num_kv_heads=8, head_dim=128, dtype="bfloat16")
T4 = HardwareProfile("t4", "accelerator", "datasheet", memory_gb=16, mem_bandwidth_gbs=320, peak_tflops=65,
                     network_gbps=8, price_per_hour=0.5, bandwidth_efficiency=0.8, compute_efficiency=0.4)
CPU = HardwareProfile("cpu", "cpu", "datasheet", memory_gb=256, mem_bandwidth_gbs=50, peak_tflops=1.2,
                      network_gbps=16, price_per_hour=1.5, usable_memory_fraction=0.85)
WL = planner.Workload(prompt_tokens=512, output_tokens=256)


def test_min_slices_for_llama2_70b_on_t4():
  """14.4 GB usable: 8 layers (13.69 GB) + embedding (0.52 GB) fit, 9 layers (15.4 GB) do not."""
  layer = cost_model.layer_params(LLAMA2_70B) * 2
  assert 8 * layer + 32000 * 8192 * 2 <= T4.usable_memory < 9 * layer
  assert planner.min_slices(LLAMA2_70B, T4) == 10


def test_rate_is_the_tightest_of_depth_and_station_loads():
  """T <= B k / cycle and T (w_i / B + p_i / G) <= 1 at every station, one of them with equality."""
  for k in (1, 4, 40):
    plan = planner.evaluate_two_tier(LLAMA2_70B, T4, CPU, Network(0.005), WL, 10, 2, 64, k)
    times = two_tier_times(LLAMA2_70B, T4, CPU, Network(0.005), 64, WL.mean_context, 10, 2)
    link = cost_model.link_bandwidth(T4, CPU, 2, Network(0.005))
    prefill = planner._prefill_work(LLAMA2_70B, T4, WL, 10, link)
    loads = {n: plan.tokens_per_s * (w / 64 + prefill.get(n, 0) / WL.output_tokens)
             for n, w in times.station_work().items()}
    depth = 64 * k / times.cycle()
    assert plan.tokens_per_s <= depth * (1 + 1e-12)
    assert max(loads.values()) <= 1 + 1e-12
    if plan.bottleneck == "depth":
      assert plan.tokens_per_s == pytest.approx(depth, rel=1e-12)
    else:
      assert loads[plan.bottleneck] == pytest.approx(1.0, rel=1e-12)
  assert planner.evaluate_two_tier(LLAMA2_70B, T4, CPU, Network(0.005), WL, 10, 2, 64, 1).bottleneck == "depth"


def test_memory_limits_depth():
  """Tier-2 KV: k B (P + G) tokens x 8 layers x 8 KiB (fp32) must fit in the slice's nodes."""
  per_seq = WL.memory_context * 8 * 2 * 8 * 128 * 4
  k_max = int(CPU.usable_memory // (64 * per_seq))
  assert planner.evaluate_two_tier(LLAMA2_70B, T4, CPU, Network(), WL, 10, 1, 64, k_max) is not None
  assert planner.evaluate_two_tier(LLAMA2_70B, T4, CPU, Network(), WL, 10, 1, 64, k_max + 1) is None
  assert planner.evaluate_paged(LLAMA2_70B, T4, WL, 9, 1, 1) is None  # weights alone do not fit


def test_search_matches_brute_force():
  space = planner.SearchSpace(batches=(8, 64, 256), depths=tuple(range(1, 41)), tier2_nodes=(1, 2, 3),
                              extra_slices=1, paged_extra_slices=1)
  found = planner.search_two_tier(LLAMA2_70B, T4, CPU, Network(0.002), WL, space)[0]
  brute = []
  for s, n, b, k in itertools.product((10, 11), space.tier2_nodes, space.batches, space.depths):
    p = planner.evaluate_two_tier(LLAMA2_70B, T4, CPU, Network(0.002), WL, s, n, b, k)
    if p:
      brute.append(p)
  best = max(p.tokens_per_dollar for p in brute)
  assert found.tokens_per_dollar == pytest.approx(best, rel=1e-12)
  # ... reached at the smallest depth that gets there
  same = [p for p in brute if (p.slices, p.tier2_nodes_per_slice, p.batch) ==
          (found.slices, found.tier2_nodes_per_slice, found.batch)]
  assert found.in_flight == min(p.in_flight for p in same if p.tokens_per_s >= found.tokens_per_s * (1 - 1e-12))


def test_settle_reaches_the_event_model_target():
  plan = planner.search_two_tier(LLAMA2_70B, T4, CPU, Network(0.001), WL,
                                 planner.SearchSpace(batches=(64,), tier2_nodes=(2,), extra_slices=0))[0]
  settled, simulated = planner.settle(LLAMA2_70B, T4, CPU, Network(0.001), WL, plan)
  assert settled.in_flight >= plan.in_flight
  assert 0.98 * settled.tokens_per_s <= simulated <= settled.tokens_per_s * (1 + 1e-9)


def test_equal_cost_ratio_arithmetic():
  assert equal_cost_ratio(1.4, 0.8, 1.0, 1.0) == pytest.approx(1.75)
  assert equal_cost_ratio(300.0, 10.0, 100.0, 10.0) == pytest.approx(3.0)
  plan = planner.Plan("paged", 2, 0, 1, 1, tokens_per_s=100.0, cost_per_hour=3.6, bottleneck="depth",
                      tier1_memory_gb=0, tier2_memory_gb=0, cycle_s=1)
  assert plan.tokens_per_dollar == pytest.approx(1e5)
  assert plan.cost_per_million_tokens == pytest.approx(10.0)


def test_plan_cli_writes_json_and_plots(tmp_path):
  out = tmp_path / "plan"
  proc = subprocess.run(
      [sys.executable, "launch/plan.py", "--config=configs/tiny.py", "--workloads=64:32",
       "--delays_ms=0,50", "--max_tier2_nodes=2", "--max_in_flight=16", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((out / "plan.json").read_text())
  row = report["workloads"][0]
  assert row["two_tier"]["system"] == "two_tier" and row["paged"]["system"] == "paged"
  assert [r["one_way_delay_s"] for r in row["latency_curve"]] == [0.0, 0.05]
  assert (out / "two_tier_64_32.png").stat().st_size > 1000
  assert report["tier1"]["source"] == "datasheet"


def test_plan_cli_splitwise_equal_cost(tmp_path):
  out = tmp_path / "split"
  proc = subprocess.run(
      [sys.executable, "launch/plan.py", "--system=splitwise", "--config=configs/tiny.py", "--trace=code",
       "--requests=60", "--machines=3", "--bisections=3", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((out / "plan.json").read_text())
  assert [row["pools"] for row in report["layouts"]] == [
      {"mixed": 3}, {"prefill": 1, "decode": 2}, {"prefill": 2, "decode": 1}]
  best = max(report["layouts"][1:], key=lambda r: r["goodput"])
  assert report["split_vs_unsplit_equal_cost"] == pytest.approx(best["goodput"] / report["layouts"][0]["goodput"])
  assert (out / "splitwise.png").stat().st_size > 1000
