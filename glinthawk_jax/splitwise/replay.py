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
from glinthawk_jax.splitwise.cluster import FINISH_ERROR, STAGES, Cluster, ClusterOutput, ClusterRequest


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
  s["stages_s_p50"] = stage_p50s(ok)
  return s


def stage_p50s(outputs: list[ClusterOutput]) -> dict[str, float]:
  """Median time into each timeline stage from the stage before it (cluster.STAGES; stages a request
  skipped are bridged, so each request's gaps sum to its TTFT), over the requests that reached it."""
  gaps: dict[str, list[float]] = {}
  for o in outputs:
    t = o.timeline
    seen = [stage for stage in STAGES if stage in t]
    for prev, stage in zip(seen, seen[1:]):
      gaps.setdefault(stage, []).append(t[stage] - t[prev])
  return {stage: float(np.median(gaps[stage])) for stage in STAGES if stage in gaps}


def compiles_between(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
  """Per worker, the compiles (compile_log snapshots) after added to before: count, seconds, functions."""
  out = {}
  for name, a in after.items():
    b = before.get(name, {"count": 0, "seconds": 0.0, "by_function": {}})
    grew = {f: n - b["by_function"].get(f, 0) for f, n in a["by_function"].items() if n > b["by_function"].get(f, 0)}
    out[name] = {"count": a["count"] - b["count"], "seconds": a["seconds"] - b["seconds"], "by_function": grew}
  return out


def goodput(rows: list[dict], slo_target: float) -> float | None:
  """The highest rate whose SLO attainment reaches slo_target (None if no rate does)."""
  good = [r["rate"] for r in rows if r["slo_attainment"] >= slo_target]
  return max(good) if good else None


def warm_up_requests(spec: ReplaySpec, rate: float, copies: int = 1) -> list[list[ClusterRequest]]:
  """The request sets warm_up runs: replay()'s requests (the same lengths at every rate) with other prompt
  tokens. First each prompt length alone with one output token (its lone prefill's shapes: token bucket,
  block-table width, K,V gather, whatever the buckets), `copies` at once (one for each worker that
  prefills: the router spreads them); then all at `rate`, then bursts of the first 8, 16 and all
  (decode batches of 8, 16 and more rows while their contexts grow)."""
  rng = np.random.default_rng(spec.seed + 7919)
  like = [dataclasses.replace(r, request_id=f"warm-{r.request_id}",
                              prompt_ids=[int(t) for t in rng.integers(0, spec.vocab_size, len(r.prompt_ids))])
          for r in trace_requests(spec, rate)]
  lengths = {len(r.prompt_ids): r for r in like}
  singles = [[dataclasses.replace(r, request_id=f"{r.request_id}-{i}", arrival_s=0.0,
                                  params=dataclasses.replace(r.params, max_tokens=1)) for i in range(copies)]
             for _, r in sorted(lengths.items())]
  sizes = sorted({min(8, len(like)), min(16, len(like)), len(like)})
  bursts = [[dataclasses.replace(r, arrival_s=0.0) for r in like[:n]] for n in sizes]
  return singles + [like] + bursts


def warm_up(cluster: Cluster, spec: ReplaySpec, rate: float, timeout_s: float = 600.0) -> None:
  """Compiles the shapes the measured requests hit before measuring them (warm_up_requests): each prompt
  length alone on each worker that prefills (its prefill and K,V shapes), then all at `rate` and in bursts
  (batched prefills, decode batches and widths; without this the first measured rate paid for compiles,
  seconds each on a GPU). Raises TimeoutError after timeout_s in all."""
  roles = [w.role for w in cluster.router.workers.values() if w.alive]
  copies = roles.count("prefill") or len(roles)
  end = time.time() + timeout_s
  for reqs in warm_up_requests(spec, rate, copies):
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

    compiled = cluster.compiles()
    start = time.time()
    try:
      outputs = cluster.run(reqs, on_output=report,
                            timeout_s=600.0 if deadline is None else max(1.0, deadline - start))
    except TimeoutError as e:
      rows.append({"rate": rate, "error": str(e)})
      continue
    rows.append({"rate": rate, **summarize(outputs, time.time() - start, slo_ttft_s, slo_tbt_s),
                 "compiles": compiles_between(compiled, cluster.compiles())})
  return {"trace": spec.trace, "rates": rows, "goodput_rps": goodput(measured(rows), slo_target),
          "slo": {"ttft_s": slo_ttft_s, "tbt_s": slo_tbt_s, "target": slo_target}}


def stage_table(results: list[dict]) -> str:
  """Per (mode, trace, rate): the median ms into each timeline stage (stage_p50s) and the XLA compiles
  the workers ran during the measured requests (count, seconds)."""
  head = f"{'mode':<20} {'trace':<5} {'rate':>6} " + " ".join(f"{s[:11]:>11}" for s in STAGES[1:])
  head += f" {'compiles':>9} {'compile s':>9}"
  lines = ["median ms into each stage from the one before (colocated routes skip the transfer stages)",
           head, "-" * len(head)]
  for res in results:
    for r in measured(res["rates"]):
      cells = [f"{1e3 * r['stages_s_p50'][s]:.0f}" if s in r["stages_s_p50"] else "-" for s in STAGES[1:]]
      compiles = r.get("compiles", {}).values()
      lines.append(f"{res.get('mode', ''):<20} {res['trace']:<5} {r['rate']:>6g} " +
                   " ".join(f"{c:>11}" for c in cells) + f" {sum(c['count'] for c in compiles):>9} "
                   f"{sum(c['seconds'] for c in compiles):>9.1f}")
  return "\n".join(lines)


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
