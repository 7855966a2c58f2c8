"""A real tier-2 server process on loopback, spoken to with raw gRPC: statuses and recovery."""

import time

import grpc
import ml_dtypes
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glinthawk_jax.protos import tensor_wire, tier2_pb2, tier2_pb2_grpc
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import start_servers, stop_servers
from tier2_cpu.rpc_bench import rpc_rows

# configs/tiny.py: 2 layers, 4 heads, 2 KV heads, head dim 16, page size 16, max_model_len 256.
H, KV, D, LAYERS = 4, 2, 16, 2
# 0.0002 GiB / (16 tokens * 2 layers * 2 KV heads * 16 dims * 2 (K, V) * 4 bytes) = 26 pages.
NUM_PAGES = 26
COMMON = ["--config=configs/tiny.py", "--port=0", "--cpus=0", "--kv_dtype=float32"]


@pytest.fixture(scope="module")
def servers():
  procs = start_servers([COMMON + ["--kv_cache_gb=0.0002"],
                         COMMON + ["--kv_cache_gb=0.001", "--layers=1-1", "--auth_token=s3cret",
                                   "--inject_delay_ms=100"]])
  yield [p.address for p in procs]
  stop_servers(procs)


@pytest.fixture(scope="module")
def channel(servers):
  with grpc.insecure_channel(servers[0]) as ch:
    yield ch


def _handshake_request(**changes):
  dims = dict(num_layers=LAYERS, num_heads=H, num_kv_heads=KV, head_dim=D)
  layers = changes.pop("layers", (0, LAYERS))
  version = changes.pop("protocol_version", tensor_wire.PROTOCOL_VERSION)
  dims.update(changes)
  return tier2_pb2.HandshakeRequest(protocol_version=version, model=tier2_pb2.ModelDims(**dims),
                                    first_layer=layers[0], end_layer=layers[1])


def _tokens(rng, seq_ids, positions, dtype=np.float32):
  n = len(seq_ids)
  return (rng.standard_normal((n, H, D)).astype(dtype), rng.standard_normal((n, KV, D)).astype(dtype),
          rng.standard_normal((n, KV, D)).astype(dtype))


def _attend(channel, payload, metadata=None):
  return channel.unary_unary(tensor_wire.ATTEND_METHOD)(payload, timeout=30, metadata=metadata)


def _code(fn):
  with pytest.raises(grpc.RpcError) as info:
    fn()
  return info.value.code()


def test_handshake_reports_the_pool(channel):
  reply = tier2_pb2_grpc.Tier2Stub(channel).Handshake(_handshake_request(), timeout=10)
  assert (reply.first_layer, reply.end_layer, reply.page_size) == (0, LAYERS, 16)
  assert reply.num_pages == NUM_PAGES and reply.kv_dtype == "float32" and reply.max_seq_len == 256


@pytest.mark.parametrize("change", [dict(num_heads=8), dict(num_kv_heads=4), dict(head_dim=32),
                                    dict(num_layers=3), dict(layers=(1, 2)), dict(protocol_version=9)])
def test_handshake_mismatch_is_failed_precondition(channel, change):
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  assert _code(lambda: stub.Handshake(_handshake_request(**change), timeout=10)) == \
      grpc.StatusCode.FAILED_PRECONDITION


def test_health_service_serves(servers):
  for address in servers:  # the token-checked server leaves health open
    with grpc.insecure_channel(address) as ch:
      reply = health_pb2_grpc.HealthStub(ch).Check(
          health_pb2.HealthCheckRequest(service="glinthawk.tier2.Tier2"), timeout=10)
      assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_prefill_then_decode_matches_reference(channel):
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[10, 11]), timeout=10)
  rng, ref = np.random.default_rng(0), ReferenceKV()
  # Prefill 20 and 5 tokens in one request, then 3 decode steps of both.
  steps = [([10] * 20 + [11] * 5, list(range(20)) + list(range(5)))]
  steps += [([10, 11], [20 + t, 5 + t]) for t in range(3)]
  for seq_ids, positions in steps:
    q, k, v = _tokens(rng, seq_ids, positions)
    for layer in range(LAYERS):
      payload = tensor_wire.encode_request(1, layer, seq_ids, positions, q, k, v)
      out = tensor_wire.decode_reply(_attend(channel, payload), q.shape, np.float32)
      np.testing.assert_allclose(out, ref.attend(layer, seq_ids, positions, q, k, v), rtol=1e-5,
                                 atol=1e-6)
  stats = stub.Stats(tier2_pb2.StatsRequest(), timeout=10)
  assert stats.num_sequences == 2 and stats.pages_in_use == 2 + 1
  assert stats.kv_bytes_in_use == 3 * stats.kv_bytes_capacity // NUM_PAGES
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[10, 11]), timeout=10)
  assert stub.Stats(tier2_pb2.StatsRequest(), timeout=10).pages_in_use == 0


def test_token_order_and_repeated_sequences_match_reference(channel):
  """Each sequence once in order (the call the server does not sort), descending, interleaved and out
  of position order, or a sequence several times: all give the float64 reference, float32 and bf16."""
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[20, 21, 22]), timeout=10)
  rng, ref = np.random.default_rng(5), ReferenceKV()
  steps = [([21, 20, 21, 22, 20, 22, 21, 20], [1, 2, 0, 0, 0, 1, 2, 1], np.float32),
           ([20, 21, 22], [3, 3, 2], np.float32), ([20, 21, 22], [4, 4, 3], ml_dtypes.bfloat16),
           ([22, 21, 20], [4, 5, 5], ml_dtypes.bfloat16), ([20, 22, 20, 21], [7, 5, 6, 6], np.float32)]
  for seq_ids, positions, dtype in steps:
    q, k, v = _tokens(rng, seq_ids, positions, dtype)
    payload = tensor_wire.encode_request(3, 1, seq_ids, positions, q, k, v)
    out = tensor_wire.decode_reply(_attend(channel, payload), q.shape, dtype).astype(np.float32)
    tol = 1e-5 if dtype == np.float32 else 1e-2  # a bf16 reply is rounded to 8 bits of mantissa
    np.testing.assert_allclose(out, ref.attend(1, seq_ids, positions, q, k, v), rtol=tol, atol=tol)
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[20, 21, 22]), timeout=10)
  # Fresh sequences on the released block-table rows, past a page: many tokens a sequence, then one each.
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[23, 24, 25]), timeout=10)
  chunk = [s for s in (23, 24, 25) for _ in range(18)], [p for _ in range(3) for p in range(18)]
  for seq_ids, positions in (chunk, ([23, 24, 25], [18, 18, 18])):
    q, k, v = _tokens(rng, seq_ids, positions)
    payload = tensor_wire.encode_request(4, 1, seq_ids, positions, q, k, v)
    out = tensor_wire.decode_reply(_attend(channel, payload), q.shape, np.float32)
    np.testing.assert_allclose(out, ref.attend(1, seq_ids, positions, q, k, v), rtol=1e-5, atol=1e-5)
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[23, 24, 25]), timeout=10)


def _good_payload(rng, seq=1, position=0):
  q, k, v = _tokens(rng, [seq], [position])
  return tensor_wire.encode_request(7, 0, [seq], [position], q, k, v)


def _patched_header(payload, **fields):
  names = ("magic", "version", "dtype", "request_id", "layer", "n", "h", "kv", "d")
  values = dict(zip(names, tensor_wire.HEADER.unpack_from(payload)))
  values.update(fields)
  return tensor_wire.HEADER.pack(*values.values()) + payload[tensor_wire.HEADER.size:]


BAD = {
    "truncated header": (lambda p: p[:10], grpc.StatusCode.INVALID_ARGUMENT),
    "truncated body": (lambda p: p[:-4], grpc.StatusCode.INVALID_ARGUMENT),
    "extra bytes": (lambda p: p + b"\0" * 4, grpc.StatusCode.INVALID_ARGUMENT),
    "bad magic": (lambda p: _patched_header(p, magic=b"XXXX"), grpc.StatusCode.INVALID_ARGUMENT),
    "bad version": (lambda p: _patched_header(p, version=tensor_wire.PROTOCOL_VERSION + 1),
                    grpc.StatusCode.INVALID_ARGUMENT),
    "bad dtype": (lambda p: _patched_header(p, dtype=9), grpc.StatusCode.INVALID_ARGUMENT),
    "zero tokens": (lambda p: _patched_header(p, n=0), grpc.StatusCode.INVALID_ARGUMENT),
    "negative heads": (lambda p: _patched_header(p, h=-4), grpc.StatusCode.INVALID_ARGUMENT),
    "layer too high": (lambda p: _patched_header(p, layer=LAYERS), grpc.StatusCode.OUT_OF_RANGE),
    "layer negative": (lambda p: _patched_header(p, layer=-1), grpc.StatusCode.OUT_OF_RANGE),
}


def _wrong_heads(rng):
  q = rng.standard_normal((1, 2 * H, D)).astype(np.float32)
  k = rng.standard_normal((1, KV, D)).astype(np.float32)
  return tensor_wire.encode_request(0, 0, [1], [0], q, k, k)


def _request(rng, seq_ids, positions):
  return tensor_wire.encode_request(0, 0, seq_ids, positions, *_tokens(rng, seq_ids, positions))


BAD_REQUESTS = {
    "wrong head count": (_wrong_heads, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown sequence": (lambda rng: _request(rng, [99], [0]), grpc.StatusCode.NOT_FOUND),
    "position past max_model_len": (lambda rng: _request(rng, [1], [256]), grpc.StatusCode.OUT_OF_RANGE),
    "negative position": (lambda rng: _request(rng, [1], [-1]), grpc.StatusCode.OUT_OF_RANGE),
    "position gap": (lambda rng: _request(rng, [1], [5]), grpc.StatusCode.INVALID_ARGUMENT),
    "duplicate position": (lambda rng: _request(rng, [1, 1], [0, 0]), grpc.StatusCode.INVALID_ARGUMENT),
}


def test_bad_requests_get_their_status_and_the_server_keeps_serving(channel):
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[1]), timeout=10)
  rng = np.random.default_rng(1)
  cases = [(name, corrupt(_good_payload(rng)), code) for name, (corrupt, code) in BAD.items()]
  cases += [(name, make(rng), code) for name, (make, code) in BAD_REQUESTS.items()]
  for name, payload, code in cases:
    assert _code(lambda: _attend(channel, payload)) == code, name
    assert len(_attend(channel, _good_payload(rng))) == H * D * 4, f"after {name}"
  assert _code(lambda: stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[1]), timeout=10)) == \
      grpc.StatusCode.ALREADY_EXISTS
  assert _code(lambda: stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[1, 42]), timeout=10)) == \
      grpc.StatusCode.NOT_FOUND
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[1]), timeout=10)  # the failed release kept it


def test_full_pool_is_resource_exhausted_and_release_frees(channel):
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  rng = np.random.default_rng(2)
  seqs = list(range(100, 100 + NUM_PAGES // 16 + 1))
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=seqs), timeout=10)
  for s in seqs[:-1]:  # 16 pages each: 256 tokens
    _attend(channel, _request(rng, [s] * 256, list(range(256))))
  used = stub.Stats(tier2_pb2.StatsRequest(), timeout=10).pages_in_use
  assert used == 16 * len(seqs[:-1])
  big = _request(rng, [seqs[-1]] * 256, list(range(256)))
  assert _code(lambda: _attend(channel, big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert stub.Stats(tier2_pb2.StatsRequest(), timeout=10).pages_in_use == used  # nothing taken
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=seqs[:-1]), timeout=10)
  assert len(_attend(channel, big)) == 256 * H * D * 4
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=seqs[-1:]), timeout=10)


def test_more_sequences_than_pages_is_resource_exhausted(channel):
  stub = tier2_pb2_grpc.Tier2Stub(channel)
  too_many = list(range(5000, 5000 + NUM_PAGES + 1))
  assert _code(lambda: stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=too_many), timeout=10)) == \
      grpc.StatusCode.RESOURCE_EXHAUSTED
  assert stub.Stats(tier2_pb2.StatsRequest(), timeout=10).num_sequences == 0  # nothing registered
  stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=too_many[:-1]), timeout=10)
  stub.Release(tier2_pb2.ReleaseRequest(seq_ids=too_many[:-1]), timeout=10)


def test_token_layer_range_and_injected_delay(servers):
  rng = np.random.default_rng(3)
  with grpc.insecure_channel(servers[1]) as ch:
    stub = tier2_pb2_grpc.Tier2Stub(ch)
    good = [("glinthawk-token", "s3cret")]
    for metadata in (None, [("glinthawk-token", "wrong")]):
      assert _code(lambda: stub.Stats(tier2_pb2.StatsRequest(), timeout=10, metadata=metadata)) == \
          grpc.StatusCode.UNAUTHENTICATED
      assert _code(lambda: _attend(ch, _good_payload(rng), metadata)) == grpc.StatusCode.UNAUTHENTICATED
    stub.Handshake(_handshake_request(layers=(1, 2)), timeout=10, metadata=good)
    stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[5]), timeout=10, metadata=good)
    assert _code(lambda: _attend(ch, _good_payload(rng, seq=5), good)) == grpc.StatusCode.OUT_OF_RANGE
    q, k, v = _tokens(rng, [5], [0])
    start = time.perf_counter()
    reply = _attend(ch, tensor_wire.encode_request(0, 1, [5], [0], q, k, v), good)
    assert time.perf_counter() - start >= 0.1
    # One key: the output is v itself, each query head reading its KV head.
    np.testing.assert_allclose(tensor_wire.decode_reply(reply, q.shape, np.float32),
                               np.repeat(v, H // KV, axis=1), rtol=1e-6)


def test_rpc_rows_measure_echo(servers):
  rows = rpc_rows([16, 1 << 20], repeats=3, address=servers[0])
  assert [row["payload_bytes"] for row in rows] == [16, 1 << 20]
  assert all(0 < row["round_trip_ms_p50"] <= row["round_trip_ms_p90"] and row["mb_per_s"] > 0
             for row in rows)


def test_binding_beyond_loopback_needs_a_token():
  from tier2_cpu.server import ServerOptions, build_server  # noqa: PLC0415 (imports jax)
  with pytest.raises(ValueError, match="auth_token"):
    build_server(ServerOptions(num_layers=LAYERS, num_heads=H, num_kv_heads=KV, head_dim=D,
                               host="0.0.0.0"))
