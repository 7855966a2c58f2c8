"""Shared-memory tensor transport against real tier-2 server processes on loopback."""

import ctypes
import os
import socket
import subprocess
import sys
import time

import grpc
import ml_dtypes
import numpy as np
import pytest

from glinthawk_jax.protos import shm_session, shm_wire, tensor_wire, tier2_pb2, tier2_pb2_grpc
from glinthawk_jax.protos.shm_session import ShmSession
from glinthawk_jax.tier2_client import ShardUnavailableError, Tier2Client, Tier2Error
from tests.test_tier2_server import BAD, BAD_REQUESTS, _good_payload
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import REPO_ROOT, start_servers, stop_servers
from tier2_cpu.rpc_bench import rpc_rows

DIMS = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)  # configs/tiny.py
COMMON = ["--config=configs/tiny.py", "--port=0", "--cpus=0", "--kv_dtype=float32",
          "--kv_cache_gb=0.001"]
DELAY_MS = 150


@pytest.fixture(scope="module")
def servers():
  """Shared memory on; on with a delay per call; off."""
  procs = start_servers([COMMON, COMMON + [f"--inject_delay_ms={DELAY_MS}"], COMMON + ["--shm=false"]])
  yield [p.address for p in procs]
  stop_servers(procs)


def _files_of(pid: int) -> list[str]:
  return [f for f in os.listdir(shm_wire.SHM_DIR) if f.startswith(f"gt2shm-{pid:x}-")]


def _shm_sessions(address: str) -> int:
  with grpc.insecure_channel(address) as ch:
    return tier2_pb2_grpc.Tier2Stub(ch).Stats(tier2_pb2.StatsRequest(), timeout=10).shm_sessions


def test_transport_negotiation(servers):
  on, _, off = servers
  for transport, address, expected in (("auto", on, "shm"), ("auto", off, "grpc"), ("grpc", on, "grpc"),
                                       ("shm", on, "shm")):
    with Tier2Client([address], **DIMS, transport=transport) as client:
      assert client.transports == [expected], (transport, address)
  with pytest.raises(Tier2Error, match="--shm=false"):
    Tier2Client([off], **DIMS, transport="shm")
  with pytest.raises(ValueError, match="transport='udp'"):
    Tier2Client([on], **DIMS, transport="udp")


@pytest.mark.parametrize("writer", ["native", "python"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_shm_is_bit_identical_to_grpc(servers, dtype, writer):
  """Same inputs to twin sequences over both transports; slots start small and must grow. q, k, v are
  views of one array (strided rows, as the pipelined runner sends them), written by shm_ring.cc or by
  NumPy (tier2.native_writer=False, or no g++)."""
  assert shm_session.native_writer() is not None  # g++ is there: "native" is the native writer
  clients = [Tier2Client([servers[0]], **DIMS, transport=t, shm_slot_bytes=4096, native_writer=writer == "native")
             for t in ("grpc", "shm")]
  try:
    assert [c.transports for c in clients] == [["grpc"], ["shm"]]
    base = (100 if dtype == np.float32 else 200) + (50 if writer == "python" else 0)
    seqs = [[base + 1, base + 2], [base + 11, base + 12]]  # grpc's, shm's
    for client, mine in zip(clients, seqs):
      client.allocate(mine)
    rng, ref = np.random.default_rng(0), ReferenceKV()
    steps = [([0] * 40 + [1] * 7, list(range(40)) + list(range(7)))]  # prefill: 15 KiB of q, k, v
    steps += [([0, 1], [40 + t, 7 + t]) for t in range(3)]
    for which, positions in steps:
      n = len(which)
      qkv = rng.standard_normal((n, 4 + 2 + 2, 16)).astype(dtype)
      q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
      for layer in range(2):
        outs = [c.attend(layer, np.asarray(mine)[which], positions, q, k, v)
                for c, mine in zip(clients, seqs)]
        assert outs[0].dtype == outs[1].dtype == dtype
        np.testing.assert_array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8))
        expected = ref.attend(layer, which, positions, *(x.astype(np.float32) for x in (q, k, v)))
        tol = 1e-5 if dtype == np.float32 else 0.05
        np.testing.assert_allclose(outs[1].astype(np.float64), expected, rtol=tol, atol=tol)
    assert clients[1].shards[0].shm.num_slots == 1  # blocking calls reuse one slot
    for client, mine in zip(clients, seqs):
      client.release(mine)
  finally:
    for client in clients:
      client.close()


def _status(fn):
  try:
    fn()
  except grpc.RpcError as e:
    return e.code()
  return grpc.StatusCode.OK


def test_bad_inputs_get_the_grpc_statuses_and_the_server_keeps_serving(servers):
  """Every malformed request of test_tier2_server, sent over both transports."""
  with grpc.insecure_channel(servers[0]) as ch:
    stub = tier2_pb2_grpc.Tier2Stub(ch)
    stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[1]), timeout=10)
    attend = ch.unary_unary(tensor_wire.ATTEND_METHOD)
    session = ShmSession(stub, None, 10)
    over_shm = lambda p: session.call(shm_wire.ATTEND, [np.frombuffer(p, np.uint8)], 4096, 10).result()
    rng = np.random.default_rng(1)
    cases = [(name, corrupt(_good_payload(rng)), code) for name, (corrupt, code) in BAD.items()]
    cases += [(name, make(rng), code) for name, (make, code) in BAD_REQUESTS.items()]
    for name, payload, code in cases:
      assert _status(lambda: over_shm(payload)) == _status(lambda: attend(payload, timeout=10)) == code, name
      assert len(over_shm(_good_payload(rng))) == 4 * 16 * 4, f"after {name}"
    assert session.num_slots == 1  # a failed call frees its slot

    good = _good_payload(rng)
    raw = _RawDoorbell(stub)
    shm_only = {
        "unknown session": (shm_wire.NOTIFY.pack(raw.session ^ 1, 0, shm_wire.ATTEND, len(good)),
                            grpc.StatusCode.FAILED_PRECONDITION),
        "unknown slot": (shm_wire.NOTIFY.pack(raw.session, 7, shm_wire.ATTEND, len(good)),
                         grpc.StatusCode.FAILED_PRECONDITION),
        "bad op": (shm_wire.NOTIFY.pack(raw.session, 0, 9, len(good)), grpc.StatusCode.INVALID_ARGUMENT),
        "request past the region": (shm_wire.NOTIFY.pack(raw.session, 0, shm_wire.ATTEND, 1 << 30),
                                    grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (message, code) in shm_only.items():
      assert raw.ring(message) == code, name
    raw.close()
    bad_names = [("../etc/passwd", 4096), ("gt2shm-1-1-0-0", 4096)]  # not a region name; no such file
    for name, size in bad_names:
      request = tier2_pb2.ShmAttachRequest(session=5, slot=0, name=name, size=size, client_pid=os.getpid())
      assert _status(lambda: stub.ShmAttach(request, timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION

    session.close()

    # A slot with room for the request but not the reply: refused before any KV is written.
    small = ShmSession(stub, None, 10, slot_bytes=shm_wire.reply_offset(len(good)) + 8)
    stub.Allocate(tier2_pb2.AllocateRequest(seq_ids=[2]), timeout=10)
    before = stub.Stats(tier2_pb2.StatsRequest(), timeout=10)
    payload = np.frombuffer(_good_payload(rng, seq=2), np.uint8)
    assert _status(lambda: small.call(shm_wire.ATTEND, [payload], 0, 10).result()) == \
        grpc.StatusCode.INVALID_ARGUMENT
    after = stub.Stats(tier2_pb2.StatsRequest(), timeout=10)
    assert (after.pages_in_use, after.tokens_served) == (before.pages_in_use, before.tokens_served)
    assert len(small.call(shm_wire.ATTEND, [payload], 4 * 16 * 4, 10).result()) == 4 * 16 * 4  # grows
    small.close()
    stub.Release(tier2_pb2.ReleaseRequest(seq_ids=[1, 2]), timeout=10)


class _RawDoorbell:
  """A session of one slot rung by hand: raw NOTIFY messages in, REPLY statuses out."""

  def __init__(self, stub, session=None):
    self.session = session or int.from_bytes(os.urandom(7), "little")
    self.region = shm_wire.Region(shm_wire.region_name(os.getpid(), self.session, 0, 0), 4096, create=True)
    try:
      self.doorbell = stub.ShmAttach(tier2_pb2.ShmAttachRequest(
          session=self.session, slot=0, name=self.region.name, size=4096, client_pid=os.getpid()),
          timeout=10).doorbell
    finally:
      self.region.unlink()
    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self.sock.settimeout(10)
    self.sock.connect(shm_wire.doorbell_address(self.doorbell))
    assert self.ring(shm_wire.HELLO.pack(self.session)) == grpc.StatusCode.OK

  def ring(self, message: bytes) -> grpc.StatusCode:
    self.sock.sendall(message)
    _, status, size, sent_at = shm_wire.REPLY.unpack(shm_wire.recv_exact(self.sock, shm_wire.REPLY.size))
    assert 0 <= time.monotonic() - sent_at < 30  # the server's clock is this host's monotonic clock
    if status:
      shm_wire.recv_exact(self.sock, size)  # the error message
    return {c.value[0]: c for c in grpc.StatusCode}[status]

  def close(self):
    self.sock.close()


HELLO_FROM_ANOTHER_PROCESS = """
import socket, sys
from glinthawk_jax.protos import shm_wire
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(shm_wire.doorbell_address(sys.argv[1]))
sock.sendall(shm_wire.HELLO.pack(int(sys.argv[2])))
print(shm_wire.REPLY.unpack(shm_wire.recv_exact(sock, shm_wire.REPLY.size))[1])
"""


def test_doorbell_serves_only_the_process_that_attached_the_session(servers):
  with grpc.insecure_channel(servers[0]) as ch:
    stub = tier2_pb2_grpc.Tier2Stub(ch)
    raw = _RawDoorbell(stub)
    for session, code in ((raw.session, grpc.StatusCode.PERMISSION_DENIED),
                          (raw.session ^ 1, grpc.StatusCode.FAILED_PRECONDITION)):
      child = subprocess.run([sys.executable, "-c", HELLO_FROM_ANOTHER_PROCESS, raw.doorbell, str(session)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                             env={**os.environ, "PYTHONPATH": REPO_ROOT})
      assert child.stdout.strip() == str(code.value[0]), child.stderr
    assert raw.ring(shm_wire.NOTIFY.pack(raw.session, 0, shm_wire.ECHO, 16)) == grpc.StatusCode.OK
    raw.close()


def test_shm_off_refuses_regions(servers):
  with grpc.insecure_channel(servers[2]) as ch:
    with pytest.raises(grpc.RpcError) as info:
      ShmSession(tier2_pb2_grpc.Tier2Stub(ch), None, 10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert _files_of(os.getpid()) == []


def test_several_requests_in_flight(servers):
  """Against a server that sleeps DELAY_MS per call: 4 overlapping calls need 4 slots."""
  with Tier2Client([servers[1]], **DIMS, transport="shm") as client:
    client.allocate([1, 2, 3, 4])
    rng, ref = np.random.default_rng(4), ReferenceKV()
    inputs = [(rng.standard_normal((3, 4, 16)).astype(np.float32),
               rng.standard_normal((3, 2, 16)).astype(np.float32),
               rng.standard_normal((3, 2, 16)).astype(np.float32)) for _ in range(4)]
    start = time.perf_counter()
    pending = [client.attend_async(i % 2, [i + 1] * 3, [0, 1, 2], *x) for i, x in enumerate(inputs)]
    outs = [f.result(timeout=30) for f in pending]
    assert time.perf_counter() - start < 3.5 * DELAY_MS / 1000  # they overlapped
    assert client.shards[0].shm.num_slots == 4
    for i, (x, out) in enumerate(zip(inputs, outs)):
      np.testing.assert_allclose(out, ref.attend(i % 2, [i + 1] * 3, [0, 1, 2], *x), rtol=1e-5, atol=1e-6)
    client.release([1, 2, 3, 4])


def test_a_late_reply_fails_at_the_deadline_and_its_slot_is_not_reused(servers):
  with Tier2Client([servers[1]], **DIMS, transport="shm") as client:
    client.allocate([5])
    q = np.ones((1, 4, 16), np.float32)
    k = np.ones((1, 2, 16), np.float32)
    start = time.perf_counter()
    with pytest.raises(ShardUnavailableError, match="DEADLINE_EXCEEDED"):
      client.attend(0, [5], [0], q, k, k, timeout_s=DELAY_MS / 1000 / 3)
    assert time.perf_counter() - start < DELAY_MS / 1000  # failed at the deadline, not at the reply
    time.sleep(DELAY_MS / 1000)  # the late reply arrives and is dropped
    np.testing.assert_allclose(client.attend(1, [5], [0], q, k, k), np.ones((1, 4, 16)), rtol=1e-6)
    assert client.shards[0].shm.num_slots == 2  # the expired call's slot stayed out of use
    client.release([5])


CRASHING_CLIENT = """
import os, signal, sys
from glinthawk_jax.tier2_client import Tier2Client
client = Tier2Client([sys.argv[1]], num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     transport="shm")
print(os.getpid(), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_regions_are_cleaned_up_on_close_and_after_a_crash(servers):
  address = servers[0]
  before = _shm_sessions(address)
  with Tier2Client([address], **DIMS, transport="shm") as client:
    assert _shm_sessions(address) == before + 1
    assert _files_of(os.getpid()) == []  # names go as soon as the server has mapped them
  assert _shm_sessions(address) == before
  client.close()  # a second close is harmless
  child = subprocess.Popen([sys.executable, "-c", CRASHING_CLIENT, address], cwd=REPO_ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": REPO_ROOT})
  pid = int(child.stdout.readline())
  assert _shm_sessions(address) == before + 1
  child.communicate("\n", timeout=30)
  assert child.returncode == -9
  assert _files_of(pid) == []
  assert _shm_sessions(address) == before  # Stats sweeps sessions of dead clients


def test_rpc_rows_measure_both_transports(servers):
  rows = rpc_rows([16, 1 << 20], repeats=3, address=servers[0], transports=("grpc", "shm"))
  assert [(r["transport"], r["payload_bytes"]) for r in rows] == \
      [("grpc", 16), ("shm", 16), ("grpc", 1 << 20), ("shm", 1 << 20)]
  assert all(0 < r["round_trip_ms_p50"] <= r["round_trip_ms_p90"] for r in rows)


def test_a_large_request_that_cannot_get_a_slot_fails_its_future(servers, monkeypatch):
  """A 4 MiB+ request is written on the shard's thread; an OSError there (say /dev/shm is full) must
  fail the caller's future with a Tier2Error, not leave it pending forever."""
  with Tier2Client([servers[0]], **DIMS, transport="shm", shm_slot_bytes=4096) as client:
    client.allocate([7])
    n = 16384  # K and V of 16,384 tokens: 2 x 16384 x 2 x 16 x 4 B = 4 MiB
    k = np.random.default_rng(0).standard_normal((n, 2, 16), np.float32)

    def no_space(*args, **kwargs):
      raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_wire, "Region", no_space)
    future = client.append_async(0, np.full(n, 7), np.arange(n), k, k)
    with pytest.raises(Tier2Error, match="No space left"):
      future.result(timeout=30)


@pytest.mark.parametrize("make", [
    lambda a: a[:, :3],  # rows of a fused q, k, v: strided
    lambda a: a[2:5],  # contiguous rows
    lambda a: a[:, 1:2, :],  # one head a row
    lambda a: a[:1, 2:],  # one row
    lambda a: a[:0],  # no rows
    lambda a: a.transpose(1, 0, 2),  # rows not contiguous within: copied first
    lambda a: a[:, :, ::2],  # elements strided
    lambda a: a[:, 0, 0],  # 1-D, strided
    lambda a: a.reshape(-1),  # 1-D
])
def test_native_rows_describe_the_parts_bytes(make):
  """write_and_ring's row-by-row description of a part reads back its C-order bytes."""
  part = make(np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4))
  kept, rows, row_bytes, stride = shm_session._rows(part)
  base = kept.__array_interface__["data"][0]
  memory = np.frombuffer((ctypes.c_char * max(1, (rows - 1) * stride + row_bytes)).from_address(base), np.uint8) \
      if rows else np.zeros(0, np.uint8)
  got = b"".join(memory[r * stride:r * stride + row_bytes].tobytes() for r in range(rows))
  assert got == np.ascontiguousarray(part).tobytes()


@pytest.mark.parametrize("writer", ["native", "python"])
def test_a_batch_that_cannot_be_written_fails_its_calls_and_frees_their_slots(servers, writer):
  """Parts that are not the prepared request's bytes: write_and_ring raises, every call of the batch fails
  at once (none waits for its deadline) and its slot is reused; the session keeps serving."""
  with grpc.insecure_channel(servers[0]) as ch:
    session = ShmSession(tier2_pb2_grpc.Tier2Stub(ch), None, 10)
    try:
      payload = np.frombuffer(b"\0" * 64, np.uint8)
      calls = [session.prepare(shm_wire.ECHO, 64, 64, 10) for _ in range(2)]
      assert session.num_slots == 2
      start = time.perf_counter()
      with pytest.raises(ValueError, match="128 bytes for a 64-byte request"):
        shm_session.write_and_ring([(calls[0], [payload]), (calls[1], [payload, payload])], native=writer == "native")
      if writer == "python":  # writes and rings call by call: the first went
        assert len(calls.pop(0).future.result(timeout=10)) == 64
      for call in calls:
        with pytest.raises(ValueError, match="128 bytes"):
          call.future.result(timeout=1)
      assert time.perf_counter() - start < 2
      echoes = [session.call(shm_wire.ECHO, [payload], 64, 10) for _ in range(2)]
      assert [len(f.result(timeout=10)) for f in echoes] == [64, 64]
      assert session.num_slots == 2  # the failed call's slot (and the answered one's), reused
    finally:
      session.close()
