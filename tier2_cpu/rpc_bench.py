"""Round-trip time and throughput of the tensor path against a real server on loopback.

Measures Echo (the request comes back whole) over each transport: raw gRPC bytes
(/glinthawk.tier2.Tensor/Echo) and shared memory with a Unix-socket doorbell (shm_wire.py), so the
figures are the transport alone: no attention, no KV writes. Both send as Tier2Client does (an
asynchronous call whose reply is copied out on another thread), so they pay the same thread hand-off.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from glinthawk_jax.protos import shm_wire, tensor_wire, tier2_pb2_grpc
from glinthawk_jax.protos.shm_session import ShmSession
from tier2_cpu.process import start_servers, stop_servers
from tier2_cpu.server import MAX_MESSAGE_BYTES

SIZES = (16, 2**12, 2**16, 2**18, 2**20, 2**22, 2**24)
TINY_SIZES = (16, 2**16, 2**20)


def rpc_rows(payload_sizes=None, repeats: int = 20, address: str | None = None,
             server_cpus: str = "0", transports=None, tiny: bool = False) -> list[dict]:
  """One row per (payload size, transport): p50/p90 round trip in ms, MB/s moved (request + reply).

  payload_sizes: bytes; default SIZES (TINY_SIZES if `tiny`). transports: of "grpc", "shm"; default
  both for the default sizes, "grpc" alone for a given list. Starts a tiny-config server pinned to
  `server_cpus` unless `address` names a running one.
  """
  if transports is None:
    transports = ("grpc",) if payload_sizes is not None else ("grpc", "shm")
  if payload_sizes is None:
    payload_sizes = TINY_SIZES if tiny else SIZES
  repeats = min(repeats, 5) if tiny else repeats
  procs = [] if address else start_servers([["--config=configs/tiny.py", "--port=0",
                                             f"--cpus={server_cpus}", "--kv_cache_gb=0.001"]])
  address = address or procs[0].address
  rows = []
  try:
    with grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]) as channel:
      echoes = {}
      try:
        for transport in transports:
          echoes[transport] = _echo(channel, transport, max(payload_sizes))
        for size in payload_sizes:  # transports side by side, so load changes hit both alike
          rows.extend(_row(echoes[t][0], t, int(size), repeats) for t in transports)
      finally:
        for _, close in echoes.values():
          close()
  finally:
    stop_servers(procs)
  return rows


def _echo(channel, transport: str, max_size: int):
  """(echo(payload: uint8 array) -> reply length, close)."""
  if transport == "grpc":
    call = channel.unary_unary(tensor_wire.ECHO_METHOD)
    return (lambda payload: len(call.future(payload.tobytes(), timeout=60).result())), lambda: None
  if transport == "shm":
    session = ShmSession(tier2_pb2_grpc.Tier2Stub(channel), None, 60,
                         shm_wire.region_bytes(max_size, max_size))
    return (lambda payload: len(session.call(shm_wire.ECHO, [payload], payload.size, 60).result())), \
        session.close
  raise ValueError(f"transport {transport!r}: expected 'grpc' or 'shm'")


def _row(echo, transport: str, size: int, repeats: int) -> dict:
  payload = np.frombuffer(np.random.default_rng(0).bytes(size), np.uint8)
  echo(payload)  # warm-up: connection and buffers
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    got = echo(payload)
    times.append(time.perf_counter() - start)
  if got != size:
    raise RuntimeError(f"{transport} echo of {size} bytes came back with {got}")
  p50, p90 = (float(t) for t in np.percentile(times, [50, 90]))
  return {"transport": transport, "payload_bytes": size, "repeats": repeats,
          "round_trip_ms_p50": 1e3 * p50, "round_trip_ms_p90": 1e3 * p90,
          "mb_per_s": 2 * size / p50 / 1e6}


if __name__ == "__main__":
  for row in rpc_rows():
    print(row)
