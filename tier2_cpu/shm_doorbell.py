"""The server end of the shared-memory doorbell (glinthawk_jax/protos/shm_wire.py): an abstract Unix
socket, one connection per client session, carrying each call's NOTIFY and REPLY.

A connection's thread serves its calls in order, inline (no thread hand-off: the point of the
doorbell); with a pool (serve_threads > 1, or injected delay, so delayed calls overlap as they would on
a network) it hands each call to the pool with a ticket of `turns`, in arrival order, for the server's
sections that must keep that order. The peer's pid (SO_PEERCRED) must be the pid that attached the
session.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import struct
import threading
import time
from concurrent import futures

import grpc

from glinthawk_jax.protos import shm_wire
from tier2_cpu.turns import Turns

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class CallError(Exception):
  """A call's failure as a gRPC status and message (what context.abort gives on the gRPC path)."""

  def __init__(self, code: grpc.StatusCode, details: str):
    super().__init__(details)
    self.code, self.details = code, details


class AbortContext:
  """The part of grpc.ServicerContext the service uses: abort raises CallError."""

  def abort(self, code: grpc.StatusCode, details: str):
    raise CallError(code, details)


HELLO_TIMEOUT_S = 10.0  # seconds a new connection has to identify its session

class Doorbell:
  """Listens on a fresh abstract socket `name` and serves its connections on daemon threads.

  Args:
    serve(session, notify bytes, ticket) -> the reply's length in bytes (written in the slot); raises
      CallError. `ticket` is the call's place in `turns` (it is ended when serve returns).
    check(session, pid): raises CallError unless `pid` may use `session`.
    closed(session): called when a checked session's connection ends.
    pool_size: > 1 = serve each call on a pool of that many threads (serve_threads, injected delays).
  """

  def __init__(self, serve, check, closed, pool_size: int = 1):
    self._serve, self._check, self._closed = serve, check, closed
    self.name = f"glinthawk-tier2-{os.getpid()}-{secrets.token_hex(8)}"
    self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._listener.bind(shm_wire.doorbell_address(self.name))
    self._listener.listen(64)
    self._pool = futures.ThreadPoolExecutor(pool_size, thread_name_prefix="doorbell") if pool_size > 1 else None
    self.turns = Turns(stages=2)
    self._submit_lock = threading.Lock()  # tickets reach the pool's FIFO queue in their order
    threading.Thread(target=self._accept, name="doorbell-accept", daemon=True).start()

  def close(self) -> None:
    """Stops accepting (shutdown wakes the accept thread; close alone does not on Linux) and the pool."""
    try:
      self._listener.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass
    self._listener.close()
    if self._pool:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def _accept(self) -> None:
    while True:
      try:
        conn, _ = self._listener.accept()
      except OSError:
        return  # closed
      threading.Thread(target=self._connection, args=(conn,), name="doorbell", daemon=True).start()

  def _connection(self, conn: socket.socket) -> None:
    send_lock = threading.Lock()
    with conn:
      try:
        conn.settimeout(HELLO_TIMEOUT_S)  # a connection that never says HELLO does not keep its thread
        (session,) = shm_wire.HELLO.unpack(shm_wire.recv_exact(conn, shm_wire.HELLO.size))
        conn.settimeout(None)
        pid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
        if not self._reply(conn, send_lock, shm_wire.HELLO_SLOT, lambda: self._check(session, pid) or 0):
          return
      except OSError:  # ConnectionError included: the client went away
        return
      try:
        while True:
          notify = shm_wire.recv_exact(conn, shm_wire.NOTIFY.size)
          slot = shm_wire.NOTIFY.unpack(notify)[1]
          with self._submit_lock:
            ticket = self.turns.take()
            call = functools.partial(self._call, session, notify, ticket)
            if self._pool:
              try:
                self._pool.submit(self._reply, conn, send_lock, slot, call)
              except RuntimeError:  # the pool has shut down (the server is closing)
                self.turns.end(ticket)
                raise OSError("doorbell closed") from None
          if not self._pool:
            self._reply(conn, send_lock, slot, call)
      except OSError:
        pass
      finally:
        self._closed(session)

  def _call(self, session: int, notify: bytes, ticket: int) -> int:
    try:
      return self._serve(session, notify, ticket)
    finally:
      self.turns.end(ticket)

  @staticmethod
  def _reply(conn: socket.socket, send_lock: threading.Lock, slot: int, call) -> bool:
    """Runs call() -> reply bytes and sends REPLY (with the error message on failure); True on success."""
    message = b""
    try:
      size, status = call(), 0
    except CallError as e:
      message, status = e.details.encode(), e.code.value[0]
    except Exception as e:  # noqa: BLE001 (a bug must fail the call, not the connection)
      message, status = f"{type(e).__name__}: {e}".encode(), grpc.StatusCode.UNKNOWN.value[0]
    try:
      with send_lock:
        conn.sendall(shm_wire.REPLY.pack(slot, status, len(message) if status else size, time.monotonic()) + message)
    except OSError:
      return False
    return status == 0
