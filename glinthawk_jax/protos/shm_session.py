"""Client side of the shared-memory tensor path to one tier-2 server on this host (shm_wire.py).

A session holds one region per request slot; a call takes a free slot (a new one if all are in
flight, a bigger one if the request does not fit), writes the request into it and rings the
server's doorbell from the caller's thread (`write_and_ring` does the writes and rings of calls to
several servers in one native call, csrc/shm_ring.cc); one reader thread per session takes the replies,
completes the calls' futures and frees each slot once its reply has been consumed. The server maps
each region before the client unlinks its name, so no file outlives a crash of either side.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import heapq
import logging
import os
import secrets
import select
import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from glinthawk_jax.protos import shm_wire, tier2_pb2
from glinthawk_jax.protos.tensor_wire import WireError
from glinthawk_jax.reply_timings import Durations

# The server may still be reading or writing a slot after these: never reuse it.
_SLOT_IN_DOUBT = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


class ShmCallError(grpc.RpcError):
  """A failed shared-memory call, with the status and details a gRPC call would have had."""

  def __init__(self, code: grpc.StatusCode, details: str):
    super().__init__(f"{code.name}: {details}")
    self._code, self._details = code, details

  def code(self) -> grpc.StatusCode:
    return self._code

  def details(self) -> str:
    return self._details


class ShmFuture(futures.Future):
  """A shared-memory call's Future; once answered, server_sent_at is the server's time.monotonic() when it
  sent the reply (one clock for the whole host)."""
  server_sent_at: float | None = None


@dataclasses.dataclass
class _Slot:
  index: int
  generation: int
  region: shm_wire.Region


@dataclasses.dataclass
class _Call:
  slot: _Slot
  request_bytes: int
  consume: object
  deadline: float
  future: futures.Future


@dataclasses.dataclass
class Prepared:
  """A call with its slot taken and its reply awaited (ShmSession.prepare): its request of request_bytes
  goes at offset 0 of `slot`'s region, then `notify` (empty: the call failed already) to its session's
  doorbell."""
  session: "ShmSession"
  slot: _Slot
  request_bytes: int
  notify: bytes
  future: futures.Future

  @property
  def region(self) -> shm_wire.Region:
    return self.slot.region


class ShmSession:
  """Shared-memory slots to one server; `call` has the effect of the raw-bytes tensor RPCs.

  Args:
    control: the server's Tier2Stub.
    metadata, timeout_s: sent with the control RPCs (ShmAttach, ShmDetach); timeout_s also bounds
      connecting to the doorbell.
    slot_bytes: size of the first slot; slots grow to the largest request + reply seen.
  Raises grpc.RpcError (FAILED_PRECONDITION if the server cannot map our regions) or OSError.
  """

  def __init__(self, control, metadata, timeout_s: float, slot_bytes: int = 1 << 20):
    self.session = secrets.randbits(63)
    self._control, self._metadata, self._timeout_s = control, metadata, timeout_s
    self._lock = threading.Lock()  # slots and calls
    self._send_lock = threading.Lock()
    self._free: list[_Slot] = []
    self._calls: dict[int, _Call] = {}  # by slot index
    self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, slot index)
    self._broken: ShmCallError | None = None
    # The reader sleeps until a reply, its wake-up time or a byte on _wake (a call due before it).
    self._wake_at = 0.0
    self._wake, self._woken = socket.socketpair()
    self._num_slots = 0
    self._doorbell = ""
    self._reply_lag = Durations()  # the server sending each reply to the reader thread reading it
    self._free.append(self._attach(self._new_index(), 0, slot_bytes))  # fails here, not mid-batch
    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
      self._sock.settimeout(timeout_s)
      self._sock.connect(shm_wire.doorbell_address(self._doorbell))
      self._sock.sendall(shm_wire.HELLO.pack(self.session))
      _, status, size, _ = shm_wire.REPLY.unpack(shm_wire.recv_exact(self._sock, shm_wire.REPLY.size))
      if status:
        raise ShmCallError(_STATUS.get(status, grpc.StatusCode.UNKNOWN),
                           shm_wire.recv_exact(self._sock, size).decode(errors="replace"))
      self._sock.settimeout(None)
    except BaseException:
      for sock in (self._sock, self._wake, self._woken):
        sock.close()
      self._detach()  # the server would keep our attached region for as long as this process lives
      raise
    threading.Thread(target=self._read_replies, name="shm-replies", daemon=True).start()

  @property
  def num_slots(self) -> int:
    return self._num_slots

  def reply_lag(self) -> Durations:
    """A copy of the replies' lag so far: the server sending each to this session's reader reading it."""
    with self._lock:
      return dataclasses.replace(self._reply_lag)

  def call(self, op: int, parts, reply_bytes: int, timeout_s: float, consume=bytes) -> futures.Future:
    """Sends the request `parts` (tensor_wire.request_parts) through a slot.

    Returns a ShmFuture of `consume(reply)`, where `reply` is a memoryview of the reply bytes in the
    slot, valid only during the call (the default copies it to bytes); the Future fails with a
    grpc.RpcError (ShmCallError) carrying the server's status, or with what `consume` raised.
    `consume` runs on the session's reader thread. Raises grpc.RpcError at once if a slot could not
    be attached.
    """
    call = self.prepare(op, sum(p.nbytes for p in parts), reply_bytes, timeout_s, consume)
    write_and_ring([(call, parts)], native=False)  # as before: NumPy copies (they drop the GIL while they run)
    return call.future

  def prepare(self, op: int, request_bytes: int, reply_bytes: int, timeout_s: float,
              consume=bytes) -> "Prepared":
    """The first half of `call`: takes a slot for a request of `request_bytes` and awaits its reply; the
    caller then writes the request at the slot's offset 0 and rings (`ring`, or `write_and_ring` for
    several sessions at once). Raises as `call` does."""
    slot = self._take(shm_wire.region_bytes(request_bytes, reply_bytes))
    future = ShmFuture()
    future.set_running_or_notify_cancel()
    call = _Call(slot, request_bytes, consume, time.monotonic() + timeout_s, future)
    with self._lock:
      if self._broken:
        future.set_exception(self._broken)  # the slot is in doubt: not given back
        return Prepared(self, slot, request_bytes, b"", future)
      self._calls[slot.index] = call
      heapq.heappush(self._deadlines, (call.deadline, slot.index))
      wake = call.deadline < self._wake_at
    if wake:
      try:
        self._wake.send(b"\0")
      except OSError as e:
        self._fail_all(ShmCallError(grpc.StatusCode.UNAVAILABLE, f"shm doorbell: {e}"))
    return Prepared(self, slot, request_bytes, shm_wire.NOTIFY.pack(self.session, slot.index, op, request_bytes),
                    future)

  def ring(self, call: "Prepared") -> None:
    """Sends a prepared call's NOTIFY (once its request is in the slot)."""
    if not call.notify:
      return  # failed in prepare
    try:
      with self._send_lock:
        self._sock.sendall(call.notify)
    except OSError as e:
      self._fail_all(ShmCallError(grpc.StatusCode.UNAVAILABLE, f"shm doorbell: {e}"))

  def abandon(self, call: "Prepared", error: BaseException) -> None:
    """Fails a prepared call that was never rung with `error`; its slot is free again."""
    with self._lock:
      registered = getattr(self._calls.get(call.slot.index), "future", None) is call.future
      if registered:
        del self._calls[call.slot.index]
    if registered:
      self._give_back(call.slot)
    if not call.future.done():
      call.future.set_exception(error)

  def _read_replies(self) -> None:
    """The reader thread: completes calls as their replies come, fails them at their deadlines."""
    try:
      while True:
        readable = select.select([self._sock, self._woken], [], [], self._expire())[0]
        if self._woken in readable:
          self._woken.recv(4096)
        if self._sock not in readable:
          continue  # a deadline passed, or a call is due before the planned wake-up
        header = self._sock.recv(shm_wire.REPLY.size)
        if not header:
          raise ConnectionError("doorbell closed by the server")
        if len(header) < shm_wire.REPLY.size:
          header += shm_wire.recv_exact(self._sock, shm_wire.REPLY.size - len(header))
        slot, status, size, sent_at = shm_wire.REPLY.unpack(header)
        lag = time.monotonic() - sent_at
        message = shm_wire.recv_exact(self._sock, size).decode(errors="replace") if status else ""
        with self._lock:
          call = self._calls.pop(slot, None)
          self._reply_lag.add(lag)
        if call is not None:  # None: a call that already expired
          call.future.server_sent_at = sent_at
          self._complete(call, status, size, message)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError after close(), a bug: never leave calls hanging)
      self._fail_all(ShmCallError(grpc.StatusCode.UNAVAILABLE, f"shm doorbell: {e}"))
    finally:
      self._woken.close()

  def _complete(self, call: _Call, status: int, size: int, message: str) -> None:
    if status:
      error = ShmCallError(_STATUS.get(status, grpc.StatusCode.UNKNOWN), message)
      if error.code() not in _SLOT_IN_DOUBT:
        self._give_back(call.slot)
      call.future.set_exception(error)
      return
    try:
      result = call.consume(call.slot.region.view(shm_wire.reply_offset(call.request_bytes), size))
    except Exception as e:  # noqa: BLE001 (a bad reply or consume's error; handed to the caller)
      self._give_back(call.slot)
      call.future.set_exception(e if isinstance(e, WireError) else WireError(f"shm reply: {e}"))
      return
    self._give_back(call.slot)
    call.future.set_result(result)

  def _expire(self) -> float:
    """Fails the calls past their deadline (their slots stay in doubt); seconds to sleep: to the
    next deadline, or the session's timeout (a later call with a shorter one rings _wake)."""
    now, expired = time.monotonic(), []
    with self._lock:
      while self._deadlines:
        deadline, slot = self._deadlines[0]
        call = self._calls.get(slot)
        if call is None or call.deadline != deadline:
          heapq.heappop(self._deadlines)  # answered (or the slot has a newer call)
        elif deadline <= now:
          heapq.heappop(self._deadlines)
          expired.append(self._calls.pop(slot))
        else:
          break
      wait = self._deadlines[0][0] - now if self._deadlines else self._timeout_s
      self._wake_at = now + wait
    for call in expired:
      call.future.set_exception(ShmCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "shm call: deadline exceeded"))
    return wait

  def _fail_all(self, error: ShmCallError) -> None:
    """The doorbell is gone: every call in flight and every later one fails (slots in doubt)."""
    with self._lock:
      self._broken = self._broken or error
      calls, self._calls = list(self._calls.values()), {}
    for call in calls:
      if not call.future.done():
        call.future.set_exception(error)

  def close(self) -> None:
    """Tells the server to unmap this session's regions (best effort), closes the doorbell."""
    with self._lock:
      self._free.clear()
      self._broken = self._broken or ShmCallError(grpc.StatusCode.CANCELLED, "shm session closed")
    self._detach()
    try:
      self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
    except OSError:
      pass
    with self._send_lock:  # write_and_ring sends to the descriptor number: not once it may be reused
      self._sock.close()
    self._wake.close()

  def _detach(self) -> None:
    """Asks the server to unmap this session's regions (best effort)."""
    try:
      self._control.ShmDetach(tier2_pb2.ShmDetachRequest(session=self.session),
                              timeout=self._timeout_s, metadata=self._metadata)
    except grpc.RpcError:
      pass  # server gone: its mappings went with it

  def _take(self, size: int) -> _Slot:
    with self._lock:
      if self._broken:
        raise self._broken  # closed or doorbell gone: attach nothing new
      fits = [s for s in self._free if s.region.size >= size]
      slot = fits[0] if fits else (self._free[0] if self._free else None)
      if slot:
        self._free.remove(slot)
    if slot is None:
      return self._attach(self._new_index(), 0, size)
    if slot.region.size < size:
      try:
        return self._attach(slot.index, slot.generation + 1, max(size, 2 * slot.region.size))
      except BaseException:
        self._give_back(slot)  # the server still maps the old region
        raise
    return slot

  def _give_back(self, slot: _Slot) -> None:
    with self._lock:
      self._free.append(slot)

  def _new_index(self) -> int:
    with self._lock:
      self._num_slots += 1
      return self._num_slots - 1

  def _attach(self, index: int, generation: int, size: int) -> _Slot:
    """Creates a region, has the server map it as slot `index`, then unlinks its name."""
    pid = os.getpid()
    region = shm_wire.Region(shm_wire.region_name(pid, self.session, index, generation), size,
                             create=True)
    try:
      self._doorbell = self._control.ShmAttach(tier2_pb2.ShmAttachRequest(
          session=self.session, slot=index, name=region.name, size=size, client_pid=pid),
          timeout=self._timeout_s, metadata=self._metadata).doorbell
    finally:
      region.unlink()
    return _Slot(index, generation, region)


def write_and_ring(calls: list[tuple[Prepared, list[np.ndarray]]], native: bool = True) -> None:
  """Writes each prepared call's request parts (tensor_wire.request_parts, strided views allowed) into its
  slot and rings its session, call after call: with `native`, in one native call without the GIL
  (csrc/shm_ring.cc) when it builds, else part by part in Python (each copy and send takes the GIL
  back). A call that could not be sent fails (its session's calls all do if its doorbell is gone); none
  is left waiting."""
  calls = [(call, parts) for call, parts in calls if call.notify]
  try:
    lib = native_writer() if native else None
    if lib is None:
      while calls:
        call, parts = calls[0]
        _check_size(call, sum(part.nbytes for part in parts))
        call.region.write_parts(parts)
        calls.pop(0)
        call.session.ring(call)
      return
    copies, keep = _copies(calls)
    messages = np.frombuffer(b"".join(call.notify for call, _ in calls), np.uint8)
    errors = np.zeros(len(calls), np.int32)
    with contextlib.ExitStack() as held:
      for _, lock in sorted({id(call.session): call.session._send_lock for call, _ in calls}.items()):
        held.enter_context(lock)  # one order for every batch
      fds = [call.session._sock.fileno() for call, _ in calls]  # -1: closed (sends fail with EBADF)
      rings = np.array([(fd, messages.ctypes.data + r * shm_wire.NOTIFY.size, shm_wire.NOTIFY.size)
                        for r, fd in enumerate(fds)], np.int64)
      lib.ShmWriteAndRing(copies.ctypes.data, len(copies), rings.ctypes.data, errors.ctypes.data)
    del keep  # the sources, alive until the copies are done
  except BaseException as e:
    for call, _ in calls:
      call.session.abandon(call, e if isinstance(e, Exception) else ShmCallError(grpc.StatusCode.CANCELLED, repr(e)))
    raise
  for (call, _), err in zip(calls, errors.tolist()):
    if err:
      call.session._fail_all(ShmCallError(grpc.StatusCode.UNAVAILABLE, f"shm doorbell: {os.strerror(err)}"))


def _copies(calls: list[tuple[Prepared, list[np.ndarray]]]) -> tuple[np.ndarray, list[np.ndarray]]:
  """shm_ring.cc's ShmCopy rows for the calls' parts (each call's last row rings it) and the arrays they
  read; raises ValueError if a call's parts are not its request's bytes."""
  copies, keep = [], []
  for r, (call, parts) in enumerate(calls):
    if not parts:
      raise ValueError("shm request with no parts")
    offset = 0
    for part in parts:
      part, rows, row_bytes, stride = _rows(part)
      keep.append(part)
      copies.append([call.region.address + offset, part.__array_interface__["data"][0], rows, row_bytes, stride,
                     -1])
      offset += part.nbytes
    _check_size(call, offset)
    copies[-1][5] = r
  return np.array(copies, np.int64), keep


def _check_size(call: Prepared, nbytes: int) -> None:
  """ValueError unless `nbytes` of parts are the prepared request's bytes (so they fit its slot)."""
  if nbytes != call.request_bytes or nbytes > call.region.size:
    raise ValueError(f"shm request parts of {nbytes} bytes for a {call.request_bytes}-byte request in a "
                     f"{call.region.size}-byte slot")


def _rows(part: np.ndarray) -> tuple[np.ndarray, int, int, int]:
  """(part, rows, bytes a row, row stride in bytes) for a copy row by row: a part whose rows (first axis)
  are each contiguous as it is, any other as a contiguous copy of one row."""
  if part.ndim >= 2 and part.shape[0] > 1:
    expected = part.itemsize
    for axis in range(part.ndim - 1, 0, -1):
      if part.shape[axis] > 1 and part.strides[axis] != expected:
        break
      expected *= part.shape[axis]
    else:
      return part, part.shape[0], part.nbytes // part.shape[0], part.strides[0]
  part = np.ascontiguousarray(part)
  return part, 1, part.nbytes, part.nbytes


@functools.cache
def native_writer():
  """csrc/shm_ring.cc's library, or None (logged once) when it cannot be built."""
  from tier2_cpu import native_build  # noqa: PLC0415 (builds on first use)

  try:
    lib = native_build.load_library("shm_ring.cc")
  except (native_build.NativeBuildError, OSError) as e:  # no g++, a read-only build folder, a noexec mount
    logging.warning("shared-memory requests written from Python: %s", e)
    return None
  lib.ShmWriteAndRing.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
  lib.ShmWriteAndRing.restype = None
  return lib
