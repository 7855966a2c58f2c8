"""Run summaries in the shape of vLLM's `bench throughput` JSON, plus latency percentiles."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from glinthawk_jax.requests import RequestOutput

PERCENTILES = (50, 90, 99)


def percentiles(values: Sequence[float], prefix: str) -> dict[str, float | None]:
  """{f"{prefix}_p50": ..., ...} in seconds; None when there are no values."""
  arr = np.asarray(values, dtype=np.float64)
  return {f"{prefix}_p{p}": (float(np.percentile(arr, p)) if arr.size else None) for p in PERCENTILES}


def summarize(outputs: Sequence[RequestOutput], elapsed_time: float) -> dict:
  """vLLM's fields (elapsed_time, num_requests, total_num_tokens, requests_per_second,
  tokens_per_second) plus output tokens/s and TTFT / TBT / end-to-end percentiles (seconds)."""
  prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
  output_tokens = sum(len(o.token_ids) for o in outputs)
  elapsed = max(elapsed_time, 1e-9)
  summary = {
      "elapsed_time": elapsed_time,
      "num_requests": len(outputs),
      "total_num_tokens": prompt_tokens + output_tokens,
      "requests_per_second": len(outputs) / elapsed,
      "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
      "num_prompt_tokens": prompt_tokens,
      "num_output_tokens": output_tokens,
      "output_tokens_per_second": output_tokens / elapsed,
  }
  summary.update(latency_percentiles(outputs))
  return summary


def latency_percentiles(outputs: Sequence) -> dict[str, float | None]:
  """TTFT, time-between-tokens and end-to-end percentiles (seconds) of outputs that have `ttft_s`,
  `time_between_tokens_s` and `e2e_s` (RequestOutput, a Splitwise ClusterOutput)."""
  return {**percentiles([o.ttft_s for o in outputs], "ttft_s"),
          **percentiles([t for o in outputs for t in o.time_between_tokens_s], "tbt_s"),
          **percentiles([o.e2e_s for o in outputs], "e2e_s")}
