"""Predicts one pipelined two-tier generation run (Engine.generate, placement pipelined) from the
stage times a measured profile holds (measurements["two_tier"], glinthawk_jax/sim/measure.py).

The run is modelled as PipelinedRunner executes it:
  - prefill: prompts (all but their last token) in chunks that fit engine.max_prefill_tokens; a
    chunk is a flow shop over the layers with three resources working at once: the accelerator
    (bulk step of layer L + 1 and the gather of its real tokens, then the device-to-host copy of
    their K, V), the host thread (sending layer L's append) and the tier-2 shards (storing appends, each its
    share of the chunk's sequences); the chunk ends when the last append is stored;
  - decode: ceil(output / decode_steps) fused calls; in each, the batch is split into micro-batches
    as PipelinedRunner._split does, rows ordered by shard as _by_shard does, and the event model
    (two_tier.makespan) runs them together for decode_steps tokens: per layer the tier-1 station
    (runner step + the host's work per round trip), then the request fans out to the shards holding
    the micro-batch's rows, each shard a station of its own (one request at a time, as the server's
    lock serves them) with its pure RPC latency + injected delay each way; a call takes at least its
    CPU work (tier 1's per round trip, the servers' per shard call) over the host's free cores, when
    the profile measured them (tier 1 and the servers share those cores: cpu_time);
  - control RPCs: one allocation per prefill chunk, one release per sequence at its end.
Tier-2 work per shard is a line in the KV tokens the shard reads per request (rows on it x context).
Not modelled: how CPU contention stretches the latency path (bound and event model are a max), CPU
per round trip falling with depth (measured at depth 1: threads woken from idle cost more), Python
scheduling between calls, prompts longer than a prefill chunk, sequences finishing at different
steps, the host's per-shard send cost (profiled at the profile's fan-out).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glinthawk_jax.placements.shard_order import interleaved
from glinthawk_jax.sim.two_tier import PipelineTimes, ShardPart, makespan

MIN_PREFILL_TOKENS = 16  # glinthawk_jax/scheduler.py


def pow2_at_least(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class RunShape:
  """One Engine.generate call: `batch` prompts of `prompt_len` tokens, `output_len` new tokens each."""

  batch: int
  prompt_len: int
  output_len: int
  in_flight: int  # tier2.in_flight (micro-batches), >= 1
  delay_ms: float = 0.0  # tier2.inject_delay_ms
  decode_steps: int = 4  # engine.decode_steps_per_call
  max_prefill_tokens: int = 256  # engine.max_prefill_tokens
  max_num_seqs: int = 0  # engine.max_num_seqs (0 = batch)
  shards: int = 1  # tier-2 servers (tier2.spawn)
  split: str = "shards"  # tier2.split: micro-batches grouped by shard, or "spread" over all of them


def _interp(table: list[dict], key: str, x: float, by: str) -> float:
  """Linear interpolation of table[key] in table[by] (clamped at the ends)."""
  rows = sorted(table, key=lambda r: r[by])
  return float(np.interp(x, [r[by] for r in rows], [r[key] for r in rows]))


def _line(xs, ys, slope: float | None = None) -> tuple[float, float]:
  """(slope, intercept) of the least-squares line through (xs, ys); with one distinct x, through its
  mean with `slope` (flat if None). Timings are noisy: a line, not point-to-point interpolation."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  if len(set(xs.tolist())) > 1:
    a, b = np.polyfit(xs, ys, 1)
    return float(a), float(b)
  a = slope or 0.0
  return a, float(np.mean(ys) - a * np.mean(xs))


def tier2_lookup(table: list[dict], key: str, rows: float, context: float) -> float:
  """table[key] at (rows, context): a least-squares line in context for each measured row count
  (timings are noisy; tier-2 work grows linearly with context), then linear in rows."""
  by_rows = sorted({r["rows"] for r in table})
  values = []
  for n in by_rows:
    xs, ys = zip(*((r["context"], r[key]) for r in table if r["rows"] == n))
    a, b = _line(xs, ys)
    values.append(max(a * context + b, 0.0))
  return float(np.interp(rows, by_rows, values))


def micro_batches(real: int, in_flight: int) -> tuple[int, int]:
  """(micro-batches, real rows of each, the last may have fewer) for `real` sequences at depth
  `in_flight`, as PipelinedRunner._split; tier 1 runs each padded to pow2_at_least(rows)."""
  parts = min(max(in_flight, 1), max(real, 1))
  size = math.ceil(real / parts)
  return math.ceil(real / size), size


def shard_rows(batch: int, shards: int) -> list[int]:
  """Sequences on each tier-2 shard: Tier2Client.allocate puts each on the shard with the most free
  KV (counting the ones it just placed), which spreads a batch evenly."""
  return [batch // shards + (s < batch % shards) for s in range(shards)]


def micro_batch_shards(batch: int, shards: int, in_flight: int, spread: bool = False) -> list[dict[int, int]]:
  """{shard: rows} of each micro-batch: the runner orders rows by shard (_by_shard), then cuts
  contiguous micro-batches (_split), so a micro-batch talks to as few shards as it can; with `spread`
  (tier2.split "spread") the shards take turns in the order, so each micro-batch reaches all of them."""
  k, size = micro_batches(batch, in_flight)
  owner = np.repeat(np.arange(shards), shard_rows(batch, shards))
  if spread:
    owner = owner[interleaved(owner)]
  return [dict(zip(*(a.tolist() for a in np.unique(owner[j * size:(j + 1) * size], return_counts=True))))
          for j in range(k)]


def _fanout(row: dict, shards: int) -> int:
  """Shards a profiled request of row["rows"] sequences reached (spread evenly, as the engine does)."""
  return row.get("fanout") or max(min(row["rows"], shards), 1)


class Tier2Shard:
  """One tier-2 shard's costs as lines in x = KV tokens it reads per request (its rows x context).

  `wait(x)`: a request's round trip as the runner waits for it with nothing else in flight, from the
  runner's depth-1 runs (meas["runner"]; each run's rows spread over the profile's shards); without
  them, the RPC table's round trip less the client's send (paid on tier 1's station).
  `service(x)`: the shard's own work, from requests queued at shards (meas["shard_rpc"]: all rows on
  one shard, every shard busy at once; else the RPC table's spacing), at most wait(x). The rest of
  the wait is pure latency, half each way."""

  def __init__(self, meas: dict, shards: int):
    shards = meas.get("shards", shards)
    table = meas.get("shard_rpc") or meas["rpc"]
    per = [(r["rows"] / _fanout(r, shards) * r["context"], r) for r in table]
    self.service_line = _line([x for x, _ in per], [r["service_s"] for _, r in per])
    if "runner" in meas:
      xs = [r["rows"] / _fanout(r, shards) * r["context"] for r in meas["runner"]]
      self.wait_line = _line(xs, [r["remote_s"] for r in meas["runner"]], slope=self.service_line[0])
    else:
      self.wait_line = _line([x for x, _ in per], [r["rtt_s"] - r["send_s"] for _, r in per])

  def wait(self, x: float) -> float:
    return max(self.wait_line[0] * x + self.wait_line[1], 0.0)

  def service(self, x: float) -> float:
    return min(max(self.service_line[0] * x + self.service_line[1], 0.0), self.wait(x))

  def part(self, shard: int, rows: int, context: float, delay_s: float) -> ShardPart:
    x = rows * context
    return ShardPart(shard, self.service(x), (self.wait(x) - self.service(x) + delay_s) / 2)


def decode_times(meas: dict, num_layers: int, rows: int, context: float) -> PipelineTimes:
  """Per-layer tier-1 times of a decode micro-batch of `rows` (tier 2 comes from Tier2Shard).

  With the runner's measured costs (meas["runner"], depth-1 runs): tier-1 station = runner step +
  the runner's host work per round trip, L + 1 steps a token. Without them: the isolated step and
  the RPC send on the host, the first and last steps as the head."""
  if "runner" in meas:
    run = meas["runner"]
    step, host = _interp(run, "step_s", rows, "rows"), _interp(run, "host_s", rows, "rows")
    return PipelineTimes(layers_per_slice=(num_layers,), tier1=step, host=host, head=step)
  t1 = meas["tier1_step"]
  send = tier2_lookup(meas["rpc"], "send_s", rows, context)
  step = _interp(t1, "step_s", rows, "rows")
  ends = _interp(t1, "first_s", rows, "rows") + _interp(t1, "last_s", rows, "rows")
  return PipelineTimes(layers_per_slice=(num_layers,), tier1=step, host=send,
                       head=ends - step)  # L middles stand for L - 1 middles + first + last


def cpu_time(meas: dict, num_layers: int, rows: int, parts: list[dict[int, int]], decode_steps: int) -> float:
  """Seconds the host's free cores need for one decode call's CPU work, when tier 1 and the tier-2 servers
  share them (0 without the runner's CPU measurements): per round trip tier 1's CPU (at the micro-batch's
  `rows`) plus the servers' CPU per shard call for each shard the micro-batch reaches (`parts`), over the
  cores the profile found free. Every shard a micro-batch spans costs a server call, however few rows."""
  run = meas.get("runner", [])
  if not run or not all("cpu_s" in r for r in run):
    return 0.0
  tier1, server = _interp(run, "cpu_s", rows, "rows"), _interp(run, "server_cpu_s", rows, "rows")
  work = sum(decode_steps * num_layers * (tier1 + server * len(mb)) for mb in parts)
  return work / max(_interp(run, "cores", rows, "rows"), 1e-3)


def decode_call_time(meas: dict, num_layers: int, run: RunShape, context: float) -> float:
  """One fused decode call of `run.decode_steps` tokens at mean tier-2 `context`: the event model's
  makespan, or the host's CPU time for the call's work when that is longer (CPU-bound)."""
  parts = micro_batch_shards(run.batch, run.shards, run.in_flight, run.split == "spread")
  rows = micro_batches(run.batch, run.in_flight)[1]
  times = decode_times(meas, num_layers, rows, context)
  tier2 = Tier2Shard(meas, run.shards)
  shards = [[tier2.part(s, n, context, run.delay_ms / 1e3) for s, n in mb.items()] for mb in parts]
  return max(makespan(times, len(parts), run.decode_steps, shards=shards),
             cpu_time(meas, num_layers, rows, parts, run.decode_steps))


def _bulk_row(meas: dict, rows: int, tokens: int) -> dict:
  """The bulk prefill step row nearest the chunk (interpolated in rows x tokens for every field)."""
  bulk = [dict(r, size=r["rows"] * r["tokens"]) for r in meas["bulk_step"]]
  bulk = [r for r in bulk if r["tokens"] == tokens] or bulk
  return {k: _interp(bulk, k, rows * tokens, "size") for k in bulk[0] if all(k in r for r in bulk)}


def prefill_chunk_time(meas: dict, num_layers: int, rows: int, tokens: int, real_tokens: int,
                       delay_s: float) -> float:
  """One bulk prefill chunk as PipelinedRunner._bulk_prefill runs it. Per layer the host dispatches
  the layer's bulk step, then waits for the previous layer's K, V on the host, gathers its real
  tokens and sends the append; meanwhile the device computes (compute_s) and copies K, V to the host
  (copy_s, its own stream) and the shards store earlier appends (each its share; the shards work
  in parallel, so one station of the per-shard service). A profile without the split has step_s as
  compute and no gather (measured before 2026-11-30)."""
  b = _bulk_row(meas, rows, tokens)
  dispatch, compute, copy = (b["dispatch_s"], b["compute_s"], b["copy_s"]) if "compute_s" in b else (
      0.0, b["step_s"], 0.0)
  host_work = b.get("gather_s", 0.0) + _interp(meas["append"], "send_s", real_tokens, "tokens")
  service = _interp(meas["append"], "service_s", real_tokens, "tokens")
  rtt = _interp(meas["append"], "rtt_s", real_tokens, "tokens")
  one_way = (max(rtt - _interp(meas["append"], "send_s", real_tokens, "tokens") - service, 0.0) + delay_s) / 2
  host = computed = copied = stored = 0.0

  def send(ready: float) -> None:  # the host sends an append whose K, V reached the host at `ready`
    nonlocal host, stored
    host = max(host, ready) + host_work
    stored = max(stored, host + one_way) + service

  previous = 0.0  # when the previous layer's K, V are on the host
  for layer in range(num_layers):
    host += dispatch
    computed = max(computed, host) + compute
    copied = max(copied, computed) + copy
    if layer:
      send(previous)
    previous = copied
  send(previous)
  return max(host, stored + one_way)


def prefill_chunk(run: RunShape) -> tuple[int, int, int]:
  """(chunks, rows, tokens) of the prefill as the scheduler batches it: rows a power of two, tokens
  the prompt's bucket, rows x tokens within engine.max_prefill_tokens."""
  filled = run.prompt_len - 1
  bucket = min(max(pow2_at_least(filled), MIN_PREFILL_TOKENS), 1 << int(math.log2(run.max_prefill_tokens)))
  if filled > bucket:
    raise ValueError(f"prompt_len={run.prompt_len}: longer than one prefill chunk ({bucket}); not modelled")
  fit = 1 << int(math.log2(max(1, run.max_prefill_tokens // bucket)))
  per_chunk = min(fit, run.max_num_seqs or run.batch, run.batch)
  return math.ceil(run.batch / per_chunk), pow2_at_least(per_chunk), bucket


def predict(meas: dict, num_layers: int, run: RunShape) -> dict:
  """Predicted seconds (prefill, decode, control RPCs) and output tokens/s of one generate call."""
  delay_s = run.delay_ms / 1e3
  chunks, rows, bucket = prefill_chunk(run)
  per_chunk = min(rows, run.batch)
  prefill = 0.0
  for c in range(chunks):
    n = min(per_chunk, run.batch - c * per_chunk)
    prefill += prefill_chunk_time(meas, num_layers, pow2_at_least(n), bucket, n * (run.prompt_len - 1), delay_s)
  k, size = micro_batches(run.batch, run.in_flight)  # tier 1 pads `size` rows to a power of two; padding is not sent
  decode, calls = 0.0, math.ceil(run.output_len / run.decode_steps)
  for j in range(calls):
    context = run.prompt_len + j * run.decode_steps + (run.decode_steps + 1) / 2
    decode += decode_call_time(meas, num_layers, run, context)
  control = (chunks + run.batch) * meas["control_rtt_s"]
  wall = prefill + decode + control
  return {"prefill_s": prefill, "decode_s": decode, "control_s": control, "wall_s": wall,
          "output_tok_s": run.batch * run.output_len / wall, "micro_batches": k, "micro_rows": size}
