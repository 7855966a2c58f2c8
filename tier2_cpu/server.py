"""The tier-2 gRPC server: control RPCs in protobuf, tensors as raw bytes (tensor_wire.py) or, for
clients on the same host, in shared-memory regions with a Unix-socket doorbell (shm_wire.py).

One process holds the KV cache of its sequences for layers [first_layer, end_layer) in a
preallocated KVPool, appends K and V for new tokens and returns only the attention output.

Locks: `_lock` guards the page table and counters, `_pool_lock` the pool (one append or attention at a
time: each replaces the layer's donated buffers). With serve_threads > 1, shared-memory calls run on that
many threads, so one call's host work (decoding, checks, page table, reply copy) overlaps another's
kernel; their page-table steps and their pool work each still run in arrival order (the doorbell's
turns). A sequence is released only once no call that placed its tokens is still pending, so a late
write never lands in pages handed to another sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import signal
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from glinthawk_jax.protos import shm_wire, tensor_wire, tier2_pb2, tier2_pb2_grpc
from tier2_cpu.kv_pool import BF16, KVPool
from tier2_cpu.page_table import PageTable, PoolFullError
from tier2_cpu.shm_doorbell import AbortContext, CallError, Doorbell
from tier2_cpu.shm_sessions import ShmSessions

MAX_MESSAGE_BYTES = 2**31 - 1
AUTH_METADATA_KEY = "glinthawk-token"
SERVICE_NAME = "glinthawk.tier2.Tier2"
SHM_SWEEP_S = 30.0
PAGE_TABLE_STAGE, POOL_STAGE = 0, 1  # a call's ordered stages (tier2_cpu/turns.py)
RELEASE_WAIT_S = 30.0  # how long a release waits for its sequences' calls in service (under clients' 60 s default)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  """What a server holds and how it serves; the launcher fills it from flags and the model config."""
  num_layers: int  # layers of the whole model
  num_heads: int
  num_kv_heads: int
  head_dim: int
  first_layer: int = 0
  end_layer: int = -1  # -1 = num_layers
  page_size: int = 16
  max_seq_len: int = 2048
  kv_cache_gb: float = 1.0
  kv_dtype: str = "bfloat16"
  host: str = "127.0.0.1"
  port: int = 0  # 0 = a free port
  auth_token: str = ""  # empty = no check (loopback); else clients must send it
  inject_delay_ms: float = 0.0  # added to every tensor RPC, for latency studies
  max_workers: int = 8
  serve_threads: int = 1  # shared-memory calls served at once (host work of one beside another's kernel)
  shm: bool = True  # accept shared-memory tensor regions from clients on this host
  tls_cert: str = ""  # PEM certificate chain file; set with tls_key = serve TLS only
  tls_key: str = ""  # PEM private key file of tls_cert

  @property
  def layer_end(self) -> int:
    return self.num_layers if self.end_layer < 0 else self.end_layer


class Tier2Service:
  """State of one server: the pool, the page table and counters, behind one lock."""

  def __init__(self, options: ServerOptions):
    o = self.options = options
    if o.serve_threads < 1:
      raise ValueError(f"serve_threads={o.serve_threads}: expected >= 1")
    if not 0 <= o.first_layer < o.layer_end <= o.num_layers:
      raise ValueError(f"layers [{o.first_layer}, {o.layer_end}): expected a non-empty range inside "
                       f"[0, {o.num_layers})")
    num_layers = o.layer_end - o.first_layer
    num_pages = KVPool.pages_for_budget(int(o.kv_cache_gb * 2**30), num_layers, o.page_size,
                                        o.num_kv_heads, o.head_dim, o.kv_dtype)
    if num_pages < 1:
      raise ValueError(f"kv_cache_gb={o.kv_cache_gb}: less than one page of {o.page_size} tokens")
    self.pool = KVPool(num_layers, num_pages, o.page_size, o.num_kv_heads, o.head_dim, o.kv_dtype)
    self.bytes_per_page = o.page_size * self.pool.bytes_per_token
    max_pages = -(-o.max_seq_len // o.page_size)
    self.pages = PageTable(self.pool.num_pages, o.page_size, max_pages)
    self._lengths: dict[int, list[int]] = {}  # seq -> tokens written, per held layer
    self._lock = threading.Lock()
    self._pool_lock = threading.Lock()
    self._pending: dict[int, int] = {}  # seq -> calls placed on the page table, not yet through the pool
    self._settled = threading.Condition(self._lock)  # notified when a call's sequences leave _pending
    self.requests_served = 0
    self.tokens_served = 0
    self.busy_seconds = 0.0  # with a tensor request in service (Stats); tier 2's side of the pipeline's time
    self._serving, self._busy_since = 0, 0.0  # requests in service, since when (_busy)
    self.kernel_seconds = 0.0  # the pool's append and attention within it
    self.shm = ShmSessions() if o.shm else None
    # Injected delays must overlap (one-way network delay), so delayed calls go to a pool.
    self.doorbell = Doorbell(self._serve_shm, self._check_shm_peer, self.shm.detach,
                             max(o.serve_threads, o.max_workers if o.inject_delay_ms else 1)) if o.shm else None

  # Control RPCs (protobuf).

  def Handshake(self, request, context):
    o = self.options
    mine = tier2_pb2.ModelDims(num_layers=o.num_layers, num_heads=o.num_heads,
                               num_kv_heads=o.num_kv_heads, head_dim=o.head_dim)
    if request.protocol_version != tensor_wire.PROTOCOL_VERSION:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f"protocol_version {request.protocol_version}: server speaks "
                    f"{tensor_wire.PROTOCOL_VERSION}")
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
      theirs, ours = getattr(request.model, field), getattr(mine, field)
      if theirs != ours:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {field}={theirs}: server has {ours}")
    if (request.first_layer, request.end_layer) != (o.first_layer, o.layer_end):
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f"layers [{request.first_layer}, {request.end_layer}): server holds "
                    f"[{o.first_layer}, {o.layer_end})")
    return tier2_pb2.HandshakeReply(
        protocol_version=tensor_wire.PROTOCOL_VERSION, model=mine, first_layer=o.first_layer,
        end_layer=o.layer_end, page_size=o.page_size, num_pages=self.pool.num_pages,
        max_seq_len=o.max_seq_len, kv_dtype=o.kv_dtype, shm=self.shm is not None)

  def Allocate(self, request, context):
    with self._lock:
      try:
        self.pages.add(request.seq_ids)
      except KeyError as e:
        context.abort(grpc.StatusCode.ALREADY_EXISTS, e.args[0])
      except PoolFullError as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
      for s in request.seq_ids:
        self._lengths[s] = [0] * self.pool.num_layers
      return tier2_pb2.AllocateReply(free_pages=self.pages.num_free)

  def Release(self, request, context):
    with self._lock:
      if not self._settled.wait_for(lambda: not any(s in self._pending for s in request.seq_ids), RELEASE_WAIT_S):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"release: calls of these sequences still in service after {RELEASE_WAIT_S:.0f} s")
      try:
        self.pages.remove(request.seq_ids)
      except KeyError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, e.args[0])
      for s in request.seq_ids:
        self._lengths.pop(s, None)
      return tier2_pb2.ReleaseReply(free_pages=self.pages.num_free)

  def Stats(self, request, context):
    shm_sessions, shm_bytes = self.shm.totals() if self.shm else (0, 0)
    with self._lock:
      used = self.pages.num_pages - self.pages.num_free
      return tier2_pb2.StatsReply(
          num_sequences=self.pages.num_sequences, pages_in_use=used, num_pages=self.pages.num_pages,
          page_size=self.pages.page_size, kv_bytes_in_use=used * self.bytes_per_page,
          kv_bytes_capacity=self.pages.num_pages * self.bytes_per_page,
          requests_served=self.requests_served, tokens_served=self.tokens_served,
          shm_sessions=shm_sessions, shm_bytes=shm_bytes,
          busy_seconds=self.busy_seconds + (time.perf_counter() - self._busy_since if self._serving else 0.0),
          kernel_seconds=self.kernel_seconds)

  def ShmAttach(self, request, context):
    self._require_shm(context)
    try:
      self.shm.attach(request.session, request.slot, request.name, request.size, request.client_pid)
    except (OSError, ValueError) as e:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"shm region {request.name!r}: {e}")
    return tier2_pb2.ShmAttachReply(doorbell=self.doorbell.name)

  def ShmDetach(self, request, context):
    self._require_shm(context)
    if not self.shm.detach(request.session):
      context.abort(grpc.StatusCode.NOT_FOUND, f"shm session {request.session:x} is not attached")
    return tier2_pb2.ShmDetachReply()

  # Tensor RPCs (raw bytes).

  def attend(self, payload: bytes, context) -> bytes:
    r = self._decode(payload, context)
    with self._busy():
      return tensor_wire.encode_reply(self._attend(r, context))

  def echo(self, payload: bytes, context) -> bytes:
    if self.options.inject_delay_ms:
      time.sleep(self.options.inject_delay_ms / 1000)
    return payload

  def _check_shm_peer(self, session: int, pid: int) -> None:
    """A doorbell connection's HELLO: the session must be attached by the connecting process."""
    try:
      owner = self.shm.pid_of(session)
    except KeyError as e:
      raise CallError(grpc.StatusCode.FAILED_PRECONDITION, e.args[0]) from None
    if owner != pid:
      raise CallError(grpc.StatusCode.PERMISSION_DENIED, f"shm session {session:x} belongs to pid {owner}, not {pid}")

  def _serve_shm(self, session: int, notify: bytes, ticket: int) -> int:
    """Serves a request from a shared-memory slot of `session` (shm_wire.py); the reply goes to the
    same slot. Returns its length; failures raise CallError. Its pool work waits for `ticket`'s turn."""
    context = AbortContext()
    try:
      theirs, slot, op, request_bytes = shm_wire.decode_notify(notify)
    except tensor_wire.WireError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if theirs != session:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"shm session {theirs:x} is not this doorbell's")
    try:
      region = self.shm.region(session, slot)
    except KeyError as e:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, e.args[0])
    reply_at = shm_wire.reply_offset(request_bytes)
    try:
      payload = region.view(0, request_bytes)
      if op == shm_wire.ECHO:
        reply = np.frombuffer(self.echo(payload, context), np.uint8)
        region.view(reply_at, reply.nbytes)[:] = reply
        return reply.nbytes
      r = self._decode(payload, context)
      with self._busy():
        region.view(reply_at, r.q.nbytes)  # room for the reply, checked before any KV is written
        reply = self._attend(r, context, ticket)
        region.view(reply_at, reply.nbytes)[:] = reply.reshape(-1).view(np.uint8)
    except tensor_wire.WireError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return reply.nbytes

  @contextlib.contextmanager
  def _busy(self):
    """Counts wall time during which at least one tensor request is being served (after its injected
    delay) into busy_seconds: overlapping requests count once."""
    with self._lock:
      if not self._serving:
        self._busy_since = time.perf_counter()
      self._serving += 1
    try:
      yield
    finally:
      with self._lock:
        self._serving -= 1
        if not self._serving:
          self.busy_seconds += time.perf_counter() - self._busy_since

  def _require_shm(self, context) -> None:
    if self.shm is None:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off on this server (--shm)")

  def _decode(self, payload, context) -> tensor_wire.AttendRequest:
    if self.options.inject_delay_ms:
      time.sleep(self.options.inject_delay_ms / 1000)
    try:
      return tensor_wire.decode_request(payload)
    except tensor_wire.WireError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

  def _attend(self, r: tensor_wire.AttendRequest, context, ticket: int | None = None) -> np.ndarray:
    """Writes each token's K, V at its position, then attends each query to keys 0..position
    (an append-only request stops after the write and returns an empty reply). With a doorbell `ticket`
    the page-table step and the pool work each wait for their turn (arrival order)."""
    self._check_shapes(r, context)
    runs = _Runs(r.seq_ids, r.positions)
    if runs.repeated:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"request {r.request_id}: a (sequence, position) pair appears twice")
    layer = r.layer - self.options.first_layer
    with self._turn(ticket, PAGE_TABLE_STAGE), self._lock:
      # Python ints from here: a decode call has a few dozen sequences, and each NumPy call costs
      # microseconds more than its work (5-20 us each right after a kernel's pass over the KV, measured).
      seqs, lasts = runs.seqs.tolist(), runs.last.tolist()
      self._check_sequences(r, runs, seqs, lasts, layer, context)
      try:
        self.pages.grow(seqs, lasts)
      except PoolFullError as e:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {r.request_id}: {e}")
      for s, last in zip(seqs, lasts):
        lengths = self._lengths[s]
        lengths[layer] = max(lengths[layer], last + 1)
      self.requests_served += 1
      self.tokens_served += len(r.seq_ids)
      width = 0 if r.append_only else max(lasts) // self.options.page_size + 1  # the pool buckets shapes
      slots, tables = self.pages.slots_and_tables(r.seq_ids, r.positions, width)
      for s in seqs:
        self._pending[s] = self._pending.get(s, 0) + 1
    try:
      with self._turn(ticket, POOL_STAGE), self._pool_lock:
        start = time.perf_counter()
        if r.append_only:
          self.pool.write(layer, slots, r.k, r.v)
          out = np.empty((0,), r.k.dtype)
        else:
          out = self.pool.write_attend(layer, slots, r.k, r.v, r.q, tables, r.positions,
                                       "bfloat16" if r.q.dtype == BF16 else "float32")
        self.kernel_seconds += time.perf_counter() - start
    finally:
      with self._lock:
        for s in seqs:
          self._pending[s] -= 1
          if not self._pending[s]:
            del self._pending[s]
        self._settled.notify_all()
    return np.ascontiguousarray(out.astype(r.q.dtype, copy=False))

  def _turn(self, ticket: int | None, stage: int):
    """The doorbell's turn of `ticket` at `stage`; no wait for a call without a ticket (gRPC)."""
    return contextlib.nullcontext() if ticket is None else self.doorbell.turns.turn(ticket, stage)

  def _check_shapes(self, r: tensor_wire.AttendRequest, context) -> None:
    o = self.options
    got, want = (r.q.shape[1], r.k.shape[1], r.q.shape[2]), (o.num_heads, o.num_kv_heads, o.head_dim)
    if got != want:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"request {r.request_id}: (heads, kv heads, head dim) {got}, server has {want}")
    if not o.first_layer <= r.layer < o.layer_end:
      context.abort(grpc.StatusCode.OUT_OF_RANGE,
                    f"request {r.request_id}: layer {r.layer} outside [{o.first_layer}, {o.layer_end})")
    if r.positions.view(np.uint32).max() >= o.max_seq_len:  # one pass: negative int32s view as >= 2**31
      bad = np.flatnonzero((r.positions < 0) | (r.positions >= o.max_seq_len))
      context.abort(grpc.StatusCode.OUT_OF_RANGE,
                    f"request {r.request_id}: token {bad[0]} position {r.positions[bad[0]]} outside "
                    f"[0, {o.max_seq_len})")

  def _check_sequences(self, r: tensor_wire.AttendRequest, runs: "_Runs", seqs: list[int], lasts: list[int],
                       layer: int, context) -> None:
    """Every sequence known, and no position past the keys written so far plus this request's
    (seqs, lasts: runs.seqs and runs.last as lists)."""
    unknown = [s for s in seqs if s not in self.pages]
    if unknown:
      context.abort(grpc.StatusCode.NOT_FOUND, f"request {r.request_id}: sequence {unknown[0]} is not allocated")
    written = [self._lengths[s][layer] for s in seqs]
    if runs.follows is None:  # one token a sequence: its key must exist
      bad = [i for i, (p, w) in enumerate(zip(lasts, written)) if p > w]
    else:
      # In (sequence, position) order a position is fine if its key exists or the previous one of its
      # sequence is right before it (pairs are unique, so positions of a sequence increase).
      written = np.repeat(np.array(written, np.int64), runs.counts)
      bad = np.flatnonzero((runs.positions > written) & ~runs.follows).tolist()
    if bad:
      i = bad[0]
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"request {r.request_id}: sequence {runs.seq_ids[i]} layer {r.layer} position "
                    f"{runs.positions[i]} leaves a gap after its {written[i]} written keys")


class _Runs:
  """A request's tokens sorted once by (sequence, position): each sequence is a run of increasing
  positions. seqs, counts and last (its largest position) are per run; seq_ids, positions and
  follows (the token right after the previous one of its run) per sorted token. When each sequence
  comes once, in order (a decode call), nothing is sorted and counts and follows are None."""

  def __init__(self, seq_ids: np.ndarray, positions: np.ndarray):
    if (seq_ids[1:] > seq_ids[:-1]).all():
      self.seq_ids = self.seqs = seq_ids
      self.positions = self.last = positions
      self.repeated, self.counts, self.follows = False, None, None
      return
    order = np.lexsort((positions, seq_ids))
    self.seq_ids, self.positions = seq_ids[order], positions[order]
    same = self.seq_ids[1:] == self.seq_ids[:-1]
    step = self.positions[1:] - self.positions[:-1]
    self.repeated = bool(np.any(same & (step == 0)))
    self.follows = np.concatenate([[False], same & (step == 1)])
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.append(starts[1:], len(order))
    self.seqs, self.counts, self.last = self.seq_ids[starts], ends - starts, self.positions[ends - 1]


class _TokenCheck(grpc.ServerInterceptor):
  """Refuses calls without the shared token (UNAUTHENTICATED); the health service stays open."""

  def __init__(self, token: str):
    self._token = token.encode()
    self._deny = grpc.unary_unary_rpc_method_handler(
        lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing token"))

  def intercept_service(self, continuation, details):
    if details.method.startswith("/grpc.health.v1."):
      return continuation(details)
    sent = dict(details.invocation_metadata).get(AUTH_METADATA_KEY, "")
    sent = sent.encode() if isinstance(sent, str) else sent
    if hmac.compare_digest(sent, self._token):
      return continuation(details)
    return self._deny


def build_server(options: ServerOptions) -> tuple[grpc.Server, int, Tier2Service]:
  """A started server and its port."""
  if not options.auth_token and not _is_loopback(options.host):
    raise ValueError(f"host {options.host!r} is not loopback: set an auth_token for cross-host use")
  credentials = _tls_credentials(options)
  service = Tier2Service(options)
  interceptors = [_TokenCheck(options.auth_token)] if options.auth_token else []
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.max_workers),
                       interceptors=interceptors,
                       options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                ("grpc.so_reuseport", 0)])  # a taken port is an error, not shared
  tier2_pb2_grpc.add_Tier2Servicer_to_server(service, server)
  raw = {name.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(fn)  # identity (de)serializers
         for name, fn in ((tensor_wire.ATTEND_METHOD, service.attend),
                          (tensor_wire.ECHO_METHOD, service.echo))}
  server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("glinthawk.tier2.Tensor", raw)])
  health_servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  address = f"{options.host}:{options.port}"
  port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
  if port == 0:
    if service.doorbell:
      service.doorbell.close()
    raise OSError(f"cannot bind {options.host}:{options.port}")
  server.start()
  for name in ("", SERVICE_NAME):
    health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
  return server, port, service


def _tls_credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
  """Server-side TLS from the PEM files, or None when neither is set; ValueError when one is missing."""
  if not options.tls_cert and not options.tls_key:
    return None
  if not (options.tls_cert and options.tls_key):
    raise ValueError("tls_cert and tls_key: set both (certificate chain and its private key) or neither")
  pems = []
  for name in ("tls_key", "tls_cert"):
    try:
      with open(getattr(options, name), "rb") as f:
        pems.append(f.read())
    except OSError as e:
      raise ValueError(f"{name}={getattr(options, name)!r}: {e.strerror}") from None
  return grpc.ssl_server_credentials([tuple(pems)])


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return host == "localhost"


def serve(options: ServerOptions) -> None:
  """Serves until SIGTERM/SIGINT; prints "tier2 ready on HOST:PORT" once serving."""
  server, port, service = build_server(options)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  print(f"tier2 ready on {options.host}:{port}", flush=True)
  while not stop.wait(SHM_SWEEP_S):
    if service.shm:
      service.shm.sweep()  # unmaps the regions of clients that died without detaching
  if service.doorbell:
    service.doorbell.close()
  server.stop(grace=1.0).wait()
