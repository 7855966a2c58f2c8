"""Summary fields and percentiles against hand-computed values."""

import pytest

from glinthawk_jax.metrics import summarize
from glinthawk_jax.requests import RequestOutput


def test_summary_has_vllm_fields_and_correct_values():
  outputs = [
      RequestOutput("a", [1, 2, 3], [4, 5], "", "length", 0.5, 1.0, [0.5, 1.5]),
      RequestOutput("b", [1], [4, 5, 6], "", "stop", 1.5, 2.0, [1.5, 2.5, 3.5]),
  ]
  s = summarize(outputs, elapsed_time=4.0)
  assert s["num_requests"] == 2
  assert s["total_num_tokens"] == 4 + 5
  assert s["requests_per_second"] == pytest.approx(0.5)
  assert s["tokens_per_second"] == pytest.approx(9 / 4)
  assert s["output_tokens_per_second"] == pytest.approx(5 / 4)
  assert s["ttft_s_p50"] == pytest.approx(1.0)
  assert s["tbt_s_p50"] == pytest.approx(1.0)  # every gap is 1.0 s
  assert s["e2e_s_p99"] == pytest.approx(3.5, rel=1e-2)


def test_empty_run_has_no_percentiles():
  s = summarize([], 1.0)
  assert s["num_requests"] == 0 and s["ttft_s_p50"] is None
