"""Trace replay's pure parts: trace-shaped requests within the context, metrics, goodput."""

import math

import numpy as np
import pytest

from glinthawk_jax.splitwise.cluster import FINISH_ERROR, ClusterOutput
from glinthawk_jax.splitwise.replay import ReplaySpec, goodput, summarize, trace_requests

SPEC = ReplaySpec("code", num_requests=200, max_prompt_tokens=1000, max_output_tokens=64, max_model_len=1024,
                  vocab_size=512)


def test_trace_requests_fit_the_context_and_are_reproducible():
  reqs = trace_requests(SPEC, rate=5.0)
  assert len(reqs) == 200
  for r in reqs:
    assert 1 <= len(r.prompt_ids) <= 1000 and 1 <= r.params.max_tokens <= 64
    assert len(r.prompt_ids) + r.params.max_tokens <= 1024
    assert max(r.prompt_ids) < 512 and r.params.ignore_eos
  arrivals = np.array([r.arrival_s for r in reqs])
  assert np.all(np.diff(arrivals) >= 0)
  assert 200 / arrivals[-1] == pytest.approx(5.0, rel=0.25)  # Poisson at the asked rate
  assert [r.prompt_ids for r in trace_requests(SPEC, 5.0)] == [r.prompt_ids for r in reqs]
  assert len({len(r.prompt_ids) for r in reqs}) > 20  # lengths from the trace, not one value


def _out(ttft, times, reason="length", visible=None):
  return ClusterOutput("r", 10, list(range(len(times))), reason, ttft, times, 1, ("p", "d"), visible)


def test_summary_percentiles_slo_and_kv_share():
  outs = [_out(0.1, [0.1, 0.2, 0.3], visible=0.05),  # meets both SLOs
          _out(0.5, [0.5, 0.55]),  # TTFT too slow
          _out(0.1, [0.1, 0.5]),  # TBT too slow
          _out(math.nan, [], FINISH_ERROR)]
  s = summarize(outs, elapsed_s=2.0, slo_ttft_s=0.2, slo_tbt_s=0.2)
  assert s["num_requests"] == 4 and s["num_failed"] == 1
  assert s["slo_attainment"] == pytest.approx(1 / 3)
  assert s["ttft_s_p50"] == pytest.approx(0.1)
  assert s["output_tokens_per_s"] == pytest.approx(7 / 2.0)
  assert s["kv_visible_share_of_ttft_p50"] == pytest.approx(0.5) and s["num_split_routes"] == 1


def test_goodput_is_the_highest_rate_meeting_the_target():
  rows = [{"rate": 1, "slo_attainment": 1.0}, {"rate": 2, "slo_attainment": 0.95},
          {"rate": 4, "slo_attainment": 0.5}]
  assert goodput(rows, 0.9) == 2
  assert goodput(rows, 0.99) == 1
  assert goodput(rows[2:], 0.9) is None
