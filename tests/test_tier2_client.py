"""Tier2Client against real tier-2 server processes on loopback (3 GQA shards, 1 MHA shard)."""

import threading

import ml_dtypes
import numpy as np
import pytest

from glinthawk_jax import tier2_client
from glinthawk_jax.config import model_config
from glinthawk_jax.tier2_client import (HandshakeError, KVCacheFullError, ShardUnavailableError,
                                        Tier2Client, Tier2Error)
from glinthawk_jax.tier2_slices import SlicedTier2Client
from configs import tiny
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import start_servers, stop_servers

COMMON = ["--config=configs/tiny.py", "--port=0", "--cpus=0", "--kv_dtype=float32"]
CFG = model_config(tiny.get_config())  # 2 layers, 4 heads, 2 KV heads, head dim 16
MHA = dict(num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16)


@pytest.fixture(scope="module")
def servers():
  procs = start_servers([COMMON + ["--kv_cache_gb=0.001"]] * 3 + [
      COMMON + ["--kv_cache_gb=0.0001", "--config.model.num_kv_heads=4"],
      ["--config=configs/tiny.py", "--port=0", "--cpus=0", "--kv_cache_gb=0.001"]])
  yield [p.address for p in procs]
  stop_servers(procs)


@pytest.fixture
def gqa(servers):
  with Tier2Client.for_model(servers[:3], CFG, timeout_s=30) as client:
    yield client


def _run(client, ref, rng, layer_steps, dtype=np.float32, **tol):
  """Sends each (seq_ids, positions) step through every layer; compares with the reference."""
  h, kv, d = client.num_heads, client.num_kv_heads, client.head_dim
  for seq_ids, positions in layer_steps:
    n = len(seq_ids)
    q, k, v = (rng.standard_normal((n, heads, d)).astype(dtype) for heads in (h, kv, kv))
    for layer in range(client.layers[1]):
      out = client.attend(layer, seq_ids, positions, q, k, v)
      assert out.dtype == dtype and out.shape == (n, h, d)
      expected = ref.attend(layer, seq_ids, positions, q.astype(np.float32), k.astype(np.float32),
                            v.astype(np.float32))
      np.testing.assert_allclose(out.astype(np.float64), expected, **tol)


def _prefill_then_decode(seqs, lengths, decode_steps):
  """A batched prefill of every prompt (mixed lengths, interleaved), then decode steps."""
  seq_ids = [s for s, n in zip(seqs, lengths) for _ in range(n)]
  positions = [p for n in lengths for p in range(n)]
  order = np.random.default_rng(9).permutation(len(seq_ids))  # tokens need not be grouped
  steps = [([seq_ids[i] for i in order], [positions[i] for i in order])]
  steps += [(list(seqs), [n + t for n in lengths]) for t in range(decode_steps)]
  return steps


def test_gqa_over_three_shards_matches_float64_reference(gqa):
  seqs = [3, 17, 4, 99, 5, 6]
  shards = gqa.allocate(seqs, expected_tokens=40)
  assert sorted(shards) == [0, 0, 1, 1, 2, 2]  # spread by free KV
  _run(gqa, ReferenceKV(), np.random.default_rng(0), _prefill_then_decode(seqs, [1, 7, 16, 17, 33, 40], 3),
       rtol=1e-5, atol=1e-6)
  stats = gqa.stats()
  assert [row["num_sequences"] for row in stats] == [2, 2, 2]
  assert sum(row["tokens_served"] for row in stats) == 2 * (114 + 3 * 6)
  assert all(0 < row["kernel_seconds"] <= row["busy_seconds"] for row in stats)  # the pool's part of serving
  gqa.release(seqs)
  assert [row["pages_in_use"] for row in gqa.stats()] == [0, 0, 0]


def test_mha_matches_float64_reference(servers):
  with Tier2Client(servers[3:4], **MHA) as client:
    client.allocate([1, 2])
    _run(client, ReferenceKV(), np.random.default_rng(1), _prefill_then_decode([1, 2], [5, 30], 2),
         rtol=1e-5, atol=1e-6)
    client.release([1, 2])


def test_bfloat16_transport_and_storage(servers):
  with Tier2Client.for_model(servers[4:5], CFG) as client:
    client.allocate([1, 2])
    _run(client, ReferenceKV(), np.random.default_rng(2), _prefill_then_decode([1, 2], [9, 20], 2),
         dtype=ml_dtypes.bfloat16, rtol=0.05, atol=0.05)
    client.release([1, 2])


def test_full_pool_raises_kv_cache_full_and_release_frees(servers):
  with Tier2Client(servers[3:4], **MHA) as client:  # 6 pages of 16 tokens
    client.allocate([1])
    q = np.zeros((100, 4, 16), np.float32)
    with pytest.raises(KVCacheFullError, match=servers[3]):
      client.attend(0, [1] * 100, range(100), q, q, q)
    client.release([1])
    client.allocate([2])
    assert client.attend(0, [2] * 96, range(96), q[:96], q[:96], q[:96]).shape == (96, 4, 16)
    client.release([2])


def test_concurrent_clients_get_their_own_answers(servers):
  errors = []

  def worker(index):
    try:
      with Tier2Client.for_model(servers[:3], CFG) as client:
        seqs = [1000 * (index + 1) + j for j in range(3)]
        client.allocate(seqs)
        _run(client, ReferenceKV(), np.random.default_rng(10 + index),
             _prefill_then_decode(seqs, [3, 8, 12], 4), rtol=1e-5, atol=1e-6)
        client.release(seqs)
    except Exception as e:  # noqa: BLE001 (re-raised in the main thread)
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors


def test_async_futures_overlap(gqa):
  gqa.allocate([1, 2, 3])
  q = np.ones((3, 4, 16), np.float32)
  k = np.ones((3, 2, 16), np.float32)
  pending = [gqa.attend_async(layer, [1, 2, 3], [0, 0, 0], q, k, k * layer) for layer in range(2)]
  for layer, future in enumerate(pending):
    np.testing.assert_allclose(future.result(timeout=30), layer * np.ones((3, 4, 16)), rtol=1e-6)
  gqa.release([1, 2, 3])


@pytest.mark.parametrize("on_shard_threads", [False, True])
def test_reply_timings_count_the_calls_over_several_shards(gqa, monkeypatch, on_shard_threads):
  if on_shard_threads:  # every request written on its shard's thread, as large ones are
    monkeypatch.setattr(tier2_client, "THREAD_WRITE_BYTES", 0)
  shards = gqa.allocate([1, 2, 3, 4])
  one_shard = [s for s in (1, 2, 3, 4) if gqa.shard_of(s) == shards[0]]
  q, k = np.ones((4, 4, 16), np.float32), np.ones((4, 2, 16), np.float32)
  gqa.attend(0, [1, 2, 3, 4], [0] * 4, q, k, k)  # two or three shards
  gqa.attend(1, [1, 2, 3, 4], [0] * 4, q, k, k)
  t = gqa.timings()
  assert t["spread"].count == 2 and 0 < t["spread"].total_s <= 2 * t["spread"].max_s
  assert gqa.transports == ["shm"] * 3  # loopback servers: each reply read after the server sent it
  assert t["lag"].count >= 4 and 0 < t["lag"].total_s <= t["lag"].count * t["lag"].max_s
  assert t["server_spread"].count == 2 and 0 < t["server_spread"].total_s <= 2 * t["server_spread"].max_s
  late = gqa.server_lateness()  # per call, the first server is 0 late and the last by the call's spread
  touched = [d for d in late if d.count]
  assert len(touched) >= 2 and all(d.count == 2 for d in touched)
  assert max(d.max_s for d in late) == t["server_spread"].max_s
  recent = gqa.recent_spreads(5)  # both calls, oldest first: the replies read, the servers'
  assert recent.shape == (2, 2) and recent[:, 0].sum() == pytest.approx(t["spread"].total_s)
  assert recent[:, 1].sum() == pytest.approx(t["server_spread"].total_s)
  n = len(one_shard)
  gqa.attend(0, one_shard, [1] * n, q[:n], k[:n], k[:n])  # one shard: nothing to wait for
  assert gqa.timings()["spread"].count == 2 and len(gqa.recent_spreads(5)) == 2
  gqa.release([1, 2, 3, 4])


def test_attend_writes_into_a_given_larger_buffer(gqa):
  gqa.allocate([1, 2, 3])
  q, k = np.ones((3, 4, 16), np.float32), np.ones((3, 2, 16), np.float32)
  out = np.full((5, 4, 16), 7.0, np.float32)  # rows 3 and 4: a caller's padding, left alone
  assert gqa.attend_async(0, [1, 2, 3], [0, 0, 0], q, k, 2 * k, out=out).result(timeout=30) is out
  np.testing.assert_allclose(out[:3], 2.0, rtol=1e-6)
  np.testing.assert_array_equal(out[3:], 7.0)
  for bad in (np.empty((2, 4, 16), np.float32), np.empty((3, 4, 8), np.float32), np.empty((3, 4, 16), np.float64)):
    with pytest.raises(ValueError, match="out: "):
      gqa.attend_async(1, [1, 2, 3], [0, 0, 0], q, k, k, out=bad)
  gqa.release([1, 2, 3])


def test_sliced_client_sums_its_fleets_timings(servers):
  with Tier2Client.for_model(servers[:2], CFG) as first, Tier2Client.for_model(servers[2:3], CFG) as second:
    sliced = SlicedTier2Client([first, second], layers_per_slice=1)  # layer 0 on two shards, layer 1 on one
    sliced.allocate([1, 2])
    assert sorted(first.shard_of(s) for s in (1, 2)) == [0, 1]
    q, k = np.ones((2, 4, 16), np.float32), np.ones((2, 2, 16), np.float32)
    for layer in (0, 1):
      sliced.attend(layer, [1, 2], [0, 0], q, k, k)
    t = sliced.timings()
    assert t["spread"].count == t["server_spread"].count == 1 and t["lag"].count == 3
    assert t["lag"].max_s == max(first.timings()["lag"].max_s, second.timings()["lag"].max_s)
    assert [d.count for d in sliced.server_lateness()] == [1, 1, 0]
    sliced.release([1, 2])


def test_errors_are_typed_and_name_the_server(servers):
  with pytest.raises(HandshakeError, match="num_kv_heads"):
    Tier2Client(servers[:1], **MHA)
  with pytest.raises(ShardUnavailableError, match="127.0.0.1:1"):
    Tier2Client(["127.0.0.1:1"], **MHA, timeout_s=5)
  with Tier2Client.for_model(servers[:1], CFG) as client:
    client.allocate([1])
    q = np.zeros((1, 4, 16), np.float32)
    k = np.zeros((1, 2, 16), np.float32)
    with pytest.raises(Tier2Error, match="OUT_OF_RANGE"):
      client.attend(5, [1], [0], q, k, k)
    with pytest.raises(ValueError, match="sequence 7"):
      client.attend_async(0, [7], [0], q, k, k)
    with pytest.raises(ValueError, match="q: shape"):
      client.attend_async(0, [1], [0], k, k, k)
    client.release([1])
