"""Plan search: the configuration with the most generated tokens per dollar, two-tier vs paged.

Throughput of a plan is the closed form of two_tier.PipelineTimes extended with prefill: each
station also does per-sequence prefill work (tier 1 runs the prompt batched; the link ships the
prompt's KV to tier 2), so with G output tokens per sequence the output rate T obeys
  T <= B * k / cycle                         (k micro-batches of B sequences in flight)
  T * (w_i / B + p_i / G) <= 1  for every station i   (w_i decode work per micro-batch token,
                                                      p_i prefill work per sequence).
"""

from __future__ import annotations

import dataclasses
import itertools

from models.model_config import ModelConfig
from glinthawk_jax.sim import cost_model
from glinthawk_jax.sim.profiles import HardwareProfile, Network
from glinthawk_jax.sim.two_tier import PipelineTimes, paged_times, simulate, split_layers, two_tier_times

WIRE_BYTES = 2  # activations and shipped KV on the wire, fp16


@dataclasses.dataclass(frozen=True)
class Workload:
  """Offline job shape: every sequence has this prompt and output length."""

  prompt_tokens: int
  output_tokens: int

  @property
  def mean_context(self) -> float:
    """Cached tokens of the average sequence over its decode (what attention reads)."""
    return self.prompt_tokens + self.output_tokens / 2

  @property
  def memory_context(self) -> int:
    """Tokens a sequence's KV reservation covers (no over-commit)."""
    return self.prompt_tokens + self.output_tokens


@dataclasses.dataclass(frozen=True)
class Plan:
  system: str  # two_tier or paged
  slices: int  # tier-1 accelerators holding one copy of the weights
  tier2_nodes_per_slice: int  # 0 for paged
  batch: int  # sequences per micro-batch
  in_flight: int  # micro-batches in flight
  tokens_per_s: float  # generated tokens per second
  cost_per_hour: float
  bottleneck: str  # the limiting station, or "depth" when k / cycle binds
  tier1_memory_gb: float  # most loaded slice
  tier2_memory_gb: float  # per slice group of tier-2 nodes
  cycle_s: float  # one micro-batch's token time alone

  @property
  def tokens_per_dollar(self) -> float:
    return self.tokens_per_s * 3600 / self.cost_per_hour

  @property
  def cost_per_million_tokens(self) -> float:
    return 1e6 / self.tokens_per_dollar

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(tokens_per_dollar=self.tokens_per_dollar, cost_per_million_tokens=self.cost_per_million_tokens)
    return d


def min_slices(m: ModelConfig, hw: HardwareProfile) -> int:
  """Fewest accelerators whose memory holds the weights (embedding on the first, head on the last)."""
  layer = cost_model.layer_params(m) * cost_model.WEIGHT_BYTES
  for slices in range(1, m.num_layers + 1):
    if _tier1_weight_bytes(m, slices) <= hw.usable_memory:
      return slices
  raise ValueError(f"{hw.name}: {hw.usable_memory / 1e9:.1f} GB usable cannot hold one layer "
                   f"({layer / 1e9:.2f} GB) plus the embedding or head")


def _tier1_weight_bytes(m: ModelConfig, slices: int) -> float:
  """Weight bytes of the most loaded slice."""
  layers = split_layers(m.num_layers, slices)
  layer = cost_model.layer_params(m) * cost_model.WEIGHT_BYTES
  head = cost_model.head_params(m) * cost_model.WEIGHT_BYTES
  loads = [n * layer for n in layers]
  loads[0] += cost_model.embed_bytes(m)
  loads[-1] += head
  return max(loads)


def _rate(times: PipelineTimes, batch: int, in_flight: int, prefill: dict[str, float],
          output_tokens: int) -> tuple[float, str]:
  """Output tokens/s and the binding constraint (see the module docstring)."""
  best, why = batch * in_flight / times.cycle(), "depth"
  for name, work in times.station_work().items():
    per_token = work / batch + prefill.get(name, 0.0) / output_tokens
    if per_token > 0 and 1.0 / per_token < best:
      best, why = 1.0 / per_token, name
  return best, why


def _prefill_work(m: ModelConfig, hw: HardwareProfile, workload: Workload, slices: int,
                  link: float | None) -> dict[str, float]:
  """Per-sequence prefill seconds at each station: batched prompt on tier 1, KV shipped out."""
  p = workload.prompt_tokens
  whole = cost_model.prefill_time(hw, m, [p])
  per_layer = (whole - cost_model.head_time(hw, m, 1)) / m.num_layers
  work = {}
  layers = split_layers(m.num_layers, slices)
  for s, n in enumerate(layers):
    work[f"tier1[{s}]"] = n * per_layer + (cost_model.head_time(hw, m, 1) if s == slices - 1 else 0.0)
    if link:
      work[f"link_out[{s}]"] = n * p * cost_model.kv_bytes_per_token_layer(m, WIRE_BYTES) / link
  return work


def evaluate_two_tier(m: ModelConfig, tier1: HardwareProfile, tier2: HardwareProfile, network: Network,
                      workload: Workload, slices: int, nodes: int, batch: int, in_flight: int,
                      kv_itemsize: int = 4) -> Plan | None:
  """The plan's throughput and cost, or None when it does not fit in memory."""
  layers = split_layers(m.num_layers, slices)
  act = in_flight * batch * (m.hidden_size + (m.num_heads + 2 * m.num_kv_heads) * m.head_dim) * WIRE_BYTES
  t1_mem = _tier1_weight_bytes(m, slices) + act
  kv = in_flight * batch * workload.memory_context * max(layers) * cost_model.kv_bytes_per_token_layer(
      m, kv_itemsize)
  if t1_mem > tier1.usable_memory or kv > nodes * tier2.usable_memory:
    return None
  times = two_tier_times(m, tier1, tier2, network, batch, workload.mean_context, slices, nodes,
                         kv_itemsize=kv_itemsize, wire_itemsize=WIRE_BYTES)
  link = cost_model.link_bandwidth(tier1, tier2, nodes, network)
  rate, why = _rate(times, batch, in_flight, _prefill_work(m, tier1, workload, slices, link),
                    workload.output_tokens)
  cost = slices * (tier1.price_per_hour + nodes * tier2.price_per_hour)
  return Plan("two_tier", slices, nodes, batch, in_flight, rate, cost, why, t1_mem / 1e9, kv / 1e9,
              times.cycle())


def evaluate_paged(m: ModelConfig, hw: HardwareProfile, workload: Workload, slices: int, batch: int,
                   in_flight: int, kv_itemsize: int = 2) -> Plan | None:
  """Single-tier paged baseline: weights and KV share each accelerator's memory."""
  layers = split_layers(m.num_layers, slices)
  kv = in_flight * batch * workload.memory_context * max(layers) * cost_model.kv_bytes_per_token_layer(
      m, kv_itemsize)
  mem = _tier1_weight_bytes(m, slices) + kv
  if mem > hw.usable_memory:
    return None
  times = paged_times(m, hw, batch, workload.mean_context, slices, kv_itemsize)
  rate, why = _rate(times, batch, in_flight, _prefill_work(m, hw, workload, slices, None),
                    workload.output_tokens)
  return Plan("paged", slices, 0, batch, in_flight, rate, slices * hw.price_per_hour, why, mem / 1e9, 0.0,
              times.cycle())


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  batches: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
  depths: tuple[int, ...] = tuple(range(1, 257))
  tier2_nodes: tuple[int, ...] = tuple(range(1, 17))
  extra_slices: int = 10  # two-tier: try min_slices .. min_slices + extra_slices accelerators per copy
  paged_extra_slices: int = 1000  # paged: more accelerators buy KV memory; search up to a layer each


def search_two_tier(m, tier1, tier2, network, workload, space=SearchSpace(), kv_itemsize=4) -> list[Plan]:
  """The best depth of every (slices, tier-2 nodes, batch), most tokens per dollar first."""
  plans = []
  grid = itertools.product(_slice_range(m, tier1, space.extra_slices), space.tier2_nodes, space.batches)
  for slices, nodes, batch in grid:
    plan = _best_depth(lambda k: evaluate_two_tier(m, tier1, tier2, network, workload, slices, nodes, batch,
                                                   k, kv_itemsize), space.depths)
    if plan is not None:
      plans.append(plan)
  plans.sort(key=lambda p: -p.tokens_per_dollar)
  return plans


def _slice_range(m: ModelConfig, hw: HardwareProfile, extra: int) -> range:
  s0 = min_slices(m, hw)
  return range(s0, min(s0 + extra, m.num_layers) + 1)


def _best_depth(evaluate, depths) -> Plan | None:
  """Throughput grows with depth until memory runs out or a station saturates: the smallest depth
  reaching the deepest feasible plan's throughput (cost does not depend on depth)."""
  lo, hi = 0, len(depths)  # depths[:lo] feasible, depths[hi:] not
  while lo < hi:
    mid = (lo + hi) // 2
    if evaluate(depths[mid]) is None:
      hi = mid
    else:
      lo = mid + 1
  if lo == 0:
    return None
  target = evaluate(depths[lo - 1]).tokens_per_s * (1 - 1e-12)
  a, b = 0, lo - 1  # throughput does not fall with depth: bisect for the first reaching target
  while a < b:
    mid = (a + b) // 2
    if evaluate(depths[mid]).tokens_per_s >= target:
      b = mid
    else:
      a = mid + 1
  return evaluate(depths[a])


def search_paged(m, hw, workload, space=SearchSpace(), kv_itemsize=2) -> list[Plan]:
  """The best depth of every (slices, batch) of the paged baseline, most tokens per dollar first."""
  plans = []
  for slices, batch in itertools.product(_slice_range(m, hw, space.paged_extra_slices), space.batches):
    plan = _best_depth(lambda k: evaluate_paged(m, hw, workload, slices, batch, k, kv_itemsize), space.depths)
    if plan is not None:
      plans.append(plan)
  plans.sort(key=lambda p: -p.tokens_per_dollar)
  return plans


def best_throughput_at(plans: list[Plan], slices: int) -> Plan | None:
  """The fastest plan using exactly `slices` tier-1 accelerators (equal tier-1 hardware)."""
  same = [p for p in plans if p.slices == slices]
  return max(same, key=lambda p: p.tokens_per_s) if same else None


def latency_curve(m, tier1, tier2, plan: Plan, workload: Workload, one_way_delays_s, bandwidth_gbps=0.0,
                  space=SearchSpace(), kv_itemsize=4) -> list[dict]:
  """Throughput vs one-way delay: `plan` held fixed, and re-planned (best tokens/$) at each delay."""
  rows = []
  base = plan.tokens_per_s
  best0 = None
  for d in one_way_delays_s:
    net = Network(one_way_latency_s=d, bandwidth_gbps=bandwidth_gbps)
    fixed = evaluate_two_tier(m, tier1, tier2, net, workload, plan.slices, plan.tier2_nodes_per_slice,
                              plan.batch, plan.in_flight, kv_itemsize)
    replanned = search_two_tier(m, tier1, tier2, net, workload, space, kv_itemsize)[0]
    best0 = best0 or replanned
    rows.append(dict(one_way_delay_s=d, fixed_tokens_per_s=fixed.tokens_per_s,
                     fixed_relative=fixed.tokens_per_s / base,
                     replanned_tokens_per_dollar=replanned.tokens_per_dollar,
                     replanned_relative=replanned.tokens_per_dollar / best0.tokens_per_dollar,
                     replanned_in_flight=replanned.in_flight, replanned_batch=replanned.batch,
                     replanned_tier2_nodes=replanned.tier2_nodes_per_slice))
  return rows


def simulated_rate(m, tier1, tier2, network, workload, plan: Plan, kv_itemsize=4, tokens_per_batch=8) -> float:
  """The plan's output tokens/s from the discrete-event pipeline (queueing between micro-batches
  included), scaled by the closed form's prefill share, which the event model does not run."""
  if plan.system == "two_tier":
    times = two_tier_times(m, tier1, tier2, network, plan.batch, workload.mean_context, plan.slices,
                           plan.tier2_nodes_per_slice, kv_itemsize=kv_itemsize, wire_itemsize=WIRE_BYTES)
  else:
    times = paged_times(m, tier1, plan.batch, workload.mean_context, plan.slices, kv_itemsize)
  decode_only = plan.batch * times.throughput(plan.in_flight)
  des = plan.batch * simulate(times, plan.in_flight, tokens=tokens_per_batch * plan.in_flight).throughput
  return des * plan.tokens_per_s / decode_only


def settle(m, tier1, tier2, network, workload, plan: Plan, kv_itemsize=4, target=0.98,
           max_depth=256) -> tuple[Plan, float]:
  """Deepens `plan` until the event model reaches `target` of the closed form (or memory runs out);
  the closed form's knee is optimistic because micro-batches queue behind each other near it.
  Returns the plan and its simulated tokens/s."""
  evaluate = ((lambda k: evaluate_two_tier(m, tier1, tier2, network, workload, plan.slices,
                                           plan.tier2_nodes_per_slice, plan.batch, k, kv_itemsize))
              if plan.system == "two_tier" else
              (lambda k: evaluate_paged(m, tier1, workload, plan.slices, plan.batch, k, kv_itemsize)))
  best = (plan, simulated_rate(m, tier1, tier2, network, workload, plan, kv_itemsize))
  k = plan.in_flight
  while best[1] < target * best[0].tokens_per_s:
    k = max(k + 1, int(k * 1.15))
    deeper = evaluate(k) if k <= max_depth else None
    if deeper is None:
      break
    best = (deeper, simulated_rate(m, tier1, tier2, network, workload, deeper, kv_itemsize))
  return best


def best_simulated(m, tier1, tier2, network, workload, plans: list[Plan], kv_itemsize=4,
                   top=8) -> tuple[Plan, float]:
  """Settles the `top` closed-form plans in the event model; the most simulated tokens per dollar."""
  settled = [settle(m, tier1, tier2, network, workload, p, kv_itemsize) for p in plans[:top]]
  return max(settled, key=lambda pr: pr[1] / pr[0].cost_per_hour)
