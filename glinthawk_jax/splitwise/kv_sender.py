"""A prefill worker's side of the KV transfer: ship each layer's K,V as soon as the layer has run.

`ShippingPagedAttention` is the local paged backend plus an ordered `io_callback` per prefill layer that
hands the layer's K,V (already on the host) to `KVSender`; the callback only copies and queues (no JAX
inside a callback), so the device goes on with the next layer while sender threads put this one on the
wire. `KVSender.finish` waits for a request's layers and commits it at the decode worker, or aborts it
there (freeing its KV) when a send failed, timed out or the request was cancelled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np
from jax.experimental import io_callback

from glinthawk_jax.model_runner import LocalPagedAttention
from glinthawk_jax.placements.tokens import valid_tokens
from glinthawk_jax.splitwise.wire import WorkerStub, encode_kv


class ShippingPagedAttention(LocalPagedAttention):
  """Local paged attention whose prefill also ships rows with seq_id >= 0 (their transfer ids)."""

  sender: "KVSender | None" = None

  def prefill_attend(self, page_ids, offsets, block_tables, q_positions, context_lens, seq_ids=None):
    inner = super().prefill_attend(page_ids, offsets, block_tables, q_positions, context_lens, seq_ids)

    def attend(layer, q, k, v, state):
      io_callback(self._ship, None, layer, seq_ids, q_positions, context_lens, k, v, ordered=True)
      return inner(layer, q, k, v, state)

    return attend

  def _ship(self, layer, seq_ids, positions, context_lens, k, v):
    if self.sender is not None:
      self.sender.ship(int(layer), seq_ids, positions, context_lens, k, v)


@dataclasses.dataclass
class Transfer:
  """One request's KV on its way to `address`."""
  address: str
  futures: list = dataclasses.field(default_factory=list)
  layer_computed_s: dict = dataclasses.field(default_factory=dict)  # layer -> wall time its K,V was ready
  cancelled: bool = False


class KVSender:
  """Sends layers' K,V to decode workers on a thread pool; commits or aborts each request once."""

  def __init__(self, num_heads: int, timeout_s: float, threads: int):
    self.num_heads = num_heads
    self.timeout_s = timeout_s
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kv-send")
    self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-commit")
    self._lock = threading.Lock()
    self._stubs: dict[str, WorkerStub] = {}
    self._transfers: dict[int, Transfer] = {}

  def stub(self, address: str) -> WorkerStub:
    with self._lock:
      if address not in self._stubs:
        self._stubs[address] = WorkerStub(address)
      return self._stubs[address]

  def begin(self, uid: int, address: str, message: dict) -> None:
    """Reserves the request's KV at its decode worker; raises grpc.RpcError (RESOURCE_EXHAUSTED: full)."""
    self.stub(address).call("Begin", message, self.timeout_s)
    with self._lock:
      self._transfers[uid] = Transfer(address)

  def ship(self, layer: int, seq_ids, positions, context_lens, k, v) -> None:
    """The io_callback body: k, v: [R, T, KV, D] of `layer`; rows with seq_id >= 0 are queued to send.

    The device waits while this runs, so it only copies k and v once (the callback's buffers are not
    ours to keep) and leaves slicing and encoding to the sender threads.
    """
    now = time.time()
    rows, _ = valid_tokens(seq_ids, positions, context_lens)
    if not rows.size:
      return
    k, v = np.array(k), np.array(v)
    for r in np.unique(rows):
      uid = int(seq_ids[r])
      with self._lock:
        t = self._transfers.get(uid)
        if t is None or t.cancelled:
          continue
        t.layer_computed_s.setdefault(layer, now)
      n = int(np.count_nonzero(rows == r))  # a row's real tokens are its first n columns
      t.futures.append(self._pool.submit(self._send, t.address, uid, layer, positions[r, :n].copy(), k[r, :n],
                                         v[r, :n]))

  def _send(self, address, uid, layer, positions, k, v) -> None:
    self.stub(address).send_kv(encode_kv(uid, layer, positions, k, v, self.num_heads), self.timeout_s)

  def finish(self, uid: int, commit: bool, on_done: Callable[[int, Exception | None, dict], None]) -> None:
    """After the request's queued layers are sent: Commit (if `commit` and all went well) or Abort at the
    decode worker. on_done(uid, error or None, {"layer_computed_s", "commit_s"}) runs on a sender thread."""
    with self._lock:
      t = self._transfers.get(uid)
    if t is not None:
      self._finisher.submit(self._finish, uid, t, commit, on_done)

  def cancel(self, uid: int) -> None:
    """Stops sending the request's layers; a later or pending finish() aborts it at the decode worker."""
    with self._lock:
      t = self._transfers.get(uid)
      if t is not None:
        t.cancelled = True

  def abort(self, uid: int, on_done: Callable[[int, Exception | None, dict], None]) -> None:
    """cancel() then finish() without commit: the decode worker frees what it reserved."""
    self.cancel(uid)
    self.finish(uid, False, on_done)

  def _finish(self, uid: int, t: Transfer, commit: bool, on_done) -> None:
    error = None
    try:
      for f in t.futures:
        f.result()
      if t.cancelled or not commit:
        raise RuntimeError(f"request {uid}: transfer cancelled")
      self.stub(t.address).call("Commit", {"uid": uid}, self.timeout_s)
    except Exception as e:  # noqa: BLE001 (reported to the router through on_done)
      error = e
      try:
        self.stub(t.address).call("Abort", {"uid": uid}, self.timeout_s)
      except Exception as abort_error:  # noqa: BLE001 (its own timeout frees the KV there)
        logging.warning("abort of request %d at %s failed: %s", uid, t.address, abort_error)
    with self._lock:
      self._transfers.pop(uid, None)
    layers = [t.layer_computed_s[k] for k in sorted(t.layer_computed_s)]
    on_done(uid, error, {"layer_computed_s": layers, "commit_s": time.time()})

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._finisher.shutdown(wait=False, cancel_futures=True)
    for stub in self._stubs.values():
      stub.close()
