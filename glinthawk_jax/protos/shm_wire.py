"""Shared-memory tensor path between a client and a tier-2 server on one host.

The client creates a region (a file in /dev/shm) per request slot and names it in the ShmAttach
control RPC; once the server has mapped it, the client unlinks the name, so a crash of either side
leaves no file behind (the memory goes when the last mapping does). Calls go over the server's
doorbell, an abstract Unix stream socket named in ShmAttachReply: the client connects, sends HELLO (its session; the server checks the peer's pid is the session's and
answers a REPLY for slot HELLO_SLOT), then per call writes the request bytes (tensor_wire's layout,
unchanged) at offset 0 of a free slot and sends NOTIFY; the server decodes the request in place,
writes the reply bytes (tensor_wire's layout) at reply_offset(request bytes) and sends REPLY: the
slot, a status (a grpc.StatusCode's number, 0 = OK), the length of the reply in the slot, or of
the error message that follows REPLY on the socket, and the server's CLOCK_MONOTONIC when it sent the
reply (one clock for every process of the host: the client measures how late it reads replies).
Replies may come in any order. A socket message costs about 30 us where a gRPC notification cost about
0.6 ms on loopback (Python, 2-core host).

Clean-up: a name lives in /dev/shm only from a slot's creation until ShmAttach returns (a client
killed in that window leaves one gt2shm-<pid>-... file, safe to delete). The memory goes when both
mappings do: the client's on close or exit; the server's on ShmDetach (sent by close), when the
doorbell connection closes, when it finds the client's pid gone (at the next ShmAttach or Stats, and
every 30 s), or on exit. A server crash fails the client's calls with UNAVAILABLE; their slots are
never reused.
"""

from __future__ import annotations

import mmap
import os
import re
import socket
import struct

import numpy as np

from glinthawk_jax.protos.tensor_wire import WireError

SHM_DIR = "/dev/shm"
ATTEND, ECHO = 1, 2  # NOTIFY's op: tensor_wire's Attend, or Echo (transport measurements)
# session, slot, op, request bytes.
NOTIFY = struct.Struct("<QIIQ")
HELLO = struct.Struct("<Q")  # session, the first message on a doorbell connection
# slot, status (grpc.StatusCode number, 0 = OK), reply bytes in the slot or error message bytes after,
# the server's time.monotonic() at sending.
REPLY = struct.Struct("<IiQd")
HELLO_SLOT = 0xFFFFFFFF  # REPLY's slot for the answer to HELLO
_ALIGN = 64
_NAME = re.compile(r"^gt2shm-[0-9a-f]+-[0-9a-f]+-\d+-\d+$")


def region_name(pid: int, session: int, slot: int, generation: int) -> str:
  """The /dev/shm file name of a slot's region; generation counts its re-creations (growth)."""
  return f"gt2shm-{pid:x}-{session:x}-{slot}-{generation}"


def reply_offset(request_bytes: int) -> int:
  return -(-request_bytes // _ALIGN) * _ALIGN


def region_bytes(request_bytes: int, reply_bytes: int) -> int:
  """Smallest region that holds a request and its reply."""
  return reply_offset(request_bytes) + reply_bytes


def doorbell_address(name: str) -> str:
  """The socket address of a doorbell name (Linux abstract namespace: no file, gone with the server)."""
  return "\0" + name


def recv_exact(sock: socket.socket, size: int) -> bytes:
  """`size` bytes from a stream socket; ConnectionError when it closes first."""
  data = b""
  while len(data) < size:
    more = sock.recv(size - len(data))
    if not more:
      raise ConnectionError(f"doorbell closed after {len(data)} of {size} bytes")
    data += more
  return data


def decode_notify(payload: bytes) -> tuple[int, int, int, int]:
  """(session, slot, op, request bytes); WireError naming the bad field."""
  if len(payload) != NOTIFY.size:
    raise WireError(f"shm notify of {len(payload)} bytes, expected {NOTIFY.size}")
  session, slot, op, request_bytes = NOTIFY.unpack(payload)
  if op not in (ATTEND, ECHO):
    raise WireError(f"shm notify op {op}: expected {ATTEND} (attend) or {ECHO} (echo)")
  return session, slot, op, request_bytes


class Region:
  """One mapped region; `array` is a writable uint8 view of all of it."""

  def __init__(self, name: str, size: int, create: bool):
    if not _NAME.match(name):
      raise ValueError(f"shm region name {name!r}: expected {_NAME.pattern}")
    if size <= 0:
      raise ValueError(f"shm region {name}: size {size}, expected > 0")
    self.name, self.size = name, size
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL if create else os.O_RDWR, 0o600)
    try:
      if create:
        os.ftruncate(fd, size)
      elif os.fstat(fd).st_size < size:
        raise ValueError(f"shm region {name}: {os.fstat(fd).st_size} bytes, expected >= {size}")
      self._map = mmap.mmap(fd, size)
    except BaseException:
      if create:
        os.unlink(path)
      raise
    finally:
      os.close(fd)
    self.array = np.frombuffer(self._map, np.uint8)
    self.address = self.array.ctypes.data  # of byte 0, for native writers

  def unlink(self) -> None:
    """Removes the name (the mappings stay valid); no error if it is already gone."""
    try:
      os.unlink(os.path.join(SHM_DIR, self.name))
    except FileNotFoundError:
      pass

  def write_parts(self, parts) -> int:
    """Copies arrays (C order; strided views in one copy) back to back from offset 0; returns the bytes
    written."""
    offset = 0
    for part in parts:
      dst = self.array[offset:offset + part.nbytes]
      if part.flags.c_contiguous:
        dst[:] = part.reshape(-1).view(np.uint8)
      else:
        dst.view(part.dtype).reshape(part.shape)[...] = part
      offset += part.nbytes
    return offset

  def view(self, offset: int, size: int) -> memoryview:
    """Bytes [offset, offset + size); WireError if they overrun the region."""
    if offset < 0 or size < 0 or offset + size > self.size:
      raise WireError(f"shm region {self.name}: bytes [{offset}, {offset + size}) outside its "
                      f"{self.size}")
    return memoryview(self.array)[offset:offset + size]
