"""Predicting a pipelined generation run from measured stage tables (glinthawk_jax/sim/generation.py)."""

import pytest

from glinthawk_jax.sim import generation

L = 3


def _tables(step=1e-3, host=2e-3, remote=3e-3, service=1e-3):
  """Flat tables: every rows and context costs the same, so the prediction has a closed form."""
  rpc = [dict(rows=r, context=c, send_s=host, rtt_s=remote, service_s=service, queued_s=service)
         for r in (1, 8) for c in (8, 64)]
  return {"tier1_step": [dict(rows=r, step_s=step, first_s=step, last_s=step) for r in (1, 8)],
          "bulk_step": [dict(rows=8, tokens=16, step_s=5e-3)],
          "rpc": rpc, "append": [dict(tokens=t, send_s=1e-3, rtt_s=2e-3, service_s=1e-3) for t in (8, 256)],
          "control_rtt_s": 1e-3,
          "runner": [dict(rows=r, context=20, step_s=step, host_s=host, remote_s=remote) for r in (1, 8)]}


def test_depth_one_decode_is_calls_times_steps_times_cycle():
  meas = _tables()
  run = generation.RunShape(batch=8, prompt_len=16, output_len=8, in_flight=1, decode_steps=4)
  p = generation.predict(meas, L, run)
  cycle = L * (1e-3 + 2e-3 + 3e-3) + 1e-3  # L round trips + one extra tier-1 step a token
  assert p["decode_s"] == pytest.approx(2 * 4 * cycle, rel=1e-9)
  assert p["control_s"] == pytest.approx((1 + 8) * 1e-3)  # one allocation (one chunk), 8 releases
  assert p["output_tok_s"] == pytest.approx(64 / (p["prefill_s"] + p["decode_s"] + p["control_s"]))


def test_injected_delay_is_paid_once_per_round_trip_at_depth_one():
  meas = _tables()
  base = generation.RunShape(batch=8, prompt_len=16, output_len=8, in_flight=1, decode_steps=4)
  slow = generation.RunShape(batch=8, prompt_len=16, output_len=8, in_flight=1, decode_steps=4, delay_ms=5)
  grow = generation.predict(meas, L, slow)["decode_s"] - generation.predict(meas, L, base)["decode_s"]
  assert grow == pytest.approx(8 * L * 5e-3, rel=1e-9)


def test_depth_hides_latency_when_host_work_scales_with_rows():
  """Host work 1 ms a row, 10 ms waiting for tier 2: splitting 8 rows into k micro-batches overlaps
  one's wait with the others' host work, until the host is busy all the time."""
  meas = _tables(remote=10e-3)
  meas["runner"] = [dict(rows=r, context=20, step_s=0.0, host_s=1e-3 * r, remote_s=10e-3) for r in (1, 8)]
  decode = {k: generation.predict(meas, L, generation.RunShape(8, 16, 32, k, decode_steps=8))["decode_s"]
            for k in (1, 2, 4)}
  assert decode[1] == pytest.approx(4 * 8 * L * (8e-3 + 10e-3), rel=1e-9)
  assert decode[1] > decode[2] > decode[4] > 4 * 8 * L * 8e-3  # never faster than the busy host


@pytest.mark.parametrize("real,depth,parts", [(8, 1, (1, 8)), (8, 2, (2, 4)), (8, 3, (2, 4)), (6, 4, (3, 2))])
def test_micro_batches_follow_the_runners_split(real, depth, parts):
  assert generation.micro_batches(real, depth) == parts


def test_prefill_chunks_fit_the_token_budget():
  run = generation.RunShape(batch=20, prompt_len=33, output_len=4, in_flight=1, max_prefill_tokens=256)
  assert generation.prefill_chunk(run) == (3, 8, 32)  # 8 rows x 32 tokens = 256
  with pytest.raises(ValueError, match="prompt_len=400"):
    generation.prefill_chunk(generation.RunShape(4, 400, 4, 1, max_prefill_tokens=256))
