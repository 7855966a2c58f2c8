"""Splitwise cluster: prompt, token and mixed machine pools behind one router, driven by a trace.

Router (at arrival, as in Splitwise): the prompt machine is the prefill-capable one (prefill or
mixed pool) with the fewest pending prompt tokens; a prompt done on a mixed machine decodes there,
otherwise the token machine is the decode-capable one with the least KV reserved. A request whose
KV does not fit yet waits in its token machine's queue: nothing is dropped.

Machines run iterations back to back. Prefill machines batch whole prompts up to a token budget
and ship the KV layer by layer while computing, so only the part of the transfer that outlasts the
prefill, or at least the last layer's share, delays the first decode step. Decode machines run
one token for every admitted sequence. Mixed machines run prompts and decode tokens in one
iteration (the unsplit baseline). KV is reserved for prompt + output tokens on admission.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from models.model_config import ModelConfig
from glinthawk_jax.sim import cost_model
from glinthawk_jax.sim.events import EventLoop
from glinthawk_jax.sim.profiles import HardwareProfile
from glinthawk_jax.sim.traces import Request

ROLES = ("prefill", "decode", "mixed")


@dataclasses.dataclass
class _Seq:
  req: Request
  index: int
  token_machine: "_Machine | None" = None
  first_token_s: float = -1.0
  token_times: list = dataclasses.field(default_factory=list)
  generated: int = 0

  @property
  def context(self) -> int:
    return self.req.prompt_tokens + self.generated

  @property
  def reserve(self) -> int:
    return self.req.prompt_tokens + self.req.output_tokens


class _Machine:

  def __init__(self, cluster: "Cluster", role: str, index: int):
    self.cluster, self.role, self.index = cluster, role, index
    self.prompts: collections.deque[_Seq] = collections.deque()  # waiting for prefill here
    self.pending_prompt_tokens = 0  # queued or in progress: the router's join-shortest-queue key
    self.admit: collections.deque[_Seq] = collections.deque()  # prefilled, waiting for KV room
    self.running: list[_Seq] = []
    self.kv_reserved = 0  # tokens, including sequences routed here and not yet admitted
    self.kv_in_use = 0  # tokens of admitted sequences
    self.peak_kv = 0
    self.busy = False
    self.busy_time = 0.0

  def kick(self) -> None:
    if not self.busy:
      self._iterate()

  def _iterate(self) -> None:
    c = self.cluster
    prompts = self._take_prompts() if self.role in ("prefill", "mixed") else []
    if self.role in ("decode", "mixed"):
      self._admit()
    decoding = list(self.running) if self.role != "prefill" else []
    if not prompts and not decoding:
      return
    lengths = [s.req.prompt_tokens for s in prompts]
    contexts = [s.context for s in decoding]
    pairs = sum(p * (p + 1) / 2 for p in lengths) + sum(contexts)
    duration = cost_model.iteration_time(c.hw, c.model, sum(lengths) + len(contexts), pairs,
                                         sum(lengths) + sum(contexts), len(prompts) + len(decoding))
    self.busy = True
    self.busy_time += duration
    c.loop.after(duration, self._done, prompts, decoding, duration)

  def _take_prompts(self) -> list[_Seq]:
    taken, tokens = [], 0
    while self.prompts:
      s = self.prompts[0]
      if taken and tokens + s.req.prompt_tokens > self.cluster.max_prefill_tokens:
        break
      if self.role == "mixed" and not self._fits(s):
        break
      self.prompts.popleft()
      if self.role == "mixed":
        self._hold(s)
      taken.append(s)
      tokens += s.req.prompt_tokens
    return taken

  def _fits(self, s: _Seq) -> bool:
    return self.kv_in_use + s.reserve <= self.cluster.kv_capacity_tokens

  def _hold(self, s: _Seq) -> None:
    self.kv_in_use += s.reserve
    self.peak_kv = max(self.peak_kv, self.kv_in_use)

  def _admit(self) -> None:
    while self.admit and self._fits(self.admit[0]):
      s = self.admit.popleft()
      self._hold(s)
      self.running.append(s)

  def _done(self, prompts: list[_Seq], decoding: list[_Seq], duration: float) -> None:
    c = self.cluster
    now = c.loop.now
    self.busy = False
    for s in decoding:
      s.generated += 1
      s.token_times.append(now)
      if s.generated >= s.req.output_tokens:
        self._finish(s)
    for s in prompts:
      self.pending_prompt_tokens -= s.req.prompt_tokens
      s.first_token_s = now
      s.token_times.append(now)
      s.generated = 1
      if s.generated >= s.req.output_tokens:
        if self.role == "mixed":
          self._finish(s)
        else:
          s.token_machine.kv_reserved -= s.reserve
          c.finished.append(s)
          s.token_machine.kick()
      elif self.role == "mixed":
        self.running.append(s)
      else:
        c.loop.after(c.kv_transfer_delay(s.req.prompt_tokens, duration), s.token_machine.receive, s)
    self.kick()

  def _finish(self, s: _Seq) -> None:
    self.running.remove(s)
    self.kv_in_use -= s.reserve
    self.kv_reserved -= s.reserve
    self.cluster.finished.append(s)

  def receive(self, s: _Seq) -> None:
    self.admit.append(s)
    self.kick()


@dataclasses.dataclass
class ClusterResult:
  requests: int
  output_tokens: int
  makespan_s: float
  throughput: float  # output tokens per second over the makespan
  ttft: dict  # p50/p90/p99 seconds
  tbt: dict
  e2e: dict
  peak_kv_gb: dict  # role -> largest peak KV of a machine of that role
  utilization: dict  # role -> mean busy share
  cost_per_hour: float
  cost_per_million_tokens: float

  def meets(self, ttft_p99_s: float, tbt_p99_s: float) -> bool:
    return self.ttft["p99"] <= ttft_p99_s and self.tbt["p99"] <= tbt_p99_s


class Cluster:
  """`pools` maps role -> machine count; all machines are `hw` running `model` on their own."""

  def __init__(self, model: ModelConfig, hw: HardwareProfile, pools: dict[str, int],
               max_prefill_tokens: int = 8192, kv_itemsize: int = 2):
    for role, n in pools.items():
      if role not in ROLES or n < 0:
        raise ValueError(f"pools[{role!r}]={n}: roles are {ROLES}, counts >= 0")
    prefill_capable = pools.get("prefill", 0) + pools.get("mixed", 0)
    decode_capable = pools.get("decode", 0) + pools.get("mixed", 0)
    if not prefill_capable or not decode_capable:
      raise ValueError(f"pools={pools}: need a prefill or mixed machine and a decode or mixed machine")
    self.model, self.hw, self.pools = model, hw, dict(pools)
    self.max_prefill_tokens = max_prefill_tokens
    self.kv_itemsize = kv_itemsize
    weights = model.param_count() * cost_model.WEIGHT_BYTES
    self.kv_token_bytes = model.num_layers * cost_model.kv_bytes_per_token_layer(model, kv_itemsize)
    self.kv_capacity_tokens = int((hw.usable_memory - weights) // self.kv_token_bytes)
    if self.kv_capacity_tokens <= 0:
      raise ValueError(f"{hw.name}: {hw.usable_memory / 1e9:.0f} GB usable does not hold the weights "
                       f"({weights / 1e9:.0f} GB)")
    self.loop = EventLoop()
    self.machines = [_Machine(self, role, i) for role in ROLES for i in range(pools.get(role, 0))]
    self.finished: list[_Seq] = []

  @property
  def cost_per_hour(self) -> float:
    return len(self.machines) * self.hw.price_per_hour

  def kv_transfer_delay(self, prompt_tokens: int, prefill_s: float) -> float:
    """Layer-wise shipping overlaps the prefill: what is left after it, at least one layer's share."""
    total = prompt_tokens * self.kv_token_bytes / self.hw.network
    return max(total - prefill_s, total / self.model.num_layers)

  def _route(self, s: _Seq) -> None:
    if s.reserve > self.kv_capacity_tokens:
      raise ValueError(f"request {s.index}: {s.reserve} tokens of KV exceed a machine's "
                       f"{self.kv_capacity_tokens}")
    prompt_m = min((m for m in self.machines if m.role in ("prefill", "mixed")),
                   key=lambda m: (m.pending_prompt_tokens, m.index))
    if prompt_m.role == "mixed":
      token_m = prompt_m
    else:
      token_m = min((m for m in self.machines if m.role in ("decode", "mixed")),
                    key=lambda m: (m.kv_reserved, m.index))
    s.token_machine = token_m
    token_m.kv_reserved += s.reserve
    prompt_m.pending_prompt_tokens += s.req.prompt_tokens
    prompt_m.prompts.append(s)
    prompt_m.kick()

  def run(self, requests: list[Request]) -> ClusterResult:
    seqs = [_Seq(r, i) for i, r in enumerate(requests)]
    for s in seqs:
      self.loop.at(s.req.arrival_s, self._route, s)
    self.loop.run()
    if len(self.finished) != len(seqs):
      raise RuntimeError(f"simulation ended with {len(seqs) - len(self.finished)} of {len(seqs)} "
                         "requests unfinished")
    return self._result(seqs)

  def _result(self, seqs: list[_Seq]) -> ClusterResult:
    start = min(s.req.arrival_s for s in seqs)
    makespan = max(s.token_times[-1] for s in seqs) - start
    tokens = sum(s.generated for s in seqs)
    ttft = [s.first_token_s - s.req.arrival_s for s in seqs]
    e2e = [s.token_times[-1] - s.req.arrival_s for s in seqs]
    tbt = np.concatenate([np.diff(s.token_times) for s in seqs]) if tokens > len(seqs) else np.zeros(1)
    peak, util = {}, {}
    for role in ROLES:
      ms = [m for m in self.machines if m.role == role]
      if ms:
        peak[role] = max(m.peak_kv for m in ms) * self.kv_token_bytes / 1e9
        util[role] = float(np.mean([m.busy_time for m in ms])) / makespan
    cost = self.cost_per_hour * makespan / 3600
    return ClusterResult(len(seqs), tokens, makespan, tokens / makespan, _percentiles(ttft),
                         _percentiles(tbt), _percentiles(e2e), peak, util, self.cost_per_hour,
                         cost / tokens * 1e6)


def _percentiles(x) -> dict:
  x = np.asarray(x, dtype=float)
  return {f"p{q}": float(np.percentile(x, q)) for q in (50, 90, 99)}


def equal_cost_ratio(throughput_a: float, cost_per_hour_a: float, throughput_b: float,
                     cost_per_hour_b: float) -> float:
  """How much more throughput A gives than B for the same money: (T_a / C_a) / (T_b / C_b)."""
  return (throughput_a / cost_per_hour_a) / (throughput_b / cost_per_hour_b)


def max_rate_under_slo(model, hw, pools, requests, ttft_p99_s, tbt_p99_s, lo=0.1, hi=1000.0,
                       iterations=12, **kwargs) -> tuple[float, ClusterResult | None]:
  """Highest arrival rate (requests/s, trace rescaled) whose run meets both SLOs (bisection on log scale)."""
  from glinthawk_jax.sim.traces import rescale
  best = (0.0, None)
  for _ in range(iterations):
    mid = (lo * hi) ** 0.5
    result = Cluster(model, hw, pools, **kwargs).run(rescale(requests, mid))
    if result.meets(ttft_p99_s, tbt_p99_s):
      best, lo = (mid, result), mid
    else:
      hi = mid
  return best


def plan_split(model, hw, requests, machines: int, ttft_p99_s: float, tbt_p99_s: float,
               iterations: int = 10, **kwargs) -> list[dict]:
  """Every prefill:decode split of `machines` (and the all-mixed, unsplit cluster), each at the
  highest trace rate meeting the SLOs. All have the same machines, hence the same cost."""
  layouts = [{"mixed": machines}] + [{"prefill": p, "decode": machines - p} for p in range(1, machines)]
  mean_output = float(np.mean([r.output_tokens for r in requests]))
  rows = []
  for pools in layouts:
    rate, result = max_rate_under_slo(model, hw, pools, requests, ttft_p99_s, tbt_p99_s,
                                      iterations=iterations, **kwargs)
    # Goodput: the output rate the cluster sustains within SLO (arrival rate x mean output); the
    # run's own tokens/makespan also counts the drain after the last arrival.
    rows.append(dict(pools=pools, rate=rate, result=result, goodput=rate * mean_output))
  return rows
