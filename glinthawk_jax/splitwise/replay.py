"""Trace replay against a running cluster: Azure LLM trace lengths, Poisson arrivals, latency metrics.

Request lengths are drawn from data/azure_llm_2023 (sim/traces.py parses it) and capped to what the
model's context holds; prompts are random token ids (the traces have no text); outputs are forced to the
trace's length (ignore_eos). Metrics per rate: TTFT, TBT and E2E p50/p90/p99, throughput, SLO attainment
(share of requests whose TTFT and mean TBT both meet the SLO) and, over the rates, goodput: the highest
rate whose attainment reaches `slo_target`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import numpy as np

from glinthawk_jax.metrics import latency_percentiles
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.sim import traces
from glinthawk_jax.splitwise.cluster import FINISH_ERROR, Cluster, ClusterOutput, ClusterRequest


@dataclasses.dataclass(frozen=True)
class ReplaySpec:
  trace: str  # "code" or "conv"
  num_requests: int
  max_prompt_tokens: int  # caps (also by the context: prompt + output <= max_model_len)
  max_output_tokens: int
  max_model_len: int
  vocab_size: int
  seed: int = 0


@functools.lru_cache(maxsize=None)
def _trace(name: str) -> tuple:
  """The parsed trace, read once a process (warm-ups and every rate sample from it)."""
  return tuple(traces.load_azure(name))


def trace_requests(spec: ReplaySpec, rate: float) -> list[ClusterRequest]:
  """`spec.num_requests` requests with trace lengths (sampled with replacement) and Poisson arrivals."""
  rng = np.random.default_rng(spec.seed)
  pool = _trace(spec.trace)
  picked = [pool[i] for i in rng.integers(0, len(pool), spec.num_requests)]
  out = []
  for i, r in enumerate(traces.poisson(rate, spec.num_requests, picked, seed=spec.seed)):
    prompt = min(r.prompt_tokens, spec.max_prompt_tokens, spec.max_model_len - 2)
    output = max(1, min(r.output_tokens, spec.max_output_tokens, spec.max_model_len - prompt))
    ids = [int(t) for t in rng.integers(0, spec.vocab_size, prompt)]
    params = SamplingParams(max_tokens=output, ignore_eos=True, seed=spec.seed * 100_003 + i)
    out.append(ClusterRequest(f"{spec.trace}-{i}", ids, params, r.arrival_s))
  return out


def summarize(outputs: list[ClusterOutput], elapsed_s: float, slo_ttft_s: float, slo_tbt_s: float) -> dict:
  """Latency percentiles (s), throughput, SLO attainment and the KV transfer's share of TTFT."""
  ok = [o for o in outputs if o.finish_reason != FINISH_ERROR]
  mean_tbt = [float(np.mean(o.time_between_tokens_s)) if len(o.token_ids) > 1 else 0.0 for o in ok]
  met = [o.ttft_s <= slo_ttft_s and t <= slo_tbt_s for o, t in zip(ok, mean_tbt)]
  output_tokens = sum(len(o.token_ids) for o in ok)
  split = [o for o in ok if o.kv_visible_s is not None]
  s = {"num_requests": len(outputs), "num_failed": len(outputs) - len(ok), "elapsed_s": elapsed_s,
       "requests_per_s": len(ok) / elapsed_s, "output_tokens_per_s": output_tokens / elapsed_s,
       "tokens_per_s": (output_tokens + sum(o.num_prompt_tokens for o in ok)) / elapsed_s,
       "slo_attainment": float(np.mean(met)) if met else 0.0,
       "num_recomputed": sum(o.attempts > 1 for o in outputs), "num_split_routes": len(split),
       "kv_visible_s_p50": float(np.median([o.kv_visible_s for o in split])) if split else None,
       "kv_visible_share_of_ttft_p50": (float(np.median([o.kv_visible_s / o.ttft_s for o in split]))
                                        if split else None)}
  s.update(latency_percentiles(ok))
  return s


def goodput(rows: list[dict], slo_target: float) -> float | None:
  """The highest rate whose SLO attainment reaches slo_target (None if no rate does)."""
  good = [r["rate"] for r in rows if r["slo_attainment"] >= slo_target]
  return max(good) if good else None


def warm_up(cluster: Cluster, spec: ReplaySpec, rate: float, count: int = 16, timeout_s: float = 600.0) -> None:
  """Compiles the common shapes before measuring: trace-shaped requests (other seed) as a burst and at
  `rate`, then one alone. Raises TimeoutError after timeout_s in all."""
  warm = dataclasses.replace(spec, num_requests=min(count, spec.num_requests), seed=spec.seed + 7919)
  end = time.time() + timeout_s
  for reqs in (trace_requests(warm, rate=1e6), trace_requests(warm, rate=rate), trace_requests(warm, 1e6)[:1]):
    cluster.run(reqs, timeout_s=max(1.0, end - time.time()))


def replay(cluster: Cluster, spec: ReplaySpec, rates: list[float], slo_ttft_s: float, slo_tbt_s: float,
           slo_target: float = 0.9, progress: bool = True, deadline: float | None = None) -> dict:
  """Runs the trace at each rate; returns {"rates": [summary + rate], "goodput_rps", "slo"}.

  `deadline` (time.time()): rates not started by then are recorded as skipped, and a run still going
  then ends as a timeout (the cluster is left busy: start a fresh one after a timeout).
  """
  rows = []
  for rate in rates:
    if deadline is not None and time.time() >= deadline or rows and "error" in rows[-1]:
      rows.append({"rate": rate, "skipped": True})
      continue
    reqs = trace_requests(spec, rate)
    done = []

    def report(out, n=len(reqs), rate=rate):
      done.append(out)
      if progress and (len(done) % max(1, n // 10) == 0 or len(done) == n):
        print(f"  [{spec.trace} @ {rate:g}/s] {len(done)}/{n} done, {time.time() - start:.1f} s",
              file=sys.stderr, flush=True)

    start = time.time()
    try:
      outputs = cluster.run(reqs, on_output=report,
                            timeout_s=600.0 if deadline is None else max(1.0, deadline - start))
    except TimeoutError as e:
      rows.append({"rate": rate, "error": str(e)})
      continue
    rows.append({"rate": rate, **summarize(outputs, time.time() - start, slo_ttft_s, slo_tbt_s)})
  return {"trace": spec.trace, "rates": rows, "goodput_rps": goodput(measured(rows), slo_target),
          "slo": {"ttft_s": slo_ttft_s, "tbt_s": slo_tbt_s, "target": slo_target}}


def measured(rows: list[dict]) -> list[dict]:
  """The rows that ran to completion (not skipped or timed out)."""
  return [r for r in rows if "slo_attainment" in r]


def table(results: list[dict]) -> str:
  """One line per (mode, trace, rate) of results [{"mode", "trace", "rates": [...]}]."""
  head = (f"{'mode':<20} {'trace':<5} {'rate':>6} {'ttft p50':>9} {'ttft p99':>9} {'tbt p50':>8} {'tbt p99':>8} "
          f"{'e2e p90':>8} {'out tok/s':>9} {'SLO':>5} {'kv/ttft':>7}")
  lines = [head, "-" * len(head)]
  ms = lambda x: f"{1e3 * x:.0f}ms" if x is not None else "-"
  for res in results:
    for r in res["rates"]:
      if "slo_attainment" not in r:
        lines.append(f"{res.get('mode', ''):<20} {res['trace']:<5} {r['rate']:>6g} "
                     f"{'skipped' if r.get('skipped') else 'timed out'}")
        continue
      share = r["kv_visible_share_of_ttft_p50"]
      lines.append(f"{res.get('mode', ''):<20} {res['trace']:<5} {r['rate']:>6g} {ms(r['ttft_s_p50']):>9} "
                   f"{ms(r['ttft_s_p99']):>9} {ms(r['tbt_s_p50']):>8} {ms(r['tbt_s_p99']):>8} "
                   f"{ms(r['e2e_s_p90']):>8} {r['output_tokens_per_s']:>9.1f} {r['slo_attainment']:>5.2f} "
                   f"{'-' if share is None else f'{share:.2f}':>7}")
    lines.append(f"{res.get('mode', ''):<20} {res['trace']:<5} goodput: {res['goodput_rps']} req/s")
  return "\n".join(lines)
