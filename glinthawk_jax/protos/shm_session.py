"""Client side of the shared-memory tensor path to one tier-2 server on this host (shm_wire.py).

A session holds one region per request slot; a call takes a free slot (a new one if all are in
flight, a bigger one if the request does not fit), writes the request into it, notifies the server
over gRPC and frees the slot once the reply has been consumed. The server maps each region before the
client unlinks its name, so no file outlives a crash of either side.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
from concurrent import futures

import grpc

from glinthawk_jax.protos import shm_wire, tier2_pb2
from glinthawk_jax.protos.tensor_wire import WireError

# The server may still be reading or writing a slot after these: never reuse it.
_SLOT_IN_DOUBT = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@dataclasses.dataclass
class _Slot:
  index: int
  generation: int
  region: shm_wire.Region


class ShmSession:
  """Shared-memory slots to one server; `call` has the effect of the raw-bytes tensor RPCs.

  Args:
    channel: the server's gRPC channel; control: its Tier2Stub.
    metadata, timeout_s: sent with the control RPCs (ShmAttach, ShmDetach).
    slot_bytes: size of the first slot; slots grow to the largest request + reply seen.
    executor: runs the blocking notifications (one thread per call in flight); default its own.
  Raises grpc.RpcError (FAILED_PRECONDITION if the server cannot map our regions) or OSError.
  """

  def __init__(self, channel: grpc.Channel, control, metadata, timeout_s: float,
               slot_bytes: int = 1 << 20, executor: futures.Executor | None = None):
    self.session = secrets.randbits(63)
    self._control, self._metadata, self._timeout_s = control, metadata, timeout_s
    self._notify = channel.unary_unary(shm_wire.CALL_METHOD)
    self._lock = threading.Lock()
    self._free: list[_Slot] = []
    self._num_slots = 0
    self._executor = executor or futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="shm")
    self._free.append(self._attach(self._new_index(), 0, slot_bytes))  # fails here, not mid-batch

  @property
  def num_slots(self) -> int:
    return self._num_slots

  def call(self, op: int, parts, reply_bytes: int, timeout_s: float, consume=bytes) -> futures.Future:
    """Sends the request `parts` (tensor_wire.request_parts) through a slot.

    Returns a Future of `consume(reply)`, where `reply` is a memoryview of the reply bytes in the
    slot, valid only during the call (the default copies it to bytes); the Future fails with the
    call's grpc.RpcError, or with what `consume` raised. Raises grpc.RpcError at once if a slot
    could not be attached.
    """
    request_bytes = sum(p.nbytes for p in parts)
    slot = self._take(shm_wire.region_bytes(request_bytes, reply_bytes))
    slot.region.write_parts(parts)
    notify = shm_wire.NOTIFY.pack(self.session, slot.index, op, request_bytes)
    return self._executor.submit(self._round_trip, slot, notify, request_bytes, timeout_s, consume)

  def _round_trip(self, slot: _Slot, notify: bytes, request_bytes: int, timeout_s: float, consume):
    """A blocking notification on a pool thread: grpc's own futures start a thread per call
    (about 1 ms each on a loaded 2-core host, most of the pipelined path's host time)."""
    try:
      (n,) = shm_wire.REPLY.unpack(self._notify(notify, timeout=timeout_s, metadata=self._metadata))
      reply = consume(slot.region.view(shm_wire.reply_offset(request_bytes), n))
    except grpc.RpcError as e:
      if e.code() not in _SLOT_IN_DOUBT:
        self._give_back(slot)
      raise
    except Exception as e:  # a bad reply or consume's error; handed to the caller
      self._give_back(slot)
      if isinstance(e, WireError):
        raise
      raise WireError(f"shm reply: {e}") from e
    self._give_back(slot)
    return reply

  def close(self) -> None:
    """Tells the server to unmap this session's regions (best effort) and unmaps ours."""
    with self._lock:
      self._free.clear()
    try:
      self._control.ShmDetach(tier2_pb2.ShmDetachRequest(session=self.session),
                              timeout=self._timeout_s, metadata=self._metadata)
    except grpc.RpcError:
      pass  # server gone: its mappings went with it

  def _take(self, size: int) -> _Slot:
    with self._lock:
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
      self._control.ShmAttach(tier2_pb2.ShmAttachRequest(
          session=self.session, slot=index, name=region.name, size=size, client_pid=pid),
          timeout=self._timeout_s, metadata=self._metadata)
    finally:
      region.unlink()
    return _Slot(index, generation, region)
