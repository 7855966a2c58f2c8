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


@pytest.mark.parametrize("real,depth,parts", [(8, 1, (1, 8)), (8, 2, (2, 4)), (8, 3, (3, 3)), (6, 4, (3, 2)), (256, 3, (3, 86))])
def test_micro_batches_follow_the_runners_split(real, depth, parts):
  assert generation.micro_batches(real, depth) == parts


def test_prefill_chunks_fit_the_token_budget():
  run = generation.RunShape(batch=20, prompt_len=33, output_len=4, in_flight=1, max_prefill_tokens=256)
  assert generation.prefill_chunk(run) == (3, 8, 32)  # 8 rows x 32 tokens = 256
  with pytest.raises(ValueError, match="prompt_len=400"):
    generation.prefill_chunk(generation.RunShape(4, 400, 4, 1, max_prefill_tokens=256))


@pytest.mark.parametrize("batch,shards,depth,expected", [
    (64, 4, 4, [{0: 16}, {1: 16}, {2: 16}, {3: 16}]),  # one shard each: the runner groups rows by shard
    (64, 4, 2, [{0: 16, 1: 16}, {2: 16, 3: 16}]),
    (6, 4, 2, [{0: 2, 1: 1}, {1: 1, 2: 1, 3: 1}]),  # 2, 2, 1, 1 sequences a shard; micro-batches of 3 rows
    (8, 1, 2, [{0: 4}, {0: 4}])])
def test_micro_batch_shards_follow_placement_and_the_runners_order(batch, shards, depth, expected):
  assert generation.micro_batch_shards(batch, shards, depth) == expected


def test_shard_wait_is_a_line_in_the_kv_tokens_a_shard_reads():
  """Depth-1 runner runs of 4 and 8 rows spread over 4 shards (1 and 2 rows a shard) at context 100:
  the wait grows 1 ms a 100 tokens a shard, so 4 rows on one shard at context 100 wait 7 ms."""
  meas = _tables()
  meas["runner"] = [dict(rows=4, context=100, step_s=0, host_s=0, remote_s=4e-3),
                    dict(rows=8, context=100, step_s=0, host_s=0, remote_s=5e-3)]
  meas["rpc"] = [dict(rows=r, context=c, send_s=0, rtt_s=1, service_s=1e-5 * r / 4 * c, queued_s=0)
                 for r in (4, 8) for c in (50, 100)]  # rows spread over 4 shards: r / 4 a shard
  shard = generation.Tier2Shard(meas, shards=4)
  assert shard.wait(4 * 100) == pytest.approx(7e-3)
  assert shard.service(4 * 100) == pytest.approx(4e-3)
  for r in meas["rpc"]:
    r["service_s"] *= 2
  assert generation.Tier2Shard(meas, shards=4).service(4 * 100) == pytest.approx(7e-3)  # at most the wait
  part = shard.part(2, rows=4, context=100, delay_s=2e-3)
  assert part.shard == 2 and 2 * part.one_way + part.service == pytest.approx(7e-3 + 2e-3)
  meas["runner"][1]["fanout"] = 1  # all 8 rows on one shard: x = 800 -> the line through (100, 4), (800, 5)
  assert generation.Tier2Shard(meas, shards=4).wait(450) == pytest.approx(4.5e-3)


def test_micro_batches_on_separate_shards_hide_tier2_service():
  """Host 1 ms a round trip, each shard's service = its wait = 3 ms: four micro-batches on four
  shards overlap fully (the last starts 3 ms late); on one shard they queue behind each other."""
  meas = _tables()
  meas["runner"] = [dict(rows=r, context=20, step_s=0.0, host_s=1e-3, remote_s=3e-3) for r in (1, 8)]
  meas["rpc"] = [dict(rows=r, context=c, send_s=0, rtt_s=3e-3, service_s=3e-3, queued_s=3e-3)
                 for r in (1, 8) for c in (8, 64)]
  four = generation.RunShape(batch=8, prompt_len=16, output_len=4, in_flight=4, decode_steps=4, shards=4)
  assert generation.predict(meas, L, four)["decode_s"] == pytest.approx(3e-3 + 4 * L * 4e-3, rel=1e-9)
  one = generation.predict(meas, L, generation.RunShape(8, 16, 4, 4, decode_steps=4, shards=1))["decode_s"]
  assert one > 4 * L * 4 * 3e-3  # tier 2 busy all the time


def _prefill_tables(compute, copy, gather, send, service=0.0, rtt=None):
  meas = _tables()
  meas["bulk_step"] = [dict(rows=8, tokens=16, step_s=compute + copy, dispatch_s=0.0, compute_s=compute,
                            copy_s=copy, gather_s=gather)]
  meas["append"] = [dict(tokens=t, send_s=send, service_s=service, rtt_s=send + service if rtt is None else rtt)
                    for t in (8, 256)]
  return meas


@pytest.mark.parametrize("compute,host", [(3e-3, 1e-3), (1e-3, 3e-3)])
def test_prefill_chunk_is_a_two_machine_flow_shop(compute, host):
  """Device (bulk step) and host (gather + send) overlap layer to layer: c + w + (L - 1) max(c, w),
  not L (c + w)."""
  meas = _prefill_tables(compute, 0.0, host / 2, host / 2)
  t = generation.prefill_chunk_time(meas, 8, rows=8, tokens=16, real_tokens=120, delay_s=0.0)
  assert t == pytest.approx(compute + host + 7 * max(compute, host), rel=1e-12)


def test_prefill_copy_overlaps_compute_and_delay_is_paid_once_a_chunk():
  """The K, V copy has its own stream: per layer max(compute, copy, host); an injected delay holds
  only the last append (the runner waits on all of them at the end of the chunk)."""
  meas = _prefill_tables(compute=1e-3, copy=2e-3, gather=0.0, send=0.5e-3, service=0.25e-3, rtt=1e-3)
  t = generation.prefill_chunk_time(meas, 4, rows=8, tokens=16, real_tokens=120, delay_s=0.0)
  assert t == pytest.approx(1e-3 + 4 * 2e-3 + 0.5e-3 + (1e-3 - 0.5e-3), rel=1e-12)  # then the last round trip
  delayed = generation.prefill_chunk_time(meas, 4, rows=8, tokens=16, real_tokens=120, delay_s=5e-3)
  assert delayed - t == pytest.approx(5e-3, rel=1e-9)
  old = dict(meas, bulk_step=[dict(rows=8, tokens=16, step_s=3e-3)])  # a profile without the split
  assert generation.prefill_chunk_time(old, 4, 8, 16, 120, 0.0) == pytest.approx(4 * 3e-3 + 1e-3, rel=1e-12)


def test_spread_micro_batches_reach_every_shard_in_proportion():
  """tier2.split "spread": each micro-batch holds its share of every shard's rows (the runner's interleaved
  order), where grouped ones hold one or two shards each."""
  parts = generation.micro_batch_shards(256, 7, 2, spread=True)
  assert [sorted(p) for p in parts] == [list(range(7))] * 2
  assert sum(sum(p.values()) for p in parts) == 256
  assert max(max(p.values()) - min(p.values()) for p in parts) <= 1
  assert all(len(p) <= 2 for p in generation.micro_batch_shards(256, 7, 8))


def test_shared_cores_bound_decode_and_each_shard_call_costs_server_cpu():
  """With the runner's CPU measurements: a call takes at least its CPU work over the free cores, and a
  spread micro-batch pays a server call per shard it reaches (2 micro-batches x 4 shards = 8 calls a
  round trip) where grouped ones pay two each (8 rows on 4 shards); with cores to spare the event model's
  (latency-bound) time holds."""
  meas = _tables(step=0.0, host=0.1e-3, remote=1e-3, service=0.1e-3)
  for r in meas["runner"]:
    r.update(cpu_s=0.8e-3, server_cpu_s=0.3e-3, cores=2.0)
  shape = dict(batch=8, prompt_len=16, output_len=4, in_flight=2, decode_steps=4, shards=4)
  spread = generation.predict(meas, L, generation.RunShape(**shape, split="spread"))["decode_s"]
  grouped = generation.predict(meas, L, generation.RunShape(**shape, split="shards"))["decode_s"]
  assert spread == pytest.approx(4 * L * 2 * (0.8e-3 + 4 * 0.3e-3) / 2.0, rel=1e-9)
  assert grouped == pytest.approx(4 * L * 2 * (0.8e-3 + 2 * 0.3e-3) / 2.0, rel=1e-9)
  for r in meas["runner"]:
    r["cores"] = 64.0
  without = {k: v for k, v in meas.items() if k != "runner"} | {"runner": [
      {k: v for k, v in r.items() if k not in ("cpu_s", "server_cpu_s", "cores")} for r in meas["runner"]]}
  run = generation.RunShape(**shape, split="spread")
  assert generation.predict(meas, L, run)["decode_s"] == generation.predict(without, L, run)["decode_s"]
