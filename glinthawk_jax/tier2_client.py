"""Client of N tier-2 servers: places sequences on shards and sends each shard its tokens' q, k, v.

Sequences are sharded whole (all of a sequence's KV lives on one server); `attend_async` splits a
batch by shard, sends the parts in parallel and gathers the outputs back in input order. Tensors
travel as raw gRPC bytes, or through shared memory to servers on this host (protos/shm_session.py; the
`transport` argument), several times faster than gRPC bytes from 64 KiB up (tier2_cpu/rpc_bench.py).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from glinthawk_jax.protos import shm_wire, tensor_wire, tier2_pb2, tier2_pb2_grpc
from glinthawk_jax.protos.shm_session import ShmFuture, ShmSession, write_and_ring
from glinthawk_jax.protos.shm_session import native_writer as shm_native_writer
from glinthawk_jax.reply_timings import Durations, ReplyTimings

MAX_MESSAGE_BYTES = 2**31 - 1
AUTH_METADATA_KEY = "glinthawk-token"  # same key as tier2_cpu/server.py
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TRANSPORTS = ("grpc", "shm", "auto")
MAX_CALLS_IN_FLIGHT = 16  # tensor calls to one shard at once (threads, each blocked on one call)
# Shared-memory requests from this size are written on the shard's thread, beside the other shards'; smaller
# ones (a decode micro-batch's, 0.2-0.4 MiB a shard) all in one native call (shm_session.write_and_ring).
# Written on the 7 shards' threads instead (at 128 KiB) they ran no faster on an H200 host: Llama-3-8B 740
# and 731 against 762 tok/s, Llama-2-7B equal (docs/BENCHMARKS.md, v17).
THREAD_WRITE_BYTES = 4 << 20


class Tier2Error(RuntimeError):
  """A tier-2 call failed; `address` names the server and `code` is its gRPC status (or None)."""

  def __init__(self, address: str, code: grpc.StatusCode | None, message: str):
    super().__init__(f"tier-2 server {address}: {code.name if code else 'client'}: {message}")
    self.address = address
    self.code = code


class ShardUnavailableError(Tier2Error):
  """The server did not answer in time or cannot be reached (the engine may fail over)."""


class KVCacheFullError(Tier2Error):
  """The server's KV pool has no free pages for the request; nothing was written."""


class HandshakeError(Tier2Error):
  """Protocol version, model dimensions or layer range differ between client and server."""


def _error(address: str, e: grpc.RpcError) -> Tier2Error:
  code = e.code()
  cls = (ShardUnavailableError if code in _UNAVAILABLE else
         KVCacheFullError if code == grpc.StatusCode.RESOURCE_EXHAUSTED else Tier2Error)
  return cls(address, code, e.details() or "")


class _Shard:
  """One server: its channel, stubs and the free pages it last reported."""

  def __init__(self, address: str, metadata, timeout_s: float, credentials=None):
    self.address = address
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials else
                    grpc.insecure_channel(address, options=options))
    self.control = tier2_pb2_grpc.Tier2Stub(self.channel)
    self.attend = self.channel.unary_unary(tensor_wire.ATTEND_METHOD)  # raw bytes both ways
    self.echo = self.channel.unary_unary(tensor_wire.ECHO_METHOD)
    self.metadata = metadata
    self.timeout_s = timeout_s
    self.free_pages = 0
    self.dead = False  # set by mark_dead: no new sequences, its sequences' KV is gone
    self.page_size = 1
    self.shm: ShmSession | None = None
    self.executor = futures.ThreadPoolExecutor(max_workers=MAX_CALLS_IN_FLIGHT, thread_name_prefix="tier2")

  @property
  def transport(self) -> str:
    return "shm" if self.shm else "grpc"

  def open_shm(self, required: bool, slot_bytes: int) -> None:
    """Starts a shared-memory session; if not `required`, a failure leaves the shard on gRPC."""
    try:
      self.shm = ShmSession(self.control, self.metadata, self.timeout_s, slot_bytes)
    except grpc.RpcError as e:
      if required:
        raise _error(self.address, e) from None
    except OSError as e:
      if required:
        raise Tier2Error(self.address, None, f"shared memory: {e}") from None

  def send(self, parts, reply_bytes: int, timeout: float, consume) -> futures.Future:
    """One tensor request (over shared memory: a large one, written on this shard's thread): a Future of
    consume(reply bytes), or of its grpc.RpcError. Blocking calls on this shard's threads: grpc's
    `.future()` starts a thread per call (about 1 ms each)."""
    if self.shm:
      return self._shm_call_on_thread(parts, reply_bytes, timeout, consume)
    payload = b"".join(p.tobytes() for p in parts)
    return self.executor.submit(
        lambda: consume(self.attend(payload, timeout=timeout, metadata=self.metadata)))

  def _shm_call_on_thread(self, parts, reply_bytes: int, timeout: float, consume) -> futures.Future:
    """shm.call on this shard's thread: a large request's copy into the slot runs beside the other shards'
    (numpy copies release the GIL) instead of on the caller's thread, one shard after another."""
    result = ShmFuture()
    result.set_running_or_notify_cancel()

    def run():
      try:
        call = self.shm.call(shm_wire.ATTEND, parts, reply_bytes, timeout, consume)
      except BaseException as e:  # noqa: BLE001 (handed to the caller's future)
        result.set_exception(e)
        return
      def relay(c: futures.Future):
        if c.cancelled():
          result.set_exception(futures.CancelledError())
        elif c.exception() is not None:
          result.set_exception(c.exception())
        else:
          result.server_sent_at = c.server_sent_at
          result.set_result(c.result())

      call.add_done_callback(relay)

    self.executor.submit(run)
    return result

  def call(self, method: str, request):
    try:
      return getattr(self.control, method)(request, timeout=self.timeout_s, metadata=self.metadata)
    except grpc.RpcError as e:
      raise _error(self.address, e) from None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A token batch split by shard (Tier2Client.plan): per shard (shard index, its tokens' rows: a slice
  when contiguous, else indices, their count, seq_ids [n] and positions [n])."""

  num_tokens: int
  parts: list[tuple]


class Tier2Client:
  """Connects to tier-2 servers (all holding the same layers) and handshakes with each.

  Args:
    addresses: "host:port" of each server (shard).
    num_layers, num_heads, num_kv_heads, head_dim: the model's dimensions.
    layers: (first, end) layers the servers hold; default all.
    timeout_s: deadline of every call.
    auth_token: shared token for servers started with --auth_token.
    tls_ca: PEM file of the CA that signed the servers' --tls_cert (or that certificate itself);
      set = TLS to every server, empty = plaintext.
    transport: "grpc" (tensors in the RPCs), "shm" (shared memory with every server; fails if one
      cannot) or "auto" (shared memory with loopback servers that offer it, else gRPC).
    shm_slot_bytes: first size of each shared-memory slot (grown to the largest request).
    native_writer: a call's small shared-memory requests written and rung in one native call
      (shm_session.write_and_ring); False: by NumPy, part by part.
  """

  def __init__(self, addresses, *, num_layers: int, num_heads: int, num_kv_heads: int,
               head_dim: int, layers: tuple[int, int] | None = None, timeout_s: float = 30.0,
               auth_token: str = "", tls_ca: str = "", transport: str = "auto",
               shm_slot_bytes: int = 1 << 20, native_writer: bool = True):
    if transport not in TRANSPORTS:
      raise ValueError(f"transport={transport!r}: expected one of {TRANSPORTS}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.layers = layers or (0, num_layers)
    self.timeout_s = timeout_s
    self.native_writer = native_writer
    metadata = ((AUTH_METADATA_KEY, auth_token),) if auth_token else None
    credentials = _tls_credentials(tls_ca)
    self.shards = [_Shard(a, metadata, timeout_s, credentials) for a in addresses]
    if not self.shards:
      raise ValueError("addresses: expected at least one tier-2 server")
    self._placement: dict[int, int] = {}
    self._lock = threading.Lock()
    self._reply_timings = ReplyTimings(len(self.shards))
    self._request_ids = itertools.count()
    request = tier2_pb2.HandshakeRequest(
        protocol_version=tensor_wire.PROTOCOL_VERSION,
        model=tier2_pb2.ModelDims(num_layers=num_layers, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim),
        first_layer=self.layers[0], end_layer=self.layers[1])
    try:
      for shard in self.shards:
        try:
          reply = shard.call("Handshake", request)
        except Tier2Error as e:
          if e.code == grpc.StatusCode.FAILED_PRECONDITION:
            raise HandshakeError(e.address, e.code, str(e)) from None
          raise
        shard.free_pages, shard.page_size = reply.num_pages, reply.page_size
        if transport == "shm" and not reply.shm:
          raise Tier2Error(shard.address, None, "transport='shm' but the server runs with --shm=false")
        if transport == "shm" or (transport == "auto" and reply.shm and _is_loopback(shard.address)):
          shard.open_shm(required=transport == "shm", slot_bytes=shm_slot_bytes)
      if native_writer and any(shard.shm for shard in self.shards):
        shm_native_writer()  # built now, not within the first call's deadline
    except Exception:
      self.close()
      raise

  @property
  def transports(self) -> list[str]:
    """"shm" or "grpc" for each shard, as negotiated."""
    return [shard.transport for shard in self.shards]

  @classmethod
  def for_model(cls, addresses, model_config, **kwargs) -> "Tier2Client":
    """Same as the constructor with dimensions from a models.model_config.ModelConfig."""
    return cls(addresses, num_layers=model_config.num_layers, num_heads=model_config.num_heads,
               num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, **kwargs)

  def allocate(self, seq_ids, expected_tokens: int = 1) -> list[int]:
    """Places each new sequence on the shard with the most free KV; returns the shard of each.

    `expected_tokens` per sequence is subtracted from a shard's free estimate as sequences land on
    it, so one call spreads a batch instead of piling it on one shard.
    """
    seq_ids = [int(s) for s in seq_ids]
    with self._lock:
      taken = [s for s in seq_ids if s in self._placement]
      if taken or len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"sequence {taken[0] if taken else seq_ids} is already allocated")
      free = [shard.free_pages for shard in self.shards]
      alive = [i for i, shard in enumerate(self.shards) if not shard.dead]
      if not alive:
        raise ShardUnavailableError(",".join(self.addresses), None, "no tier-2 shard left")
      chosen = []
      for _ in seq_ids:
        i = max(alive, key=lambda j: free[j])
        free[i] -= -(-expected_tokens // self.shards[i].page_size)
        chosen.append(i)
      for i, shard in enumerate(self.shards):
        mine = [s for s, c in zip(seq_ids, chosen) if c == i]
        if mine:
          shard.free_pages = shard.call("Allocate", tier2_pb2.AllocateRequest(seq_ids=mine)).free_pages
          self._placement.update((s, i) for s in mine)
      return chosen

  def release(self, seq_ids) -> None:
    """Frees the sequences' KV on their shards."""
    seq_ids = [int(s) for s in seq_ids]
    with self._lock:
      by_shard = self._split_known(seq_ids)
      for i, mine in by_shard.items():
        shard = self.shards[i]
        if shard.dead:
          for s in mine:
            del self._placement[s]
          continue
        shard.free_pages = shard.call("Release", tier2_pb2.ReleaseRequest(seq_ids=mine)).free_pages
        for s in mine:
          del self._placement[s]

  @property
  def addresses(self) -> list[str]:
    return [shard.address for shard in self.shards]

  @property
  def num_alive(self) -> int:
    return sum(not shard.dead for shard in self.shards)

  def mark_dead(self, address: str) -> list[int]:
    """Stops using the shard at `address`; forgets and returns the sequences it held (their KV is lost)."""
    with self._lock:
      index = self.addresses.index(address)
      self.shards[index].dead = True
      lost = [s for s, i in self._placement.items() if i == index]
      for s in lost:
        del self._placement[s]
      return lost

  def shard_of(self, seq_id: int) -> int:
    return self._placement[int(seq_id)]

  def plan(self, seq_ids, positions) -> Plan:
    """How a batch of tokens splits by shard; pass it to attend_async for every layer of the same tokens
    (a decode step's layers) instead of splitting again each call."""
    seq_ids = np.asarray(seq_ids, np.int64)
    positions = np.asarray(positions, np.int32)
    n = len(seq_ids)
    if positions.shape != (n,):
      raise ValueError(f"positions: shape {positions.shape}, expected {(n,)}")
    with self._lock:
      try:
        shard_of_token = np.fromiter((self._placement[s] for s in seq_ids.tolist()), np.int64, n)
      except KeyError as e:
        raise ValueError(f"sequence {e.args[0]} was not allocated") from None
    parts = []
    for i in np.unique(shard_of_token).tolist():
      idx = np.flatnonzero(shard_of_token == i)
      contiguous = idx[-1] - idx[0] + 1 == len(idx)  # rows grouped by shard: views, no copies
      take = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
      parts.append((i, take, len(idx), np.ascontiguousarray(seq_ids[take]), np.ascontiguousarray(positions[take])))
    return Plan(n, parts)

  def attend_async(self, layer: int, seq_ids, positions, q: np.ndarray, k: np.ndarray,
                   v: np.ndarray, timeout_s: float | None = None, plan: Plan | None = None,
                   out: np.ndarray | None = None) -> futures.Future:
    """Appends k, v at the positions and returns a Future of the attention output [N, H, D].

    q: [N, H, D], k and v: [N, KV, D], all of one dtype (float32, bfloat16 or float16); token i
    belongs to seq_ids[i] at positions[i] and attends that sequence's keys 0..positions[i]. `plan`:
    self.plan(seq_ids, positions), made once for several calls with the same tokens (optional).
    `out`: an array [M >= N, H, D] of that dtype for the output's rows 0..N-1 (the rest untouched); the
    Future's result is then `out` itself.
    """
    return self._tensor_call(layer, seq_ids, positions, q, k, v, timeout_s, plan, out)

  def append_async(self, layer: int, seq_ids, positions, k: np.ndarray, v: np.ndarray,
                   timeout_s: float | None = None) -> futures.Future:
    """Appends k, v: [N, KV, D] at the positions, no attention; a Future of None once stored.

    Same validation and errors as attend_async (positions must not leave gaps).
    """
    return self._tensor_call(layer, seq_ids, positions, None, k, v, timeout_s)

  def _tensor_call(self, layer, seq_ids, positions, q, k, v, timeout_s, plan=None, out=None) -> futures.Future:
    if plan is None:
      plan = self.plan(seq_ids, positions)
    n = plan.num_tokens
    append_only = q is None
    want = {"q": (n, self.num_heads, self.head_dim), "k": (n, self.num_kv_heads, self.head_dim),
            "v": (n, self.num_kv_heads, self.head_dim)}
    named = (("k", k), ("v", v)) + (() if append_only else (("q", q),))
    for name, x in named:
      if x.shape != want[name]:
        raise ValueError(f"{name}: shape {x.shape}, expected {want[name]}")
    result: futures.Future = futures.Future()
    result.set_running_or_notify_cancel()
    if out is None:
      out = np.empty((n, self.num_heads, self.head_dim), k.dtype)
    elif out.ndim != 3 or out.shape[0] < n or out.shape[1:] != (self.num_heads, self.head_dim) or out.dtype != k.dtype:
      raise ValueError(f"out: {out.dtype} {out.shape}, expected {k.dtype} [>= {n}, {self.num_heads}, {self.head_dim}]")
    parts = plan.parts
    if not parts:
      result.set_result(None if append_only else out)
      return result
    pending, first_reply_at, server_sent_at = [len(parts)], [], []
    lock = threading.Lock()
    timeout = self.timeout_s if timeout_s is None else timeout_s

    def place(take, count, reply):  # reply: bytes, or a view of a shared-memory slot
      if append_only:
        tensor_wire.decode_reply(reply, (0,), out.dtype)
      else:
        out[take] = tensor_wire.decode_reply(reply, (count,) + out.shape[1:], out.dtype)

    def on_done(call, i):
      shard = self.shards[i]
      try:
        call.result()
      except grpc.RpcError as e:
        _fail(_error(shard.address, e))
        return
      except (tensor_wire.WireError, futures.CancelledError) as e:
        _fail(Tier2Error(shard.address, None, str(e)))
        return
      except Exception as e:  # noqa: BLE001 (e.g. OSError attaching a shared-memory slot on a shard's thread)
        _fail(Tier2Error(shard.address, None, f"{type(e).__name__}: {e}"))
        return
      now = time.perf_counter()
      with lock:
        pending[0] -= 1
        if not first_reply_at:
          first_reply_at.append(now)
        server_sent_at.append((i, getattr(call, "server_sent_at", None)))  # None: not a shared-memory reply
        if pending[0] == 0 and not result.done():
          if len(parts) > 1:
            self._reply_timings.add(now - first_reply_at[0], server_sent_at)
          result.set_result(None if append_only else out)

    def _fail(error):
      with lock:
        if not result.done():
          result.set_exception(error)

    batch = []  # small shared-memory requests: written and rung together, after the loop
    try:
      for i, take, count, ids, pos in parts:
        shard = self.shards[i]
        request = tensor_wire.request_parts(next(self._request_ids), layer, ids, pos,
                                            None if append_only else q[take], k[take], v[take],
                                            num_heads=self.num_heads, contiguous=False)
        reply_bytes = 0 if append_only else count * out[0].nbytes
        consume = functools.partial(place, take, count)
        request_bytes = sum(p.nbytes for p in request)
        try:
          if shard.shm and request_bytes < THREAD_WRITE_BYTES:
            prepared = shard.shm.prepare(shm_wire.ATTEND, request_bytes, reply_bytes, timeout, consume)
            batch.append((prepared, request))
            call = prepared.future
          else:
            call = shard.send(request, reply_bytes, timeout, consume)
        except grpc.RpcError as e:
          raise _error(shard.address, e) from None
        call.add_done_callback(lambda c, i=i: on_done(c, i))
    finally:
      write_and_ring(batch, native=self.native_writer)  # also the requests prepared before a shard failed
    return result

  def timings(self) -> dict[str, Durations]:
    """Copies of the reply counters so far: ReplyTimings' "spread" and "server_spread", and over the
    shared-memory replies "lag", a server sending one to this process reading it."""
    lag = sum((shard.shm.reply_lag() for shard in self.shards if shard.shm), Durations())
    return self._reply_timings.spreads() | {"lag": lag}

  def recent_spreads(self, count: int) -> np.ndarray:
    """ReplyTimings.recent: the latest `count` multi-shard calls' spreads, [n, 2] seconds."""
    return self._reply_timings.recent(count)

  def server_lateness(self) -> list[Durations]:
    """ReplyTimings.lateness: per shard, how long after a multi-shard call's first server it replied."""
    return self._reply_timings.lateness()

  def attend(self, layer: int, seq_ids, positions, q, k, v, timeout_s: float | None = None):
    """Blocking attend_async."""
    return self.attend_async(layer, seq_ids, positions, q, k, v, timeout_s).result()

  def stats(self) -> list[dict]:
    """Each live shard's counters (address, sequences, pages, KV bytes, requests and tokens served)."""
    rows = []
    for shard in (s for s in self.shards if not s.dead):
      reply = shard.call("Stats", tier2_pb2.StatsRequest())
      rows.append({"address": shard.address, **{f.name: getattr(reply, f.name)
                                               for f in reply.DESCRIPTOR.fields}})
    return rows

  def close(self) -> None:
    """Ends shared-memory sessions (the servers unmap their regions) and closes the channels."""
    for shard in self.shards:
      if shard.shm:
        shard.shm.close()
        shard.shm = None
      shard.channel.close()
      shard.executor.shutdown(wait=False)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _split_known(self, seq_ids) -> dict[int, list[int]]:
    by_shard: dict[int, list[int]] = {}
    for s in seq_ids:
      if s not in self._placement:
        raise ValueError(f"sequence {s} was not allocated")
      by_shard.setdefault(self._placement[s], []).append(s)
    return by_shard


def _tls_credentials(ca_path: str) -> grpc.ChannelCredentials | None:
  if not ca_path:
    return None
  try:
    with open(ca_path, "rb") as f:
      return grpc.ssl_channel_credentials(root_certificates=f.read())
  except OSError as e:
    raise ValueError(f"tls_ca={ca_path!r}: {e.strerror}") from None


def _is_loopback(address: str) -> bool:
  host = address.rsplit(":", 1)[0].strip("[]")
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"
