"""Two-tier pipeline DES vs closed forms: min(k / cycle, 1 / bottleneck)."""

import pytest

from glinthawk_jax.sim import cost_model
from glinthawk_jax.sim.profiles import HardwareProfile, Network
from glinthawk_jax.sim.two_tier import (PipelineTimes, ShardPart, makespan, simulate, split_layers,
                                        two_tier_times)
from models.model_config import ModelConfig

LLAMA2_70B = ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                         num_heads=64, num_kv_heads=8, head_dim=128, dtype="bfloat16")


@pytest.mark.parametrize("k", [1, 3])
def test_one_stage_throughput_is_one_over_service_time(k):
  t = PipelineTimes((1,), tier1=0.125)
  assert simulate(t, k, tokens=40 * k).throughput == pytest.approx(8.0, rel=1e-12)


@pytest.mark.parametrize("k,expected", [(1, 1 / 4), (2, 1 / 3), (5, 1 / 3)])
def test_two_stage_pipeline_bottleneck(k, expected):
  t = PipelineTimes((1,), tier1=1.0, tier2=3.0)
  assert t.throughput(k) == pytest.approx(expected, rel=1e-12)
  assert simulate(t, k, tokens=60 * k).throughput == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_in_flight_depth_hides_round_trip_latency(k):
  """Cycle = 1 + 0.5 + 2 + 0.25 + 2 x 1.5 = 6.75 s, bottleneck 2 s: min(k / 6.75, 1 / 2)."""
  t = PipelineTimes((1,), tier1=1.0, link_out=0.5, tier2=2.0, link_back=0.25, propagation=1.5)
  assert t.cycle() == pytest.approx(6.75)
  assert simulate(t, k, tokens=60 * k).throughput == pytest.approx(min(k / 6.75, 0.5), rel=1e-12)


def test_many_layers_and_slices_alone_and_saturated():
  """Re-entrant routes (a micro-batch visits each station once per layer): exact with one
  micro-batch in flight, the bottleneck within one completion of the window once saturated, and
  never above the closed form in between."""
  t = PipelineTimes((3, 2, 3), tier1=1.0, link_out=0.5, tier2=0.7, link_back=0.25, propagation=0.3,
                    head=0.5)
  assert simulate(t, 1, tokens=20).throughput == pytest.approx(1 / t.cycle(), rel=1e-12)
  k = 30
  sat = simulate(t, k, tokens=60 * k)
  window = (60 * k // 2) // k * k
  assert sat.throughput == pytest.approx(1 / t.bottleneck(), rel=1.5 / window)
  for k in (3, 6, 9):
    assert simulate(t, k, tokens=40 * k).throughput <= t.throughput(k) * (1 + 1e-9)


def test_split_layers_is_even_and_contiguous():
  assert split_layers(80, 10) == (8,) * 10
  assert split_layers(10, 4) == (3, 3, 2, 2)
  with pytest.raises(ValueError, match="slices=0"):
    split_layers(10, 0)


def test_wire_bytes_are_qkv_out_attention_back():
  llama2_7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                          num_heads=32, num_kv_heads=32, head_dim=128)
  assert cost_model.wire_bytes_per_token_layer(llama2_7b, 2) == (24 * 1024, 8 * 1024)  # FACTS.md
  assert cost_model.wire_bytes_per_token_layer(LLAMA2_70B, 2) == ((64 + 16) * 128 * 2, 64 * 128 * 2)


def test_stage_times_from_profiles():
  """Hand-computed roofline of one Llama-2-70B layer on round-number hardware."""
  gpu = HardwareProfile("g", "accelerator", "datasheet", memory_gb=16, mem_bandwidth_gbs=100,
                        peak_tflops=10, network_gbps=8, price_per_hour=1.0)
  cpu = HardwareProfile("c", "cpu", "datasheet", memory_gb=100, mem_bandwidth_gbs=10, peak_tflops=1,
                        network_gbps=80, price_per_hour=1.0)
  p = cost_model.layer_params(LLAMA2_70B)
  assert p == 8192 * 128 * (2 * 64 + 2 * 8) + 3 * 8192 * 28672 + 2 * 8192
  t = two_tier_times(LLAMA2_70B, gpu, cpu, Network(one_way_latency_s=0.01), batch=10, context=1000,
                     slices=10, tier2_nodes=2, kv_itemsize=4)
  assert t.tier1 == pytest.approx(max(2 * p / 100e9, 2 * p * 10 / 10e12))
  kv = 10 * 1000 * 2 * 8 * 128 * 4
  assert t.tier2 == pytest.approx(max(kv / 10e9, 4 * 64 * 128 * 10 * 1000 / 1e12) / 2)
  assert t.link_out == pytest.approx(10 * 20480 / 1e9)  # min(GPU NIC 1 GB/s, 2 x CPU NIC)
  assert t.link_back == pytest.approx(10 * 16384 / 1e9)
  assert t.propagation == 0.01 and t.layers_per_slice == (8,) * 10


def test_makespan_of_one_fused_call_closed_forms():
  """All micro-batches ready at 0, `steps` tokens each: one alone takes steps x cycle; the host
  (tier-1 step + host work) as bottleneck, k of them take k x steps x work + the last one's tail."""
  t = PipelineTimes((3,), tier1=1.0, host=0.5, tier2=0.25, propagation=1.0, head=1.0)
  assert t.cycle() == pytest.approx(3 * (1.5 + 0.25 + 2.0) + 1.0)
  assert makespan(t, 1, 4) == pytest.approx(4 * t.cycle(), rel=1e-12)
  slow_host = PipelineTimes((2,), tier1=4.0, host=1.0, tier2=0.5, propagation=0.25)
  # Host work per token 10, the rest of a round trip 1: two micro-batches keep the host busy except
  # for the last round trip of the last token.
  assert makespan(slow_host, 2, 3) == pytest.approx(2 * 3 * 10 + 1.0, rel=1e-12)


def test_shard_parts_on_one_shard_are_the_single_tier2_station():
  """Every micro-batch's request on shard 0 with the station's service and delay: the same run."""
  t = PipelineTimes((3,), tier1=1.0, host=0.5, tier2=2.0, propagation=0.75, head=1.0)
  flat = PipelineTimes((3,), tier1=1.0, host=0.5, head=1.0)
  for k in (1, 2, 4):
    parts = [[ShardPart(0, 2.0, 0.75)] for _ in range(k)]
    assert makespan(flat, k, 3, shards=parts) == pytest.approx(makespan(t, k, 3), rel=1e-12)


def test_micro_batches_on_their_own_shards_do_not_queue_at_tier2():
  """k micro-batches, each on its own shard (service 3, no tier-1 work): steps x L x 3, as one
  alone; on one shared shard the same work takes k times as long."""
  t = PipelineTimes((4,), tier1=0.0)
  own = [[ShardPart(j, 3.0, 0.0)] for j in range(4)]
  shared = [[ShardPart(0, 3.0, 0.0)] for _ in range(4)]
  assert makespan(t, 4, 2, shards=own) == pytest.approx(2 * 4 * 3.0, rel=1e-12)
  assert makespan(t, 4, 2, shards=shared) == pytest.approx(4 * 2 * 4 * 3.0, rel=1e-12)


def test_a_request_fanned_out_to_shards_waits_for_the_slowest():
  t = PipelineTimes((2,), tier1=1.0, head=0.5)
  parts = [[ShardPart(0, 1.0, 0.25), ShardPart(1, 2.0, 1.0), ShardPart(2, 0.5, 0.0)]]
  assert makespan(t, 1, 3, shards=parts) == pytest.approx(3 * (2 * (1.0 + 2.0 + 2 * 1.0) + 0.5), rel=1e-12)
  with pytest.raises(ValueError, match="expected in_flight=2"):
    makespan(t, 2, 3, shards=parts)
