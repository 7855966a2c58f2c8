"""Predicts one pipelined two-tier generation run (Engine.generate, placement pipelined) from the
stage times a measured profile holds (measurements["two_tier"], glinthawk_jax/sim/measure.py).

The run is modelled as the engine executes it today:
  - prefill: prompts (all but their last token) in chunks that fit engine.max_prefill_tokens; each
    chunk runs layer by layer on tier 1 (bulk step + the append's send on the host thread) while
    tier 2 stores the previous layers' K, V; the chunk ends when the last append is stored;
  - decode: ceil(output / decode_steps) fused calls; in each, the batch is split into micro-batches
    as PipelinedRunner._split does and the event model (two_tier.makespan) runs them together for
    decode_steps tokens: per layer tier-1 step + RPC send (tier-1 host), RPC latency + injected delay
    (pure delay), tier-2 service (one station); after the last layer the last and first steps;
  - control RPCs: one allocation per prefill chunk, one release per sequence at its end.
Not modelled: CPU contention between tier 1 and tier-2 processes sharing cores, Python scheduling
between calls, prompts longer than a prefill chunk, sequences finishing at different steps.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glinthawk_jax.sim.two_tier import PipelineTimes, makespan

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


def _interp(table: list[dict], key: str, x: float, by: str) -> float:
  """Linear interpolation of table[key] in table[by] (clamped at the ends)."""
  rows = sorted(table, key=lambda r: r[by])
  return float(np.interp(x, [r[by] for r in rows], [r[key] for r in rows]))


def tier2_lookup(table: list[dict], key: str, rows: float, context: float) -> float:
  """table[key] at (rows, context): a least-squares line in context for each measured row count
  (timings are noisy; tier-2 work grows linearly with context), then linear in rows."""
  by_rows = sorted({r["rows"] for r in table})
  values = []
  for n in by_rows:
    xs, ys = zip(*((r["context"], r[key]) for r in table if r["rows"] == n))
    line = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (0.0, float(np.mean(ys)))
    values.append(max(float(np.polyval(line, context)), 0.0))
  return float(np.interp(rows, by_rows, values))


def micro_batches(real: int, in_flight: int) -> tuple[int, int]:
  """(micro-batches, rows of each) for `real` sequences at depth `in_flight`, as PipelinedRunner."""
  parts = min(max(in_flight, 1), max(real, 1))
  size = pow2_at_least(math.ceil(real / parts))
  return math.ceil(real / size), size


def decode_times(meas: dict, num_layers: int, rows: int, tier2_rows: int, context: float,
                 delay_s: float) -> PipelineTimes:
  """Per-layer stage times of a decode micro-batch: `rows` on tier 1, `tier2_rows` sent to tier 2.

  With the runner's measured costs (meas["runner"], depth-1 runs): tier-1 station = runner step +
  runner host work per round trip; the host's wait per round trip (moved to `context` by the RPC
  table's round-trip difference) = tier-2 service (RPC table, at most the wait) + pure latency.
  Without them: isolated step and RPC send on the host, rtt - send - service as latency."""
  rpc = meas["rpc"]
  rtt = tier2_lookup(rpc, "rtt_s", tier2_rows, context)
  service = tier2_lookup(rpc, "service_s", tier2_rows, context)
  if "runner" in meas:
    run = meas["runner"]
    step, host = _interp(run, "step_s", rows, "rows"), _interp(run, "host_s", rows, "rows")
    at = _interp(run, "context", rows, "rows")
    remote = max(_interp(run, "remote_s", rows, "rows") + rtt - tier2_lookup(rpc, "rtt_s", tier2_rows, at), 0.0)
    service = min(service, remote)
    return PipelineTimes(layers_per_slice=(num_layers,), tier1=step, host=host, tier2=service,
                         propagation=(remote - service + delay_s) / 2, head=step)  # L + 1 steps a token
  t1 = meas["tier1_step"]
  send = tier2_lookup(rpc, "send_s", tier2_rows, context)
  step = _interp(t1, "step_s", rows, "rows")
  ends = _interp(t1, "first_s", rows, "rows") + _interp(t1, "last_s", rows, "rows")
  return PipelineTimes(layers_per_slice=(num_layers,), tier1=step, host=send, tier2=service,
                       propagation=(max(rtt - send - service, 0.0) + delay_s) / 2,
                       head=ends - step)  # L middles stand for L - 1 middles + first + last


def prefill_chunk_time(meas: dict, num_layers: int, rows: int, tokens: int, real_tokens: int,
                       delay_s: float) -> float:
  """One bulk prefill chunk: tier 1 runs layers back to back, tier 2 stores appends one at a time."""
  bulk = [dict(r, size=r["rows"] * r["tokens"]) for r in meas["bulk_step"]]
  step = _interp([r for r in bulk if r["tokens"] == tokens] or bulk, "step_s", rows * tokens, "size")
  send = _interp(meas["append"], "send_s", real_tokens, "tokens")
  service = _interp(meas["append"], "service_s", real_tokens, "tokens")
  latency = max(_interp(meas["append"], "rtt_s", real_tokens, "tokens") - send - service, 0.0) + delay_s
  host, stored = 0.0, 0.0
  for _ in range(num_layers):
    host += step + send
    stored = max(stored, host + latency / 2) + service
  return stored + latency / 2


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
  k, size = micro_batches(run.batch, run.in_flight)  # tier 1 runs `size` rows; padding is not sent
  decode, calls = 0.0, math.ceil(run.output_len / run.decode_steps)
  for j in range(calls):
    context = run.prompt_len + j * run.decode_steps + (run.decode_steps + 1) / 2
    times = decode_times(meas, num_layers, size, min(size, run.batch), context, delay_s)
    decode += makespan(times, k, run.decode_steps)
  control = (chunks + run.batch) * meas["control_rtt_s"]
  wall = prefill + decode + control
  return {"prefill_s": prefill, "decode_s": decode, "control_s": control, "wall_s": wall,
          "output_tok_s": run.batch * run.output_len / wall, "micro_batches": k, "micro_rows": size}
