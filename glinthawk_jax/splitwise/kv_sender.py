"""A prefill worker's side of the KV transfer: ship each layer's K,V as soon as the layer has run.

The worker prefills a batch with `ModelRunner.prefill_by_layer` (one jitted call per
splitwise.layers_per_call layers, queued on the device, each call's K,V of the shipped tokens gathered on
the device and its copy to the host begun). `KVSender.ship` hands that list to one fetch thread, which
waits for the first call's layers on the host, queues their sends, then the next call's, ... while the
device computes later layers; sender threads encode and send.
No host callback runs inside a jitted program (FACTS.md: on a GPU each one stalls the stream while
Python runs). `KVSender.finish` waits for a request's sends and commits it at the decode worker, or
aborts it there (freeing its KV) when a send failed, timed out or the request was cancelled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import numpy as np

from glinthawk_jax.splitwise.wire import WorkerStub, encode_kv, kv_message_tokens

OnDone = Callable[[int, "Exception | None", dict], None]


@dataclasses.dataclass
class Transfer:
  """One request's KV on its way to `address`."""
  address: str
  futures: list = dataclasses.field(default_factory=list)
  layer_computed_s: dict = dataclasses.field(default_factory=dict)  # layer -> wall time its K,V reached the host
  cancelled: bool = False
  finishing: bool = False  # commit or abort queued (later finish() calls are ignored)


@dataclasses.dataclass
class ShippedRow:
  """A request's tokens in a shipped batch: kv[:, start:start + len(positions)] are at `positions`."""
  uid: int
  start: int
  positions: np.ndarray  # [n] int32


class KVSender:
  """Fetches shipped batches' layers in order, sends them on a thread pool, commits or aborts each
  request once. `notify` runs (on a sender thread) whenever a shipped batch's sends have all returned."""

  def __init__(self, num_heads: int, timeout_s: float, threads: int, notify: Callable[[], None] = lambda: None,
               message_bytes: float = 4 * 2**20):
    self.num_heads = num_heads
    self.message_bytes = message_bytes
    self.timeout_s = timeout_s
    self.notify = notify
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kv-send")
    self._fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-fetch")
    self._finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-commit")
    self._lock = threading.Lock()
    self._stubs: dict[str, WorkerStub] = {}
    self._send_stubs: dict[str, list[WorkerStub]] = {}  # per address: a connection per sender thread
    self._turn = itertools.count()
    self._threads = threads
    self._transfers: dict[int, Transfer] = {}
    self._batches_in_flight = 0

  @property
  def batches_in_flight(self) -> int:
    """Shipped batches not yet fetched and sent: the worker dispatches another only below a limit (batches
    with no shipped rows never count)."""
    with self._lock:
      return self._batches_in_flight

  def stub(self, address: str) -> WorkerStub:
    with self._lock:
      if address not in self._stubs:
        self._stubs[address] = WorkerStub(address)
      return self._stubs[address]

  def send_stub(self, address: str) -> WorkerStub:
    """The next of `threads` stubs to `address`, each with its own connection (round robin)."""
    with self._lock:
      if address not in self._send_stubs:
        self._send_stubs[address] = [WorkerStub(address, own_connection=True) for _ in range(self._threads)]
      stubs = self._send_stubs[address]
      return stubs[next(self._turn) % len(stubs)]

  def begin(self, uid: int, address: str, message: dict) -> None:
    """Reserves the request's KV at its decode worker; raises grpc.RpcError (RESOURCE_EXHAUSTED: full)."""
    self.stub(address).call("Begin", message, self.timeout_s)
    with self._lock:
      self._transfers[uid] = Transfer(address)

  def ship(self, kvs: list, rows: list[ShippedRow], finished: list[int], on_prefilled: Callable[[int, float], None],
           on_done: OnDone) -> None:
    """Sends a dispatched batch's layers: kvs: per jitted call [layers, 2, N, KV, D] (device arrays in
    layer order, ModelRunner.prefill_by_layer); each layer goes as messages of at most `message_bytes` per
    request (power-of-two token runs: several connections carry a layer at once, none pads).

    Requests in `finished` had their last chunk in this batch: once their last layer is on the host,
    on_prefilled(uid, wall time) runs and then finish(uid, commit=True, on_done).
    """
    with self._lock:
      self._batches_in_flight += 1
    self._fetcher.submit(self._fetch, kvs, rows, finished, on_prefilled, on_done)

  def _fetch(self, kvs, rows, finished, on_prefilled, on_done) -> None:
    sent = []
    try:
      layer = 0
      for i in range(len(kvs)):
        kv, kvs[i] = kvs[i], None  # the device buffer goes once its host copy is read
        group = np.asarray(kv)  # waits for these layers (GIL released) while the device runs later ones
        del kv
        now = time.time()
        step = kv_message_tokens(self.message_bytes, group.shape[3], group.shape[4], group.dtype.itemsize)
        for host in group:
          for row in rows:
            with self._lock:
              t = self._transfers.get(row.uid)
              if t is None or t.cancelled:
                continue
              t.layer_computed_s.setdefault(layer, now)
              for start in range(0, len(row.positions), step):
                a, b = row.start + start, row.start + min(start + step, len(row.positions))
                t.futures.append(self._pool.submit(self._send, t.address, row.uid, layer,
                                                   row.positions[start:start + step], host[0, a:b], host[1, a:b]))
                sent.append(t.futures[-1])
          layer += 1
    except Exception as e:  # noqa: BLE001 (the device call failed: those requests' transfers fail)
      logging.warning("prefill of requests %s failed: %s", [r.uid for r in rows], e)
      for row in rows:
        self.abort(row.uid, on_done)
    else:
      now = time.time()
      for uid in finished:
        on_prefilled(uid, now)
        self.finish(uid, True, on_done)
    # Its own thread: behind the finisher's Commits and Aborts the throttle would lift late.
    threading.Thread(target=self._batch_sent, args=(sent,), name="kv-batch-sent", daemon=True).start()

  def _batch_sent(self, futures) -> None:
    concurrent.futures.wait(futures)
    with self._lock:
      self._batches_in_flight -= 1
    self.notify()

  def _send(self, address, uid, layer, positions, k, v) -> None:
    self.send_stub(address).send_kv(encode_kv(uid, layer, positions, k, v, self.num_heads), self.timeout_s)

  def finish(self, uid: int, commit: bool, on_done: OnDone) -> None:
    """After the request's queued layers are sent: Commit (if `commit` and all went well) or Abort at the
    decode worker. on_done(uid, error or None, {"layer_computed_s", "commit_sent_s": when every send had
    returned and Commit went out (None if it did not), "commit_s": when it returned}) runs on a sender thread."""
    with self._lock:
      t = self._transfers.get(uid)
      if t is None or t.finishing:
        return
      t.finishing = True
    self._finisher.submit(self._finish, uid, t, commit, on_done)

  def cancel(self, uid: int) -> None:
    """Stops sending the request's layers; a later or pending finish() aborts it at the decode worker."""
    with self._lock:
      t = self._transfers.get(uid)
      if t is not None:
        t.cancelled = True

  def abort(self, uid: int, on_done: OnDone) -> None:
    """cancel() then finish() without commit: the decode worker frees what it reserved."""
    self.cancel(uid)
    self.finish(uid, False, on_done)

  def _finish(self, uid: int, t: Transfer, commit: bool, on_done) -> None:
    error, sent = None, None
    try:
      with self._lock:
        futures = list(t.futures)
      for f in futures:
        f.result()
      if t.cancelled or not commit:
        raise RuntimeError(f"request {uid}: transfer cancelled")
      sent = time.time()
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
    on_done(uid, error, {"layer_computed_s": layers, "commit_sent_s": sent, "commit_s": time.time()})

  def close(self) -> None:
    for pool in (self._fetcher, self._pool, self._finisher):
      pool.shutdown(wait=False, cancel_futures=True)
    for stub in [*self._stubs.values(), *(s for stubs in self._send_stubs.values() for s in stubs)]:
      stub.close()
