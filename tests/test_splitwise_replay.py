"""Trace replay's pure parts: trace-shaped requests within the context, metrics, goodput."""

import math

import numpy as np
import pytest

from glinthawk_jax.splitwise.cluster import FINISH_ERROR, STAGES, ClusterOutput
from glinthawk_jax.splitwise.replay import (ReplaySpec, compiles_between, goodput, stage_p50s, summarize,
                                            trace_requests, warm_up_requests)

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


def test_warm_up_sends_the_measured_lengths_with_other_tokens():
  spec = ReplaySpec("conv", num_requests=12, max_prompt_tokens=1000, max_output_tokens=64, max_model_len=1024,
                    vocab_size=512)
  measured_reqs = trace_requests(spec, rate=2.0)
  sets = warm_up_requests(spec, rate=4.0, copies=2)
  singles, at_rate, bursts = sets[:-3], sets[-3], sets[-2:]
  assert [len(b) for b in bursts] == [8, 12]
  burst = bursts[-1]
  for reqs in (at_rate, burst):
    assert [len(r.prompt_ids) for r in reqs] == [len(r.prompt_ids) for r in measured_reqs]
    assert all(w.prompt_ids != m.prompt_ids for w, m in zip(reqs, measured_reqs))
  # Each measured prompt length alone (a copy for each worker that prefills).
  assert [len(s) for s in singles] == [2] * len(singles)
  assert [len(s[0].prompt_ids) for s in singles] == sorted({len(r.prompt_ids) for r in measured_reqs})
  assert all(len({r.request_id for r in s}) == 2 and len({len(r.prompt_ids) for r in s}) == 1 for s in singles)
  assert [r.params for r in at_rate] == [r.params for r in measured_reqs]  # whole outputs: decode widths
  assert all(s[0].params.max_tokens == 1 for s in singles) and all(r.arrival_s == 0 for r in burst)
  assert [r.arrival_s for r in at_rate] == [r.arrival_s for r in trace_requests(spec, rate=4.0)]


def test_stage_gaps_follow_the_timeline_and_sum_to_ttft():
  split = _out(0.9, [0.9, 1.0])
  split.transfer = {"arrival_s": 100.0, "routed_s": 100.01, "begun_s": 100.02, "dispatched_s": 100.1,
                    "prefill_end_s": 100.3, "commit_sent_s": 100.6, "commit_s": 100.61, "admitted_s": 100.7}
  colocated = _out(0.5, [0.5])
  colocated.transfer = {"arrival_s": 50.0, "routed_s": 50.01, "dispatched_s": 50.2}
  assert list(split.timeline) == list(STAGES) and list(colocated.timeline) == ["arrival", "routed", "dispatched",
                                                                              "first_token"]
  gaps = stage_p50s([split])
  assert list(gaps) == list(STAGES[1:]) and sum(gaps.values()) == pytest.approx(0.9)
  assert gaps["prefilled"] == pytest.approx(0.2) and gaps["first_token"] == pytest.approx(0.2)
  both = stage_p50s([split, colocated])
  assert both["dispatched"] == pytest.approx((0.08 + 0.19) / 2)  # colocated: routed -> dispatched
  assert both["first_token"] == pytest.approx((0.2 + 0.3) / 2)  # colocated: dispatched -> first token


def test_compiles_between_counts_what_each_worker_added():
  before = {"p": {"count": 3, "seconds": 1.0, "by_function": {"f": 2, "g": 1}}}
  after = {"p": {"count": 5, "seconds": 2.5, "by_function": {"f": 2, "g": 2, "h": 1}},
           "d": {"count": 1, "seconds": 0.5, "by_function": {"f": 1}}}
  assert compiles_between(before, after) == {"p": {"count": 2, "seconds": 1.5, "by_function": {"g": 1, "h": 1}},
                                             "d": {"count": 1, "seconds": 0.5, "by_function": {"f": 1}}}
