"""Two-tier pipeline (Glinthawk): closed-form throughput and a discrete-event model that checks it.

Tier 1 is `slices` accelerators, each holding a contiguous run of layers. Per layer a micro-batch
does: tier-1 dense work -> link out (transmission) -> propagation -> tier-2 attention (the slice's
tier-2 nodes, KV sharded by sequence) -> link back -> propagation. After the last layer, the last
slice runs the LM head and the micro-batch starts its next token. Every station serves the
furthest-along micro-batch first.

With k identical micro-batches and deterministic times the network is a closed cyclic one, whose
throughput (micro-batch tokens per second) is min(k / cycle, 1 / bottleneck): `cycle` is one
micro-batch's time around the loop alone, `bottleneck` the busiest station's work per token.

`makespan(..., shards=...)` instead gives each micro-batch its own tier-2 fan-out: the request goes to
the shards holding its sequences (one station each, shared by the micro-batches that use it) and
returns when the slowest shard has replied, as the pipelined runner's requests do.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.model_config import ModelConfig
from glinthawk_jax.sim import cost_model
from glinthawk_jax.sim.events import EventLoop, Station
from glinthawk_jax.sim.profiles import HardwareProfile, Network


@dataclasses.dataclass(frozen=True)
class PipelineTimes:
  """Per micro-batch, per layer stage times in seconds."""

  layers_per_slice: tuple[int, ...]
  tier1: float
  link_out: float = 0.0
  tier2: float = 0.0
  link_back: float = 0.0
  propagation: float = 0.0  # one way: pure delay (network, RPC stack latency, injected delay)
  head: float = 0.0  # LM head after the last layer, on the last slice
  host: float = 0.0  # tier-1 host work per layer besides `tier1` (e.g. the RPC send), on its station

  @property
  def num_layers(self) -> int:
    return sum(self.layers_per_slice)

  def cycle(self) -> float:
    """One micro-batch's time per token with nothing else in flight."""
    per_layer = self.tier1 + self.host + self.link_out + self.tier2 + self.link_back + 2 * self.propagation
    return self.num_layers * per_layer + self.head

  def station_work(self) -> dict[str, float]:
    """Seconds of work each station does per micro-batch token."""
    work = {}
    last = len(self.layers_per_slice) - 1
    for s, n in enumerate(self.layers_per_slice):
      work[f"tier1[{s}]"] = n * (self.tier1 + self.host) + (self.head if s == last else 0.0)
      work[f"link_out[{s}]"] = n * self.link_out
      work[f"tier2[{s}]"] = n * self.tier2
      work[f"link_back[{s}]"] = n * self.link_back
    return work

  def bottleneck(self) -> float:
    return max(self.station_work().values())

  def throughput(self, in_flight: int) -> float:
    """Micro-batch tokens per second with `in_flight` micro-batches: min(k/cycle, 1/bottleneck)."""
    return min(in_flight / self.cycle(), 1.0 / self.bottleneck())

  def depth_to_saturate(self) -> float:
    """In-flight micro-batches at which the bottleneck saturates: cycle / bottleneck."""
    return self.cycle() / self.bottleneck()


def split_layers(num_layers: int, slices: int) -> tuple[int, ...]:
  """Contiguous layer counts per slice, as even as possible (larger slices first)."""
  if not 1 <= slices <= num_layers:
    raise ValueError(f"slices={slices}: expected 1..{num_layers}")
  base, extra = divmod(num_layers, slices)
  return tuple(base + (1 if s < extra else 0) for s in range(slices))


def two_tier_times(m: ModelConfig, tier1: HardwareProfile, tier2: HardwareProfile, network: Network,
                   batch: int, context: float, slices: int, tier2_nodes: int, kv_itemsize: int = 4,
                   wire_itemsize: int = 2) -> PipelineTimes:
  """Stage times of a micro-batch of `batch` sequences at mean `context`; `tier2_nodes` per slice."""
  out_bytes, back_bytes = cost_model.wire_bytes_per_token_layer(m, wire_itemsize)
  link = cost_model.link_bandwidth(tier1, tier2, tier2_nodes, network)
  return PipelineTimes(
      layers_per_slice=split_layers(m.num_layers, slices),
      tier1=cost_model.tier1_layer_time(tier1, m, batch),
      link_out=batch * out_bytes / link,
      tier2=cost_model.tier2_layer_time(tier2, m, batch, context, tier2_nodes, kv_itemsize),
      link_back=batch * back_bytes / link,
      propagation=network.one_way_latency_s,
      head=cost_model.head_time(tier1, m, batch))


def paged_times(m: ModelConfig, hw: HardwareProfile, batch: int, context: float, slices: int,
                kv_itemsize: int = 2) -> PipelineTimes:
  """Single-tier paged baseline: each slice reads its layers' weights and the batch's KV itself."""
  p = cost_model.layer_params(m)
  kv = batch * context * cost_model.kv_bytes_per_token_layer(m, kv_itemsize)
  flops = 2 * p * batch + cost_model.attention_flops(m, batch * context)
  t = cost_model.roofline(hw, p * cost_model.WEIGHT_BYTES + kv, flops) + hw.step_overhead_s
  return PipelineTimes(layers_per_slice=split_layers(m.num_layers, slices), tier1=t,
                       head=cost_model.head_time(hw, m, batch))


@dataclasses.dataclass(frozen=True)
class ShardPart:
  """A micro-batch's share of a tier-2 request on one shard."""

  shard: int
  service: float  # seconds of that shard's station
  one_way: float  # pure delay each way (RPC latency, injected delay)


@dataclasses.dataclass
class SimResult:
  throughput: float  # micro-batch tokens per second in steady state
  completions: np.ndarray  # times at which micro-batches finished a token, sorted
  utilization: dict[str, float]  # busy share of each station over the run


def simulate(times: PipelineTimes, in_flight: int, tokens: int = 0, stagger: bool = True) -> SimResult:
  """Runs `in_flight` micro-batches round the pipeline until they have made `tokens` micro-batch
  tokens in total (default: 20 per micro-batch); steady-state throughput from the second half.

  `stagger` starts micro-batch j at j * cycle / k, as an engine admitting work over time would;
  started together, deterministic micro-batches stay in a convoy and queue behind each other.
  """
  tokens = tokens or 20 * in_flight
  starts = [mb * times.cycle() / in_flight if stagger else 0.0 for mb in range(in_flight)]
  loop, stations, done = _run(times, starts, steps=0, stop=lambda done: len(done) >= tokens)
  completions = np.asarray(done)
  # A whole number of rounds of k completions from the second half: steady state, no start-up.
  rounds = max(1, (len(completions) // 2) // in_flight)
  window = rounds * in_flight
  span = completions[-1] - completions[-1 - window]
  util = {name: st.busy_time / loop.now for name, st in stations.items()}
  return SimResult(throughput=window / span, completions=completions, utilization=util)


def makespan(times: PipelineTimes, in_flight: int, steps: int,
             shards: list[list[ShardPart]] | None = None) -> float:
  """Seconds until `in_flight` micro-batches, all ready at time 0, have each made `steps` tokens (one
  fused decode call of the pipelined runner: the micro-batches start together and the call ends
  with the last). `shards[j]`: micro-batch j's tier-2 parts, replacing times.tier2 and
  times.propagation (None: one tier-2 station per slice)."""
  if shards is not None and len(shards) != in_flight:
    raise ValueError(f"shards: {len(shards)} micro-batches' parts, expected in_flight={in_flight}")
  loop, _, _ = _run(times, [0.0] * in_flight, steps=steps, stop=lambda done: False, shards=shards)
  return loop.now


def _run(times: PipelineTimes, starts: list[float], steps: int, stop, shards=None):
  """The event model: micro-batch j enters at starts[j]; each stops after `steps` tokens (0 = never);
  runs until `stop(done)` or no event is left; `shards` as makespan's. Returns (loop, stations,
  token completion times)."""
  loop = EventLoop()
  n_slices = len(times.layers_per_slice)
  slice_of = np.repeat(np.arange(n_slices), times.layers_per_slice)
  stations = {}
  for s in range(n_slices):
    for kind in ("tier1", "link_out", "tier2", "link_back"):
      stations[f"{kind}[{s}]"] = Station(loop, f"{kind}[{s}]")
  num_layers = times.num_layers
  done: list[float] = []

  def priority(step, layer):
    return -(step * (num_layers + 1) + layer)  # furthest along first

  def to_tier1(mb, step, layer):
    s = slice_of[layer]
    stations[f"tier1[{s}]"].submit(times.tier1 + times.host, to_link_out, mb, step, layer,
                                   priority=priority(step, layer))

  def to_link_out(mb, step, layer):
    s = slice_of[layer]
    then = (propagate, to_tier2) if shards is None else (fan_out,)
    stations[f"link_out[{s}]"].submit(times.link_out, *then, mb, step, layer, priority=priority(step, layer))

  def propagate(then, mb, step, layer):
    loop.after(times.propagation, then, mb, step, layer)

  def to_tier2(mb, step, layer):
    s = slice_of[layer]
    stations[f"tier2[{s}]"].submit(times.tier2, to_link_back, mb, step, layer,
                                   priority=priority(step, layer))

  def fan_out(mb, step, layer):  # after link_out: each shard part, back when the last has replied
    waiting = [len(shards[mb])]

    def replied():
      waiting[0] -= 1
      if not waiting[0]:
        to_link_back(mb, step, layer)

    for part in shards[mb]:
      name = f"tier2[{slice_of[layer]}].{part.shard}"
      station = stations.setdefault(name, Station(loop, name))

      def arrive(part=part, station=station):
        station.submit(part.service, loop.after, part.one_way, replied, priority=priority(step, layer))

      loop.after(part.one_way, arrive)

  def to_link_back(mb, step, layer):
    s = slice_of[layer]
    then = (propagate, next_layer) if shards is None else (next_layer,)  # shard parts paid their way back
    stations[f"link_back[{s}]"].submit(times.link_back, *then, mb, step, layer, priority=priority(step, layer))

  def next_layer(mb, step, layer):
    if layer + 1 < num_layers:
      to_tier1(mb, step, layer + 1)
    elif times.head > 0:
      stations[f"tier1[{n_slices - 1}]"].submit(times.head, token_done, mb, step,
                                                priority=priority(step, num_layers))
    else:
      token_done(mb, step)

  def token_done(mb, step):
    done.append(loop.now)
    if not steps or step + 1 < steps:
      to_tier1(mb, step + 1, 0)

  for mb, start in enumerate(starts):
    loop.at(start, to_tier1, mb, 0, 0)
  loop.run(stop=lambda: stop(done))
  return loop, stations, done
