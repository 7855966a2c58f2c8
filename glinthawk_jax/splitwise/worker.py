"""A Splitwise worker: one engine loop over a local paged KV cache that prefills, decodes, or both.

Every worker holds the whole model; its role tells the router what to send it and, for prefill workers,
adds K,V shipping to the prefill. One loop thread owns the device state; gRPC handlers (server.py) only
queue work under `lock`. A request reaches a worker in one of three ways:
- Submit without a decode address: prefilled and decoded here (colocated, mixed pool, recompute);
- Submit with a decode address (prefill role): Begin reserves its KV there when the request is about to
  be prefilled, it is prefilled here layer by layer while each layer's K,V streams out (kv_sender.py),
  then Commit; its pages here are freed at once;
- Begin/KV/Commit from a prefill worker: pages reserved at Begin, each layer written into the paged cache
  as it arrives, and at Commit the request joins the decode batch. A transfer not committed within
  splitwise.kv_timeout_s, or aborted, frees its pages. In the combined mode (placement pipelined) the
  pages only count tier 2's room: Begin also places the request on a tier-2 shard, each layer is appended
  there (tier2_receiver.py), and the request decodes with the pipelined placement.
Times reported to the router are wall-clock seconds (time.time()), comparable across local processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

import grpc
import jax
import ml_collections
import numpy as np

from glinthawk_jax.compile_log import compile_log
from glinthawk_jax.engine import Engine
from glinthawk_jax.paged_cache import SCRATCH_PAGE, PageAllocator
from glinthawk_jax.protos import tensor_wire
from glinthawk_jax.scheduler import MIN_PREFILL_TOKENS, Scheduler, Sequence, pow2_at_least
from glinthawk_jax.splitwise.kv_sender import KVSender, ShippedRow
from glinthawk_jax.splitwise.tier2_receiver import Tier2Receiver, Tier2Transfer
from glinthawk_jax.splitwise.wire import params_from_json
from glinthawk_jax.tier2_client import KVCacheFullError, ShardUnavailableError, Tier2Error

BEGIN_RETRY_S = 0.02  # a decode worker that was full is asked again after this


class WorkerError(Exception):
  """A call the worker refuses; `code` is the grpc.StatusCode name the server answers with."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass
class Incoming:
  """A request whose KV another worker is sending here."""
  seq: Sequence
  num_kv_tokens: int
  received: np.ndarray  # [layers, num_kv_tokens] bool
  deadline: float
  layer_received_s: list  # per layer: wall time of its first K,V message (nan until then)
  committed_s: float = 0.0  # when Commit came (the loop then admits it after writing its K,V)
  tier2: Tier2Transfer | None = None  # combined mode: its K,V on tier 2


class Worker:
  """The engine loop and the state the gRPC handlers share with it (all behind `lock`)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.role = config.role
    ship = self.role == "prefill"
    self.engine = Engine(config)
    self.model = self.engine.model_config
    ec = config.engine
    self.page_size = ec.page_size
    self.max_num_seqs = ec.max_num_seqs
    self.timeout_s = config.splitwise.kv_timeout_s
    self.max_prefill_tokens = ec.max_prefill_tokens
    self.prefills_in_flight = config.splitwise.prefills_in_flight
    self.layers_per_call = config.splitwise.layers_per_call
    self.wake = threading.Event()
    self.sender = None
    if ship:
      self.sender = KVSender(self.model.num_heads, self.timeout_s, config.splitwise.send_threads, self.wake.set,
                             config.splitwise.kv_message_mb * 2**20)
    device = jax.devices()[0]
    self.device = f"{len(jax.devices())} x {device.platform} {device.device_kind}"
    self.scheduler = Scheduler(ec, PageAllocator(self.engine.num_pages), ec.decode_steps_per_call,
                               max_prefill_rows=config.splitwise.prefill_rows if ship else 0)
    self.receiver = None  # two-tier placement: received K,V go to tier 2 (the combined mode)
    if self.engine.tier2 is not None:
      self.receiver = Tier2Receiver(self.engine.tier2.client, self.model.num_layers,
                                    lambda: next(self.engine._next_tier2_id))  # noqa: SLF001
    self.tier2_done: list[Sequence] = []  # two-tier: sequences whose tier-2 KV the loop frees next
    self.lock = threading.Lock()
    self.submits: list[tuple[Sequence, dict]] = []  # (sequence, Submit message) not yet admitted
    self.blocked: list[tuple[Sequence, dict, float]] = []  # ship requests waiting for Begin, next try time
    self.ship: set[int] = set()  # uids of requests prefilled here for another worker
    self.local: dict[int, Sequence] = {}  # uid -> sequence in this worker's scheduler
    self.incoming: dict[int, Incoming] = {}
    self.kv_info: dict[int, dict] = {}  # uid -> transfer timings, attached to the request's output
    self.writes: list[tuple] = []  # (uid, layer, positions, k, v, whole pages?) received, not yet in the cache
    self.aborts: set[int] = set()
    self.outputs: list[dict] = []
    self.events: list[dict] = []
    self.kv_stages = {"messages": 0, "bytes": 0, "decode_s": 0.0, "to_device_s": 0.0, "write_s": 0.0}  # receipt
    self.compiles = compile_log()  # this process's XLA compiles (Poll's stats: the router counts new ones)

  # ---- called from gRPC handler threads ----

  def submit(self, msg: dict) -> None:
    seq = self._sequence(msg)
    with self.lock:
      self.submits.append((seq, msg))
    self.wake.set()

  def begin(self, msg: dict) -> None:
    """Reserves pages for a request's incoming KV; RESOURCE_EXHAUSTED when slots or pages are short."""
    seq = self._sequence(msg)
    uid, n = seq.index, msg.get("num_kv_tokens")
    if n != len(seq.prompt_ids) - 1:
      raise WorkerError("INVALID_ARGUMENT", f"request {uid}: num_kv_tokens={n}, expected prompt length - 1 = "
                                            f"{len(seq.prompt_ids) - 1}")
    with self.lock:
      if uid in self.incoming or uid in self.local:
        raise WorkerError("ALREADY_EXISTS", f"request {uid} is already on this worker")
      if self._num_seqs() >= self.max_num_seqs:
        raise WorkerError("RESOURCE_EXHAUSTED", f"request {uid}: all {self.max_num_seqs} slots taken")
      need = math.ceil(n / self.page_size)
      spare = self.scheduler.allocator.num_free - len(self.scheduler.running)
      if need > spare:
        raise WorkerError("RESOURCE_EXHAUSTED", f"request {uid}: needs {need} pages, {spare} spare")
      seq.pages = self.scheduler.allocator.allocate(need)
      inc = Incoming(seq, n, np.zeros((self.model.num_layers, n), bool), time.monotonic() + self.timeout_s,
                     [math.nan] * self.model.num_layers)
      self.incoming[uid] = inc
    if self.receiver is not None:
      self._begin_tier2(inc)

  def _begin_tier2(self, inc: Incoming) -> None:
    """Combined mode: places the request on a tier-2 shard; a refusal undoes the reservation."""
    uid = inc.seq.index
    try:
      transfer = self.receiver.begin(inc.seq.num_tokens + inc.seq.max_tokens)
    except Tier2Error as e:
      with self.lock:
        if self.incoming.pop(uid, None) is inc:
          self.scheduler.allocator.free(inc.seq.pages)
          inc.seq.pages = []
      raise WorkerError(_tier2_code(e), f"request {uid}: {e}") from None
    with self.lock:
      inc.tier2 = transfer
      if self.incoming.get(uid) is inc:
        return
    self._release_transfer(transfer)  # aborted or expired meanwhile

  def receive_kv(self, payload: bytes) -> None:
    """One layer's K,V; checks it against the model and the request before it goes to the device."""
    now = time.time()
    started = time.perf_counter()
    try:
      r = tensor_wire.decode_request(payload)
    except tensor_wire.WireError as e:
      raise WorkerError("INVALID_ARGUMENT", str(e)) from None
    m, uid = self.model, r.request_id
    expected = (m.num_kv_heads, m.head_dim)
    if r.k.shape[1:] != expected or r.q.shape[1] != m.num_heads:
      raise WorkerError("INVALID_ARGUMENT", f"request {uid} layer {r.layer}: k, v shape {r.k.shape} with "
                                            f"{r.q.shape[1]} heads, expected (N, {expected[0]}, {expected[1]}) "
                                            f"with {m.num_heads} heads")
    if r.k.dtype != np.dtype(m.dtype):
      raise WorkerError("INVALID_ARGUMENT", f"request {uid} layer {r.layer}: k, v dtype {r.k.dtype}, "
                                            f"expected {m.dtype}")
    if not 0 <= r.layer < m.num_layers:
      raise WorkerError("INVALID_ARGUMENT", f"request {uid}: layer {r.layer}, expected 0..{m.num_layers - 1}")
    with self.lock:
      inc = self.incoming.get(uid)
    if inc is None:
      raise WorkerError("NOT_FOUND", f"request {uid}: no transfer begun here (aborted or timed out)")
    pos = r.positions
    if pos.min() < 0 or pos.max() >= inc.num_kv_tokens:
      raise WorkerError("INVALID_ARGUMENT", f"request {uid} layer {r.layer}: positions {pos.min()}..{pos.max()} "
                                            f"outside the prompt's 0..{inc.num_kv_tokens - 1}")
    decoded = time.perf_counter()
    if inc.tier2 is not None:
      self._append_tier2(inc, r, len(payload), now, decoded - started)
      return
    t = kv_bucket(len(pos))
    if t == len(pos):  # no padding: straight from the message (device_put copies)
      k, v = r.k, r.v
    else:
      k = np.zeros((t,) + expected, r.k.dtype)
      v = np.zeros_like(k)
      k[:len(pos)], v[:len(pos)] = r.k, r.v
    ps = self.page_size
    pages = _whole_pages(pos, ps, inc.num_kv_tokens) and t % ps == 0
    if pages:  # whole pages of this request only (a partial page is its prompt's last)
      k, v = k.reshape(t // ps, ps, *expected), v.reshape(t // ps, ps, *expected)
    k, v = jax.device_put(k), jax.device_put(v)
    with self.lock:
      self._count(len(payload), decode_s=decoded - started, to_device_s=time.perf_counter() - decoded)
      inc.received[r.layer, pos] = True
      if math.isnan(inc.layer_received_s[r.layer]):
        inc.layer_received_s[r.layer] = now
      self.writes.append((uid, r.layer, np.array(pos), k, v, pages))
    self.wake.set()

  def _append_tier2(self, inc: Incoming, r, num_bytes: int, now: float, decode_s: float) -> None:
    """Combined mode: receive_kv's store, the message's K,V appended to the request's tier-2 shard."""
    uid, pos = inc.seq.index, r.positions
    if not (np.diff(pos) == 1).all():
      raise WorkerError("INVALID_ARGUMENT", f"request {uid} layer {r.layer}: positions not consecutive (a "
                                            "two-tier decode worker appends each message's K,V in order)")
    started = time.perf_counter()
    try:
      stored = self.receiver.append(inc.tier2, r.layer, pos, r.k, r.v)
    except Tier2Error as e:
      raise WorkerError(_tier2_code(e), f"request {uid} layer {r.layer}: {e}") from None
    except ValueError:  # the client no longer knows the sequence: released by an abort or a timeout
      raise WorkerError("NOT_FOUND", f"request {uid}: no transfer begun here (aborted or timed out)") from None
    with self.lock:
      self._count(num_bytes, decode_s=decode_s, write_s=time.perf_counter() - started)
      for p in stored:
        inc.received[r.layer, p] = True
      if math.isnan(inc.layer_received_s[r.layer]):
        inc.layer_received_s[r.layer] = now

  def commit(self, msg: dict) -> None:
    """Every layer of the request's prompt has arrived: it joins the decode batch."""
    uid = int(msg["uid"])
    with self.lock:
      inc = self.incoming.get(uid)
      if inc is None:
        raise WorkerError("NOT_FOUND", f"request {uid}: no transfer begun here (aborted or timed out)")
      missing = inc.num_kv_tokens - inc.received.sum(axis=1)
      if missing.any():
        layer = int(np.argmax(missing > 0))
        raise WorkerError("FAILED_PRECONDITION", f"request {uid}: layer {layer} is missing {missing[layer]} of "
                                                 f"{inc.num_kv_tokens} tokens")
      inc.committed_s = time.time()
    self.wake.set()

  def abort(self, msg: dict) -> None:
    """Drops a request wherever it is here and frees its KV (done by the loop, within a step)."""
    uid = int(msg["uid"])
    with self.lock:
      inc = self.incoming.pop(uid, None)
      if inc is not None:
        self.scheduler.allocator.free(inc.seq.pages)
        inc.seq.pages = []
      else:
        self.aborts.add(uid)
    if inc is not None and inc.tier2 is not None:
      self._release_transfer(inc.tier2)
    self.wake.set()

  def poll(self) -> dict:
    """Finished outputs and events since the last poll, and this worker's load."""
    with self.lock:
      outputs, self.outputs = self.outputs, []
      events, self.events = self.events, []
      return {"outputs": outputs, "events": events, "stats": self._stats()}

  def close(self) -> None:
    """Two-tier placement: frees what this worker holds on tier 2 (best effort: servers given by address
    outlive it), then stops the tier-2 servers the engine spawned. Call after the loop has stopped."""
    if self.engine.tier2 is not None:
      with self.lock:
        transfers = [inc.tier2 for inc in self.incoming.values() if inc.tier2 is not None]
        self.incoming.clear()
      for transfer in transfers:
        self._release_transfer(transfer)
      self.engine._release_tier2(list(self.engine._tier2_ids), best_effort=True)  # noqa: SLF001
    self.engine.close()

  # ---- the loop thread ----

  def run(self, stop: threading.Event) -> None:
    while not stop.is_set():
      if not self.step():
        self.wake.wait(0.005)
        self.wake.clear()
    if self.sender is not None:
      self.sender.close()

  def step(self) -> bool:
    """One round: queued aborts, admissions and KV writes, one prefill batch, one decode call."""
    with self.lock:
      self._apply_aborts()
      self._admit()
      expired = self._expire()
      writes = self._take_writes()
      self._admit_committed()
    for transfer in expired:
      self._release_transfer(transfer)
    self._free_tier2()
    did = self._begin_blocked()
    started = time.perf_counter()
    for layer, k, v, page_ids, offsets in writes:
      self.engine.runner.write_layer_kv(layer, k, v, page_ids, offsets)
    if writes:
      self.engine.runner.wait()  # the writes' time measured (kv_stages), not hidden in the next call
      with self.lock:
        self._count(0, write_s=time.perf_counter() - started)
    did = self._prefill() or did
    did = self._decode() or did
    return did or bool(writes)

  def _count(self, num_bytes: int, **seconds: float) -> None:
    """Adds to kv_stages (under `lock`): a received message's bytes, or seconds spent per stage."""
    self.kv_stages["messages"] += num_bytes > 0
    self.kv_stages["bytes"] += num_bytes
    for key, s in seconds.items():
      self.kv_stages[key] += s

  def _sequence(self, msg: dict) -> Sequence:
    try:
      params = params_from_json(msg["params"])
      seq = self.engine._sequences([msg["prompt_ids"]], params, [msg["request_id"]])[0]  # noqa: SLF001
      seq.index = int(msg["uid"])
    except KeyError as e:
      raise WorkerError("INVALID_ARGUMENT", f"request {msg.get('uid')}: missing field {e}") from None
    except (TypeError, ValueError) as e:
      raise WorkerError("INVALID_ARGUMENT", f"request {msg.get('uid')}: {e}") from None
    return seq

  def _num_seqs(self) -> int:
    return len(self.local) + len(self.incoming)

  def _admit(self) -> None:
    """Submitted requests enter the scheduler (local) or wait for their Begin (ship) while slots last."""
    while self.submits:
      seq, msg = self.submits[0]
      address = msg.get("decode_address", "")
      if not address and self._num_seqs() >= self.max_num_seqs:
        break
      self.submits.pop(0)
      if address:
        self.blocked.append((seq, msg, 0.0))
      else:
        self.local[seq.index] = seq
        self.scheduler.add(seq)

  def _begin_blocked(self) -> bool:
    """Asks each ship request's decode worker to reserve its KV, in arrival order, while this worker's
    prompt tokens begun but not yet prefilled are under one prefill batch (engine.max_prefill_tokens):
    a reservation is made just before its prefill, so it never expires while the request is queued here."""
    with self.lock:
      due = [b for b in self.blocked if b[2] <= time.monotonic()]
    did = False
    for entry in due:
      if self._ship_backlog() >= self.max_prefill_tokens:
        break
      seq, msg, _ = entry
      uid, address = seq.index, msg["decode_address"]
      begin = {k: msg[k] for k in ("uid", "request_id", "prompt_ids", "params")}
      begin["num_kv_tokens"] = len(seq.prompt_ids) - 1
      error = None
      try:
        self.sender.begin(uid, address, begin)
        begun = time.time()
      except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
          with self.lock:
            if entry in self.blocked:
              self.blocked[self.blocked.index(entry)] = (seq, msg, time.monotonic() + BEGIN_RETRY_S)
          continue
        error = e
      did = True
      with self.lock:
        if entry not in self.blocked:  # aborted meanwhile
          if error is None:
            self.sender.abort(uid, self._transfer_done)
          continue
        self.blocked.remove(entry)
        if error is not None:
          self.events.append({"uid": uid, "event": "transfer_failed", "error": _describe(error)})
        elif begin["num_kv_tokens"] == 0:  # nothing to prefill
          self.sender.finish(uid, True, self._transfer_done)
        else:
          self.events.append({"uid": uid, "event": "begun", "t": begun})
          self.ship.add(uid)
          self.local[uid] = seq
          self.scheduler.add(seq)
    return did

  def _ship_backlog(self) -> int:
    """Prompt tokens of begun ship requests not yet dispatched to the device."""
    with self.lock:
      return sum(q.num_tokens - 1 - q.num_computed for u, q in self.local.items() if u in self.ship)

  def _prefill(self) -> bool:
    """Dispatches one prefill batch; the rows shipped elsewhere run layer by layer, their K,V fetched and
    sent by the sender while this loop goes on (at most splitwise.prefills_in_flight such batches: at the
    limit, only requests prefilled for this worker's own decode go)."""
    throttled = self.sender is not None and self.sender.batches_in_flight >= self.prefills_in_flight
    with self.lock:
      batch = self.scheduler.schedule_prefill(lambda seq: not throttled or seq.index not in self.ship)
    if batch is None:
      return False
    runner = self.engine.runner
    args = (batch.tokens, batch.positions, batch.page_ids, batch.offsets, batch.block_tables, batch.context_lens)
    width = batch.tokens.shape[1]
    rows, take = [], []
    for i, (seq, chunk) in enumerate(batch.rows):
      if seq.index in self.ship:
        rows.append(ShippedRow(seq.index, len(take), batch.positions[i, :chunk].copy()))
        take.extend(range(i * width, i * width + chunk))
    if rows:
      n = min(kv_bucket(len(take)), batch.tokens.size)
      kvs = runner.prefill_by_layer(*args, np.pad(np.asarray(take, np.int32), (0, n - len(take))),
                                    self.layers_per_call)
    else:
      seqs = [seq for seq, _ in batch.rows]
      try:
        runner.prefill(*args, self._tier2_rows(seqs, len(batch.tokens), [q for q in seqs if q.num_computed == 0]))
      except (KVCacheFullError, ShardUnavailableError) as e:  # the batch is not committed: it runs again
        self._tier2_trouble(e)
        return True
    dispatched = time.time()
    finished = []
    with self.lock:
      batch.commit()
      for seq, _ in batch.rows:
        uid = seq.index
        if seq.decode_ready:  # its last chunk is on the device's queue
          self.events.append({"uid": uid, "event": "dispatched", "t": dispatched})
        if uid in self.ship and seq.decode_ready and seq in self.scheduler.running:
          self.scheduler.finish(seq)  # its pages are reused only by later device calls
          self.ship.discard(uid)
          del self.local[uid]
          finished.append(uid)
    if rows:
      self.sender.ship(kvs, rows, finished, self._prefilled, self._transfer_done)
    return True

  def _prefilled(self, uid: int, now: float) -> None:
    with self.lock:
      self.events.append({"uid": uid, "event": "prefilled", "prefill_end_s": now})

  def _decode(self) -> bool:
    with self.lock:
      batch = self.scheduler.schedule_decode()
    if batch is None:
      return False
    start = time.time()
    try:
      tokens = self.engine.runner.decode(batch.tokens, batch.positions, batch.block_tables, batch.token_index,
                                         batch.temperature, batch.top_k, batch.top_p, batch.seeds,
                                         batch.greedy_only, self._tier2_rows(batch.seqs, len(batch.tokens)))
    except (KVCacheFullError, ShardUnavailableError) as e:
      self._tier2_trouble(e)
      return True
    now = time.time()
    with self.lock:
      self.engine.append_decoded(batch.seqs, tokens, start, now, self._finish)
    return True

  def _tier2_rows(self, seqs: list[Sequence], rows: int, fresh: list[Sequence] = ()) -> np.ndarray | None:
    """Two-tier placement: frees the tier-2 KV that can go (finished, aborted, preempted, and `fresh` rows
    prefilled from their start), then the rows' tier-2 ids [rows] (Engine's); None for placement local."""
    if self.engine.tier2 is None:
      return None
    self._free_tier2(list(fresh))
    return self.engine._tier2_rows(seqs, rows)  # noqa: SLF001

  def _tier2_trouble(self, error: KVCacheFullError | ShardUnavailableError) -> None:
    """Two-tier placement, as the Engine's loop does: a full shard preempts its newest sequence; a lost
    shard's sequences are prefilled again on the others (none left: the error stops this worker)."""
    with self.lock:
      self.engine._recover_tier2(self.scheduler, error)  # noqa: SLF001

  def _free_tier2(self, more: list[Sequence] = ()) -> None:
    """Loop thread (the only one that touches the engine's tier-2 ids): frees sequences' tier-2 KV."""
    if self.engine.tier2 is None:
      return
    with self.lock:
      done, self.tier2_done = self.tier2_done + self.scheduler.take_preempted(), []
    self.engine._release_tier2(done + list(more), best_effort=True)  # noqa: SLF001

  def _release_transfer(self, transfer: Tier2Transfer) -> None:
    """Frees a transfer's tier-2 KV that never joined the decode batch (an unreachable shard lost it anyway)."""
    try:
      self.receiver.release(transfer)
    except (Tier2Error, ValueError) as e:
      logging.warning("releasing tier-2 sequence %d failed: %s", transfer.tier2_id, e)

  def _finish(self, seq: Sequence) -> None:
    self.scheduler.finish(seq)
    self._forget_tier2(seq)
    del self.local[seq.index]
    out = {"uid": seq.index, "request_id": seq.request_id, "token_ids": list(seq.output_ids),
           "finish_reason": seq.finish_reason, "text": seq.text, "token_times_s": list(seq.token_times_s)}
    out.update(self.kv_info.pop(seq.index, {}))
    self.outputs.append(out)

  def _transfer_done(self, uid: int, error: Exception | None, info: dict) -> None:
    with self.lock:
      if error is None:
        self.events.append({"uid": uid, "event": "transferred", **info})
      else:
        self.events.append({"uid": uid, "event": "transfer_failed", "error": _describe(error), **info})

  def _apply_aborts(self) -> None:
    for uid in self.aborts:
      self.submits = [s for s in self.submits if s[0].index != uid]
      self.blocked = [b for b in self.blocked if b[0].index != uid]
      seq = self.local.pop(uid, None)
      if seq is not None:
        if seq in self.scheduler.running:
          self.scheduler.finish(seq)
        elif seq in self.scheduler.waiting:
          self.scheduler.waiting.remove(seq)
        self._forget_tier2(seq)
      self.ship.discard(uid)
      if self.sender is not None:  # also stops a transfer whose prefill is still being fetched
        self.sender.abort(uid, lambda *_: None)
      self.kv_info.pop(uid, None)
    self.aborts.clear()

  def _forget_tier2(self, seq: Sequence) -> None:
    """Under `lock`: a finished or aborted sequence's tier-2 KV is freed by the loop's next _free_tier2."""
    if self.engine.tier2 is not None:
      self.tier2_done.append(seq)

  def _expire(self) -> list[Tier2Transfer]:
    """Frees transfers not committed in time; returns their tier-2 transfers (released outside `lock`)."""
    now = time.monotonic()
    expired = []
    for uid in [u for u, inc in self.incoming.items() if inc.deadline < now and not inc.committed_s]:
      inc = self.incoming.pop(uid)
      self.scheduler.allocator.free(inc.seq.pages)
      self.events.append({"uid": uid, "event": "kv_timeout"})
      if inc.tier2 is not None:
        expired.append(inc.tier2)
    return expired

  def _admit_committed(self) -> None:
    """Committed transfers join the decode batch (their writes were taken just before)."""
    for uid in [u for u, inc in self.incoming.items() if inc.committed_s]:
      inc = self.incoming.pop(uid)
      inc.seq.num_computed = inc.num_kv_tokens
      if inc.tier2 is not None:  # decodes under the tier-2 id its K,V went to
        self.engine._tier2_ids[inc.seq] = inc.tier2.tier2_id  # noqa: SLF001
      self.local[uid] = inc.seq
      self.kv_info[uid] = {"kv_layer_received_s": inc.layer_received_s, "commit_s": inc.committed_s,
                           "admitted_s": time.time()}
      self.scheduler.admit_prefilled(inc.seq)

  def _take_writes(self) -> list[tuple]:
    """Received K,V whose request still holds its pages, with their page ids and offsets: [T]."""
    out = []
    for uid, layer, pos, k, v, pages in self.writes:
      seq = self.incoming[uid].seq if uid in self.incoming else None
      if seq is None:
        continue
      page_ids = np.full((k.shape[0],), SCRATCH_PAGE, np.int32)
      if pages:
        first = pos[0] // self.page_size
        used = seq.pages[first:first + math.ceil(len(pos) / self.page_size)]
        page_ids[:len(used)] = used
        out.append((np.int32(layer), k, v, page_ids, None))
        continue
      offsets = np.zeros((k.shape[0],), np.int32)
      page_ids[:len(pos)] = np.asarray(seq.pages, np.int32)[pos // self.page_size]
      offsets[:len(pos)] = pos % self.page_size
      out.append((np.int32(layer), k, v, page_ids, offsets))
    self.writes = []
    return out

  def _stats(self) -> dict:
    s = self.scheduler
    pending = sum(len(q.prompt_ids) for q, *_ in self.submits + self.blocked)
    pending += sum(q.num_tokens - 1 - q.num_computed for q in self.local.values() if not q.decode_ready)
    held = [q for q in self.local.values() if q.index not in self.ship] + [i.seq for i in self.incoming.values()]
    held += [q for q, m in self.submits if not m.get("decode_address")]
    return {"role": self.role, "device": self.device, "pending_prompt_tokens": int(pending),
            "kv_reserved_tokens": int(sum(len(q.prompt_ids) + q.max_tokens for q in held)),
            "kv_capacity_tokens": (self.engine.num_pages - 1) * self.page_size,
            "kv_used_pages": self.engine.num_pages - 1 - s.allocator.num_free,
            "num_seqs": len(held), "max_num_seqs": self.max_num_seqs, "num_incoming": len(self.incoming),
            "num_shipping": len(self.ship) + len(self.blocked), "kv_stages": dict(self.kv_stages),
            "tier2_addresses": self.engine.tier2.addresses if self.engine.tier2 is not None else [],
            "compiles": self.compiles.snapshot()}


def kv_bucket(n: int) -> int:
  """Tokens of K,V moved between host and device for n real ones (a prefill's shipped tokens, a received
  message): a power of two, at least MIN_PREFILL_TOKENS, so the gathers and writes compile a few times
  (each compile on a GPU would stall the loop in a measured run; padding costs only device-host bytes)."""
  return max(pow2_at_least(n), MIN_PREFILL_TOKENS)


def _whole_pages(pos: np.ndarray, page_size: int, num_kv_tokens: int) -> bool:
  """Positions that fill whole pages of a request from a page start: consecutive, starting on a page
  boundary and ending on one or at the prompt's last token (so padding to whole pages overwrites no
  token another message brings)."""
  first, n = int(pos[0]), len(pos)
  ends = (first + n) % page_size == 0 or first + n == num_kv_tokens
  return first % page_size == 0 and ends and int(pos[-1]) == first + n - 1 and bool((np.diff(pos) == 1).all())


def _tier2_code(error: Tier2Error) -> str:
  """The status a worker answers for a tier-2 failure: tier 2's own (RESOURCE_EXHAUSTED when full)."""
  return error.code.name if error.code is not None else "INTERNAL"


def _describe(error: Exception) -> str:
  if isinstance(error, grpc.RpcError):
    return f"{error.code().name}: {error.details()}"
  return str(error)
