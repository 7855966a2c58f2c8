"""Two-tier generation against real tier-2 processes on loopback (tiny GQA model, fp32 KV, 3 shards):
the callback and pipelined placements give the local engine's greedy tokens; append-only requests."""

import re
import sys
import types

import grpc
import jax
import numpy as np
import pytest

from configs import tiny
from glinthawk_jax.config import ConfigError, model_config, validate
from glinthawk_jax.engine import Engine
from glinthawk_jax.placements.pipelined import PipelinedRunner, auto_depth, spread_depth
from glinthawk_jax.placements.shard_order import grouped_within
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax import tier2_client
from glinthawk_jax.tier2_client import Tier2Client, Tier2Error
from glinthawk_jax.tier2_launch import server_args
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import start_servers, stop_servers

# 7 prompts for 4 slots; 23, 30 and 40 exceed max_prefill_tokens=16 (later chunks attend via tier 2).
PROMPT_LENGTHS = (5, 23, 1, 12, 30, 16, 40)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def _config(placement="local", addresses="", **tier2):
  c = tiny.get_config()
  c.placement = placement
  c.engine.update(dict(max_num_seqs=4, page_size=4, kv_cache_gb=0.0, max_model_len=64, max_prefill_tokens=16,
                       decode_steps_per_call=2))
  c.tier2.addresses = addresses
  c.tier2.update(tier2)
  return c


@pytest.fixture(scope="module")
def servers():
  c = _config()
  procs = start_servers([server_args(c, model_config(c), "")] * 3)
  yield ",".join(p.address for p in procs)
  stop_servers(procs)


@pytest.fixture(scope="module")
def local_tokens():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, n).tolist() for n in PROMPT_LENGTHS]
  return prompts, [o.token_ids for o in Engine(_config()).generate(prompts, GREEDY)]


def _pages_in_use(addresses):
  with Tier2Client.for_model(addresses.split(","), model_config(_config())) as client:
    return [row["pages_in_use"] for row in client.stats()]


@pytest.mark.parametrize("placement,in_flight,split", [("callback", 0, "shards"), ("pipelined", 2, "shards"),
                                                      ("pipelined", 3, "spread")])
def test_two_tier_greedy_tokens_match_local(servers, local_tokens, placement, in_flight, split):
  prompts, want = local_tokens
  with Engine(_config(placement, servers, in_flight=in_flight, split=split)) as engine:
    got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert got == want
    if placement == "pipelined":
      stats = engine.runner.stats
      assert stats.num_round_trips > 0 and stats.tier2_bytes > 0
  assert _pages_in_use(servers) == [0, 0, 0]  # finished sequences released their tier-2 KV


def test_pipelined_sending_on_the_main_thread_matches_local(servers, local_tokens):
  prompts, want = local_tokens
  with Engine(_config("pipelined", servers, in_flight=3, send_thread=False)) as engine:
    assert engine.runner._sender is None
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want


def test_pipelined_replies_placed_on_the_device_as_they_arrive_match_local(servers, local_tokens):
  prompts, want = local_tokens  # what the runner does on an accelerator, here on the CPU
  with Engine(_config("pipelined", servers, in_flight=3)) as engine:
    engine.runner._place_replies = True
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize("host_copy", ["fused", "pinned", "pageable"])
def test_pipelined_copies_to_the_host_every_way_match_local(servers, local_tokens, host_copy):
  prompts, want = local_tokens
  with Engine(_config("pipelined", servers, in_flight=3, host_copy=host_copy)) as engine:
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want
    runner = engine.runner  # a first step's host copy of q, k, v: who made it, where it lives, that it is q, k, v
    args = (runner.outer, runner.layers[0], np.zeros((8, 1), np.int32), jax.numpy.zeros((8, 1), jax.numpy.int32))
    assert len(runner._first(*args)) == (3 if host_copy == "fused" else 2)  # fused: the step's program copies
    _, (_, qkv, copy) = runner._launch("first", runner._first, *args)
    assert (copy.sharding.memory_kind == "pinned_host") == (host_copy != "pageable")
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(qkv))


def test_pipelined_with_the_numpy_shm_writer_matches_local(servers, local_tokens):
  prompts, want = local_tokens
  with Engine(_config("pipelined", servers, in_flight=3, native_writer=False)) as engine:
    assert not engine.tier2.client.native_writer
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want


def test_pipelined_with_a_short_switch_interval_matches_local_and_restores_it(servers, local_tokens):
  prompts, want = local_tokens
  before = sys.getswitchinterval()
  with Engine(_config("pipelined", servers, in_flight=3, switch_interval_ms=0.2)) as engine:
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want
  assert sys.getswitchinterval() == before


def test_pipelined_auto_in_flight_measures_a_depth(servers, local_tokens):
  prompts, want = local_tokens
  c = _config("pipelined", servers, in_flight=0)
  c.engine.decode_steps_per_call = 1
  with Engine(c) as engine:
    assert [o.token_ids for o in engine.generate(prompts[:3], GREEDY)] == want[:3]
    assert 1 <= engine.runner.depth <= 8
    s = engine.runner.stats  # every step after a micro-batch's first waited for a reply: turnarounds
    assert s.num_turnarounds > 0 and 0 < s.turnaround_s / s.num_turnarounds <= s.max_turnaround_s


def test_spread_split_measures_its_depth_and_interleaves_the_shards(servers, local_tokens):
  prompts, want = local_tokens
  c = _config("pipelined", servers, in_flight=0, split="spread")
  c.engine.decode_steps_per_call = 1
  with Engine(c) as engine:
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want
    assert 1 <= engine.runner.depth <= 8
    busy = engine.runner._servers_busy()  # the depth rule's tier-2 work: each server's busy time
    assert len(busy) == len(servers.split(",")) and busy.max() > 0
  with Tier2Client.for_model(servers.split(","), model_config(c)) as client:
    seqs = np.arange(700, 709)
    client.allocate(seqs)
    ids = np.concatenate([seqs, [-2, -1]])  # a local row and a padding row go last
    order, keys = PipelinedRunner._by_shard(types.SimpleNamespace(client=client), ids, interleave=True)
    shards = [client.shard_of(s) for s in ids[order][:9]]
    assert [sorted(shards[i:i + 3]) for i in (0, 3, 6)] == [[0, 1, 2]] * 3  # each round visits every shard
    assert ids[order][9:].tolist() == [-2, -1]
    assert keys.tolist() == shards + [3, 3]
    # Micro-batches cut from it keep every shard, each shard's rows made contiguous; the rest stay last.
    cuts = [slice(0, 6), slice(6, 11)]
    grouped = ids[order][grouped_within(keys, cuts)]
    assert [client.shard_of(s) for s in grouped[:9]] == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert grouped[9:].tolist() == [-2, -1]
    client.release(seqs)


def test_split_makes_depth_micro_batches():
  def split(depth, real, rows):
    seq_ids = np.concatenate([np.arange(real), np.full(rows - real, -1)])
    return PipelinedRunner._split(types.SimpleNamespace(depth=depth), rows, seq_ids)

  assert [s.stop - s.start for s in split(3, 256, 256)] == [86, 86, 84]  # not 2 of 128
  assert split(2, 3, 4) == [slice(0, 2), slice(2, 4)]  # padding rows go with the last
  assert split(4, 2, 2) == [slice(0, 1), slice(1, 2)]


def test_spread_depth_formula():
  assert spread_depth(0.010, 0.0) == 1
  assert spread_depth(0.0025, 0.020) == 3  # max(k t1, t1 + rtt / k): 22.5, 12.5, 9.2, 10 ms for k = 1..4
  assert spread_depth(0.001, 1.0) == 8  # clamped
  # The busiest server's 18 ms of work per whole batch bounds every k; the fewest micro-batches that reach it
  # (2: 2.5 + 10 ms of one's cycle) win, since each costs every server a call.
  assert spread_depth(0.0025, 0.020, work_s=0.018) == 2
  assert spread_depth(0.0025, 0.020, work_s=0.005) == 3  # little work (latency): as without it


def test_auto_depth_formula():
  assert auto_depth(0.010, 0.0) == 1
  assert auto_depth(0.010, 0.025) == 4  # ceil(35 / 10)
  assert auto_depth(0.001, 1.0) == 8  # clamped


def test_append_only_then_attend_matches_float64_reference(servers):
  cfg = model_config(_config())
  rng = np.random.default_rng(1)
  h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  with Tier2Client.for_model(servers.split(","), cfg, transport="grpc") as client:
    client.allocate([501, 502])
    ref = ReferenceKV()
    ids, pos = [501] * 6 + [502] * 3, list(range(6)) + list(range(3))
    k, v = (rng.standard_normal((9, kv, d)).astype(np.float32) for _ in range(2))
    assert client.append_async(1, ids, pos, k, v).result() is None
    ref.attend(1, ids, pos, np.zeros((9, h, d)), k, v)
    q, k2, v2 = (rng.standard_normal((2, n, d)).astype(np.float32) for n in (h, kv, kv))
    out = client.attend(1, [501, 502], [6, 3], q, k2, v2)
    np.testing.assert_allclose(out, ref.attend(1, [501, 502], [6, 3], q, k2, v2), rtol=1e-5, atol=1e-6)
    with pytest.raises(Tier2Error, match="leaves a gap") as e:
      client.append_async(1, [502], [9], k[:1], v[:1]).result()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    client.release([501, 502])


def test_shm_requests_written_on_shard_threads_match_reference(servers, monkeypatch):
  """Large shared-memory requests are written on the shards' threads (here every one): appends whose tokens
  are grouped by shard (sent as views) or interleaved (gathered), then attention, match float64."""
  monkeypatch.setattr(tier2_client, "THREAD_WRITE_BYTES", 0)
  cfg = model_config(_config())
  rng = np.random.default_rng(2)
  h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  with Tier2Client.for_model(servers.split(","), cfg, transport="shm") as client:
    seqs = [601, 602, 603, 604, 605, 606]
    client.allocate(seqs)
    assert len({client.shard_of(s) for s in seqs}) == 3
    grouped = sorted(seqs, key=client.shard_of)
    ref = ReferenceKV()
    for layer, order in ((0, grouped), (1, seqs)):  # layer 1: shards interleaved
      ids, pos = [s for s in order for _ in range(5)], [p for _ in order for p in range(5)]
      k, v = (rng.standard_normal((len(ids), kv, d)).astype(np.float32) for _ in range(2))
      assert client.append_async(layer, ids, pos, k, v).result() is None
      ref.attend(layer, ids, pos, np.zeros((len(ids), h, d)), k, v)
      q, k2, v2 = (rng.standard_normal((len(seqs), n, d)).astype(np.float32) for n in (h, kv, kv))
      out = client.attend(layer, seqs, [5] * len(seqs), q, k2, v2)
      np.testing.assert_allclose(out, ref.attend(layer, seqs, [5] * len(seqs), q, k2, v2), rtol=1e-5, atol=1e-6)
    client.release(seqs)


def kill_at_first_output(procs, finished: list):
  """An on_output that appends each output to `finished` and kills the server processes `procs` at the first."""
  def on_output(out):
    finished.append(out)
    if len(finished) == 1:
      for p in procs:
        p.process.kill()
        p.process.wait()

  return on_output


@pytest.fixture
def own_servers():
  c = _config()
  procs = start_servers([server_args(c, model_config(c), "")] * 2)
  yield procs
  stop_servers(procs)


@pytest.mark.parametrize("placement", ["pipelined", pytest.param("callback", marks=pytest.mark.slow)])
def test_a_dead_shard_loses_only_its_kv(own_servers, local_tokens, placement):
  prompts, want = local_tokens
  addresses = ",".join(p.address for p in own_servers)
  finished = []
  with Engine(_config(placement, addresses, in_flight=2)) as engine:
    got = engine.generate(prompts, GREEDY, on_output=kill_at_first_output(own_servers[1:], finished))
    assert [o.token_ids for o in got] == want
    assert engine.stats.num_tier2_failovers == 1 and len(finished) == len(prompts)


def test_no_shard_left_is_a_clear_error_and_keeps_finished_outputs(own_servers, local_tokens):
  prompts, want = local_tokens
  finished = []
  with Engine(_config("pipelined", ",".join(p.address for p in own_servers), in_flight=2)) as engine:
    with pytest.raises(Tier2Error, match="no tier-2 shard left"):
      engine.generate(prompts, GREEDY, on_output=kill_at_first_output(own_servers, finished))
  assert 1 <= len(finished) < len(prompts)  # those finished in the step before the kill, all kept
  assert all(o.token_ids == want[int(o.request_id)] for o in finished)


@pytest.mark.parametrize("key,value,message", [
    ("spawn", -1, "tier2.spawn=-1"), ("addresses", "nohost", "tier2.addresses: 'nohost'"),
    ("kv_dtype", "int4", "tier2.kv_dtype='int4'"), ("cpus", "0-3", "tier2.cpus='0-3': 1 core lists"),
    ("transport", "udp", "tier2.transport='udp'"), ("in_flight", 9, "tier2.in_flight=9"),
    ("timeout_s", 0.0, "tier2.timeout_s=0.0"), ("inject_delay_ms", -1.0, "tier2.inject_delay_ms=-1.0"),
    ("split", "rows", "tier2.split='rows'"), ("serve_threads", 0, "tier2.serve_threads=0"),
    ("switch_interval_ms", -1.0, "tier2.switch_interval_ms=-1.0")])
def test_tier2_config_errors_name_the_key(key, value, message):
  c = _config("pipelined")
  c.tier2[key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)


@pytest.mark.parametrize("placement", ["pipelined", pytest.param("callback", marks=pytest.mark.slow)])
def test_a_tier2_pool_smaller_than_every_slot_at_full_length_preempts(local_tokens, placement):
  """One server of 26 pages of 4 tokens (all 4 slots at 64 tokens need 64): the scheduler's budget is
  tier 2's room, so sequences are preempted (their tier-2 KV released) instead of the pool overflowing."""
  prompts, want = local_tokens
  c = _config()
  c.tier2.kv_cache_gb = 5e-5
  procs = start_servers([server_args(c, model_config(c), "")])
  try:
    with Engine(_config(placement, procs[0].address, in_flight=2)) as engine:
      assert engine.num_pages == 26 + 1
      got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
      assert engine.stats.num_preemptions > 0
    assert got == want
    assert _pages_in_use(procs[0].address) == [0]
  finally:
    stop_servers(procs)


def test_a_shard_fuller_than_the_scheduler_knows_preempts_its_newest_sequence(local_tokens):
  """Another client holds 8 of the server's 26 pages: the scheduler's budget (26) overshoots, tier 2
  answers RESOURCE_EXHAUSTED, and the engine preempts instead of failing."""
  prompts, want = local_tokens
  c = _config()
  c.tier2.kv_cache_gb = 5e-5
  procs = start_servers([server_args(c, model_config(c), "")])
  cfg = model_config(c)
  try:
    with Tier2Client.for_model([procs[0].address], cfg) as tenant:
      tenant.allocate([10**6])
      kv = np.zeros((32, cfg.num_kv_heads, cfg.head_dim), np.float32)
      for layer in range(cfg.num_layers):
        tenant.append_async(layer, [10**6] * 32, np.arange(32), kv, kv).result()
      with Engine(_config("pipelined", procs[0].address, in_flight=2)) as engine:
        got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
        assert engine.stats.num_preemptions > 0
      assert got == want
      tenant.release([10**6])
  finally:
    stop_servers(procs)
