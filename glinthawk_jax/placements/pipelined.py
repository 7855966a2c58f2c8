"""Placement "pipelined": one jitted tier-1 step per layer, tier-2 attention as futures, several
micro-batches in flight so tier 1 computes one while tier 2 serves another.

Steps (each compiled once per shape and reused for every layer; layer weights are arguments):
  first:  embed + pre-attention of layer 0                    -> x, q, k, v
  middle: post-attention of layer L + pre-attention of L + 1  -> x, q, k, v
  last:   post-attention of the last layer + logits + sampling -> tokens
  bulk:   a whole layer over a prompt's first chunk, attention local (causal) -> x, k, v
After a step, q, k, v go to the host (tier2.host_copy: by default the step's own program copies them into the
accelerator's pinned host memory, which DMA fills faster than pageable memory) and to tier 2 (`attend_async`, which
appends K, V and returns the attention output) from a sender thread (tier2.send_thread), so the main
thread only dispatches; the thread that completes a decode step's tier-2 call puts its output on the
device for the next step. Within a decode step the rows' split by shard is made once (the client's plan)
and, with tier2.split "spread", each micro-batch's rows are grouped by shard, so each shard's q, k, v
are views of the batch. A batch is split into `in_flight` micro-batches (fewer only with fewer rows);
whenever tier 1 is free it advances the ready micro-batch that is furthest along (step, then layer),
else starts a new one, else waits for the first tier-2 reply. With engine.decode_steps_per_call > 1 a
micro-batch that sampled its tokens starts its next step at once, so micro-batches drift apart instead
of meeting at every step; the host scheduler (admission, stop rules) runs between decode calls.

Prefill: a prompt's first chunk runs on tier 1 alone (`bulk`, attention over the chunk itself) and
each layer's K, V goes to tier 2 with an append-only request while the next layer computes. Later
chunks of prompts longer than engine.max_prefill_tokens attend through tier 2 like decode (tier 2
holds the earlier chunks' keys).

Local share (local_attention_fraction > 0, `local` = tier 1's paged cache): rows whose seq_id is
LOCAL_ROW keep their KV on tier 1. Right behind each step that makes a micro-batch's q, k, v, a jitted
local step writes those rows' k, v into the paged cache and attends there (`_attend_locally`; pages from
the block tables, so decode steps fused in one call find theirs); the tier-2 request carries only the
other rows, and when its reply arrives the two are merged row by row (`_with_local`) before the next
step. Bulk prefill writes local rows' k, v into the cache instead of appending them to tier 2. Tier-2
rows write to the scratch page (the scheduler gives them no pages here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from concurrent import futures

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glinthawk_jax.config import MAX_IN_FLIGHT
from glinthawk_jax.model_runner import LocalPagedAttention
from glinthawk_jax.paged_cache import SCRATCH_PAGE
from glinthawk_jax.placements.shard_order import grouped_within, interleaved
from glinthawk_jax.placements.tokens import LOCAL_ROW, PADDING_ROW, valid_tokens
from glinthawk_jax.sampling import sample
from glinthawk_jax.scheduler import pow2_at_least
from glinthawk_jax.sharding import Layout
from glinthawk_jax.tier2_client import Tier2Client, Tier2Error
from models.attention import causal_mask, grouped_attention


@dataclasses.dataclass
class _Micro:
  """One micro-batch: rows [R] of a batch, its residual stream and the tier-2 call it waits on."""

  rows: slice  # rows of the caller's batch
  tokens: np.ndarray  # [R, T]
  positions: np.ndarray  # [R, T]
  context_lens: np.ndarray  # [R]
  seq_ids: np.ndarray  # [R], -1 = padding
  sampling: tuple | None  # (temperature, top_k, top_p, seeds, token_index) for decode, None for prefill
  x: jax.Array | None = None
  layer: int = -1  # the layer whose attention `pending` computes
  pending: futures.Future | None = None
  sent_at: float = 0.0
  replied_at: float = 0.0  # when tier 2's last reply of the previous step arrived (0: none yet)
  q_shape: tuple = ()  # the padded q [R', T, H, D] of the last step
  index: tuple | slice = ()  # (rows, cols) of the real tokens in it (or their rows), () until the step's first send
  real_ids: np.ndarray | None = None  # their sequence ids and positions
  real_positions: np.ndarray | None = None
  plan: object = None  # the client's split of them by shard, made once for the step's layers
  results: list = dataclasses.field(default_factory=list)  # sampled tokens [R] of each decode step
  block_tables: np.ndarray | None = None  # [R, W] pages of tier 1's cache; None without LOCAL_ROW rows
  local_out: jax.Array | None = None  # local attention [R', T, H, D] of m.layer (LOCAL_ROW rows valid)
  positions_on_device: dict = dataclasses.field(default_factory=dict)  # by layer slice: a step's positions there


@dataclasses.dataclass
class PipelineStats:
  """Where the time went (seconds), over the runner's lifetime."""

  tier1_s: float = 0.0  # tier-1 steps, dispatch to q, k, v on the host
  dispatch_s: float = 0.0  # the part of tier1_s in dispatching jitted steps (the rest: device-to-host waits)
  send_s: float = 0.0  # handing q, k, v to the tier-2 client (split by shard, packed, sent)
  wait_s: float = 0.0  # tier 1 idle, waiting for a tier-2 reply
  rtt_s: float = 0.0  # sum of tier-2 round trips (send to reply)
  # Tier 1's turnarounds: a micro-batch's last tier-2 reply arriving to its next step's q, k, v sent. While
  # one lasts, tier 2 has only the other micro-batches' calls to serve.
  turnaround_s: float = 0.0
  max_turnaround_s: float = 0.0
  num_turnarounds: int = 0
  reply_s: float = 0.0  # tier 2's attention outputs readied for the next step (padded, put on the device)
  num_steps: int = 0
  num_round_trips: int = 0
  tier2_bytes: int = 0  # q, k, v sent plus attention outputs received


class PipelinedRunner:
  """Same prefill/decode interface as ModelRunner, attention on tier 2 through `client` (LOCAL_ROW rows
  in `local`, tier 1's paged cache, when given)."""

  def __init__(self, model, client: Tier2Client, decode_steps: int, in_flight: int, timeout_s: float,
               layout: Layout | None = None, local: LocalPagedAttention | None = None, spread: bool = False,
               send_thread: bool = True, host_copy: str = "fused"):
    self.client = client
    self.spread = spread  # decode micro-batches span every shard (tier2.split "spread") instead of few
    self.decode_steps = decode_steps
    self.timeout_s = timeout_s
    self.depth = in_flight  # 0 until measured
    self.num_layers = model.config.num_layers
    self.num_heads, self.num_kv_heads = model.config.num_heads, model.config.num_kv_heads
    self.sliding_window = model.config.sliding_window
    self.page_size = 1
    self.graphdef, params = nnx.split(model)
    self.layer_graphdef = nnx.split(model.layers)[0]
    # Layer L's weights on slice(L)'s devices (tensor-parallel within it); embed on the first slice,
    # logits on the last.
    self.layout = layout or Layout(self.num_layers)
    layers, outers = self.layout.per_layer_params(params)
    # Weights as flat tuples of arrays: jit flattens a tuple in C++, an nnx.State in Python (27 against 12 us
    # a layer's weights on the CPU); the steps rebuild the states from these tree structures.
    self.layer_def, self.outer_def, self.outer_last_def = (jax.tree_util.tree_structure(t) for t in
                                                           (layers[0], outers[0], outers[-1]))
    self.layers = [tuple(jax.tree_util.tree_leaves(layer)) for layer in layers]
    self.outer, self.outer_last = (tuple(jax.tree_util.tree_leaves(t)) for t in (outers[0], outers[-1]))
    self._host_copy = host_copy
    self._first = jax.jit(self._copying(self._first_fn))
    self._middle = jax.jit(self._copying(self._middle_fn))
    self._last = jax.jit(self._last_fn, static_argnames=("greedy_only",))
    self._post = jax.jit(lambda layer, x, attn: self._layer(layer).post_attention(x, attn))
    self._pre = jax.jit(self._copying(self._pre_fn))
    self._embed = jax.jit(lambda outer, tokens: self._model(self.outer_def, outer).embed(tokens))
    self._bulk = jax.jit(self._bulk_fn)
    # Tier 1's paged cache of local sequences, one backend and pool per layer slice.
    self.local = [] if local is None else [local.for_slice(first, end - first, self.layout.kv_sharding(s))
                                           for s, (first, end) in enumerate(self.layout.bounds)]
    self.local_states = [backend.init_state() for backend in self.local]
    self._local_attend = jax.jit(self._local_attend_fn, donate_argnums=(0,), static_argnames=("slice_index",))
    self._local_write = jax.jit(self._local_write_fn, donate_argnums=(0,), static_argnames=("slice_index",))
    self._merge = jax.jit(lambda local_rows, local_out, remote: jnp.where(
        local_rows[:, None, None, None], local_out, remote.astype(local_out.dtype)))
    self.stats = PipelineStats()
    self._stats_lock = threading.Lock()  # the sender thread adds to stats too
    # Replies go to the device as they arrive, not in the next step's dispatch (on an H200 host a
    # micro-batch's dispatch took about 2 ms per MiB of attention output); on the CPU backend jit takes a
    # NumPy argument as it is, so placing it early only adds a copy (measured slower on the CPU).
    self._place_replies = jax.default_backend() != "cpu"
    # One thread: sends in order. Without it the main thread sends, after each dispatch.
    self._sender = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier1-send") if send_thread else None
    self.compiled_shapes: set[tuple] = set()

  @property
  def num_compilations(self) -> int:
    return len(self.compiled_shapes)

  # Jitted steps.

  def _layer(self, leaves):
    """A layer module from its flat weights (inside a jitted step)."""
    return nnx.merge(self.layer_graphdef, jax.tree_util.tree_unflatten(self.layer_def, leaves))

  def _model(self, treedef, leaves):
    """The model module (embedding, final norm, logits) from a slice's flat outer weights."""
    return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(treedef, leaves))

  def _copying(self, step):
    """`step`, whose last output is q, k, v, with under host_copy "fused" their pinned-host copy as one more
    output of the same program."""
    if self._host_copy != "fused":
      return step

    def with_copy(*args):
      *outputs, qkv = step(*args)
      return (*outputs, qkv, jax.device_put(qkv, jax.memory.Space.Host))

    return with_copy

  def _first_fn(self, outer, layer, tokens, positions):
    x = self._model(self.outer_def, outer).embed(tokens)
    return x, _fuse(self._layer(layer).pre_attention(x, positions))

  def _middle_fn(self, layer, next_layer, x, attn, positions):
    x = self._layer(layer).post_attention(x, attn)
    return x, _fuse(self._layer(next_layer).pre_attention(x, positions))

  def _last_fn(self, outer, layer, x, attn, temperature, top_k, top_p, seeds, token_index, *, greedy_only):
    x = self._layer(layer).post_attention(x, attn)
    logits = self._model(self.outer_last_def, outer).logits(x[:, -1])
    return sample(logits, temperature, top_k, top_p, seeds, token_index, greedy_only)

  def _pre_fn(self, layer, x, positions):
    """Pre-attention alone (after a slice boundary): (q, k, v,)."""
    return (_fuse(self._layer(layer).pre_attention(x, positions)),)

  def _cross(self, next_slice, layer, next_layer, x, attn, positions):
    """The middle step across a slice boundary: post-attention on one slice, pre-attention on the next."""
    x = self.layout.to_slice(self._post(layer, x, attn), next_slice)
    return (x, *self._pre(next_layer, x, positions))

  def _bulk_fn(self, layer, x, positions, counts):
    layer = self._layer(layer)
    q, k, v = layer.pre_attention(x, positions)
    real_keys = jnp.arange(x.shape[1])[None, None, :] < counts[:, None, None]  # padding is no key
    mask = causal_mask(positions, positions, self.sliding_window) & real_keys
    return layer.post_attention(x, grouped_attention(q, k, v, mask)), k, v

  def _local_attend_fn(self, state, layer, qkv, block_tables, positions, context_lens, *, slice_index):
    """Writes k, v of the real tokens (positions [R, T], the first context_lens - positions[:, 0] of a
    row) at their pages in block_tables [R, W] and attends over the cache: (out [R, T, H, D], state)."""
    backend = self.local[slice_index]
    h, kv = self.num_heads, self.num_kv_heads
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:]
    t, width = positions.shape[1], block_tables.shape[1]
    col = positions // backend.page_size
    page = jnp.take_along_axis(block_tables, jnp.minimum(col, width - 1), axis=1)
    real = jnp.arange(t)[None, :] < (context_lens - positions[:, 0])[:, None]
    page = jnp.where(real & (col < width), page, SCRATCH_PAGE)
    offsets = positions % backend.page_size
    attend = (backend.decode_attend(page, offsets, block_tables, context_lens) if t == 1 else
              backend.prefill_attend(page, offsets, block_tables, positions, context_lens))
    return attend(layer, q, k, v, state)

  def _local_write_fn(self, state, layer, k, v, page_ids, offsets, *, slice_index):
    _, k_pool, v_pool = self.local[slice_index].write(state, layer, k, v, page_ids, offsets)
    return k_pool, v_pool

  def _attend_locally(self, m: _Micro, layer: int, step):
    """Enqueues the local attention of m's LOCAL_ROW rows for `layer` behind `step` (which made its
    q, k, v); returns step."""
    if m.block_tables is None or step is None or step[0] == "last":
      return step
    s = self.layout.slice_of(layer)
    context_lens = _pad(m.context_lens, 1)
    self.compiled_shapes.add(("local", m.positions.shape, m.block_tables.shape, s))
    m.local_out, self.local_states[s] = self._local_attend(
        self.local_states[s], np.int32(layer), step[1][1], m.block_tables, m.positions, context_lens,
        slice_index=s)
    return step

  def _with_local(self, m: _Micro, attn: np.ndarray):
    """Tier 2's attention [R', T, H, D] with m's LOCAL_ROW rows taken from the local attention."""
    if m.block_tables is None:
      return attn
    return self._merge(_pad(m.seq_ids, PADDING_ROW) == LOCAL_ROW, m.local_out, attn)

  # The ModelRunner interface.

  def wait(self) -> None:
    """Blocks until the local share's dispatched KV writes have finished (tier-2 work is waited for inline)."""
    jax.block_until_ready(self.local_states)

  def prefill(self, tokens, positions, page_ids, offsets, block_tables, context_lens, seq_ids) -> None:
    """Puts every layer's K, V of tokens: [B, T] on tier 2 (LOCAL_ROW rows': in the local cache): first
    chunks computed on tier 1 and appended in bulk, later chunks with attention through tier 2."""
    real = seq_ids != PADDING_ROW
    first = real & (positions[:, 0] == 0)
    if first.any():
      self._bulk_prefill(tokens[first], positions[first], context_lens[first], seq_ids[first], page_ids[first],
                         offsets[first])
    later = np.flatnonzero(real & ~first)
    if later.size:
      micros = [_Micro(rows, tokens[later][rows], positions[later][rows], context_lens[later][rows],
                       seq_ids[later][rows], None, block_tables=_local_tables(seq_ids[later][rows],
                                                                              block_tables[later][rows]))
                for rows in self._split(len(later), seq_ids[later])]
      self._run(micros, greedy_only=True, measure=False)

  def _bulk_prefill(self, tokens, positions, context_lens, seq_ids, page_ids, offsets) -> None:
    """Layer by layer on tier 1; layer L's K, V are appended while layer L + 1 computes (LOCAL_ROW rows'
    written to the local cache at page_ids, offsets: [B, T]). The device gathers each layer's real tier-2
    tokens, grouped by shard, into one array [2, N', KV, D] (N' = N padded to a power of two): one copy
    to the host, and each shard's request is a contiguous slice of it."""
    local = bool(np.any(seq_ids == LOCAL_ROW))
    tokens, positions, page_ids, offsets = _pad(tokens), _pad(positions), _pad(page_ids), _pad(offsets)
    counts = _pad(context_lens - positions[:len(context_lens), 0], 0)
    padded_ids = _pad(seq_ids, PADDING_ROW)
    rows, cols = valid_tokens(padded_ids, positions, _pad(context_lens, 1))
    rank = np.empty(len(padded_ids), np.int64)
    rank[self._by_shard(padded_ids)[0]] = np.arange(len(padded_ids))
    by_shard = np.argsort(rank[rows], kind="stable")
    rows, cols = rows[by_shard], cols[by_shard]
    ids, pos, n = padded_ids[rows], positions[rows, cols], len(rows)
    take = token_take(rows, cols)
    self.compiled_shapes.add(("bulk", tokens.shape))
    self.compiled_shapes.add(("gather", tokens.shape, take.shape))
    t = time.perf_counter()
    x = self._embed(self.outer, tokens)
    sent, previous = [], None
    for layer in range(self.num_layers):
      s = self.layout.slice_of(layer)
      x, k, v = self._bulk(self.layers[layer], self.layout.to_slice(x, s), positions, counts)
      if local:
        self.local_states[s] = self._local_write(self.local_states[s], np.int32(layer), k, v, page_ids, offsets,
                                                 slice_index=s)
      if n:
        kv = self._to_host(gather_tokens(k, v, take))
        if previous is not None:
          sent.append(self._append(layer - 1, ids, pos, previous))
        previous = kv
    if n:
      sent.append(self._append(self.num_layers - 1, ids, pos, previous))
    self.stats.tier1_s += time.perf_counter() - t
    t = time.perf_counter()
    for future in sent:
      future.result()
    self.stats.wait_s += time.perf_counter() - t

  def _append(self, layer, ids, pos, kv) -> futures.Future:
    self.stats.tier2_bytes += 2 * len(ids) * math.prod(kv.shape[2:]) * kv.dtype.itemsize
    return append_layer(self.client, layer, ids, pos, kv, self.timeout_s)

  def decode(self, tokens, positions, block_tables, token_index, temperature, top_k, top_p, seeds,
             greedy_only, seq_ids) -> np.ndarray:
    """`decode_steps` steps from tokens: [B] at positions: [B]; returns sampled tokens [steps, B]."""
    order, shards = self._by_shard(seq_ids, interleave=self.spread)
    cuts = self._split(len(order), seq_ids)
    if self.spread:  # each micro-batch's rows grouped by shard: its shards' rows are contiguous views
      within = grouped_within(shards, cuts)
      order = order[within]
    tokens, positions, seq_ids, temperature, top_k, top_p, seeds, token_index, block_tables = (
        np.asarray(a)[order] for a in (tokens, positions, seq_ids, temperature, top_k, top_p, seeds, token_index,
                                       block_tables))
    tokens = tokens.astype(np.int32)
    micros = [_Micro(rows, tokens[rows, None], positions[rows, None], positions[rows] + 1, seq_ids[rows],
                     (temperature[rows], top_k[rows], top_p[rows], seeds[rows], token_index[rows]),
                     block_tables=_local_tables(seq_ids[rows], block_tables[rows]))
              for rows in cuts]
    self._run(micros, greedy_only, measure=self.depth == 0)
    out = np.zeros((self.decode_steps, len(tokens)), np.int32)
    for m in micros:
      out[:, order[m.rows]] = np.stack(m.results)
    return out

  def _by_shard(self, seq_ids: np.ndarray, interleave: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row order with the tier-2 rows grouped by shard and the other rows (local, padding) after them in
    their order (unchanged order for a client without `shard_of`), so a micro-batch talks to few shards:
    each shard in a request costs tier 1 a call's host work (fan-out). With `interleave` the shards take
    turns instead (one row of each, then the next of each), so every micro-batch cut from the order
    spreads over all shards in proportion: each keeps every shard busy, not the few it holds rows of.
    Also returns the shard of each ordered row (the other rows: one past the last shard)."""
    real = np.flatnonzero(seq_ids >= 0)
    shard_of = getattr(self.client, "shard_of", None)  # a client of layer slices has a fleet per slice
    if shard_of is None:
      return np.arange(len(seq_ids)), np.zeros(len(seq_ids), np.int64)
    shards = np.fromiter((shard_of(s) for s in seq_ids[real].tolist()), np.int64, len(real))
    order = interleaved(shards) if interleave else np.argsort(shards, kind="stable")
    rest = np.flatnonzero(seq_ids < 0)
    last = shards.max(initial=-1) + 1
    return np.concatenate([real[order], rest]), np.concatenate([shards[order], np.full(len(rest), last)])

  # The pipeline.

  def _split(self, num_rows: int, seq_ids: np.ndarray) -> list[slice]:
    """`depth` micro-batches of the real rows (fewer only with fewer rows), of equal size within one row
    (padding rows at the end); tier 1 pads each to a power of two, tier 2 gets only the real rows."""
    real = int(np.count_nonzero(seq_ids != PADDING_ROW)) or 1
    parts = min(max(self.depth, 1), real)
    size = math.ceil(real / parts)
    return [slice(s, min(s + size, num_rows)) for s in range(0, real, size)]

  def _run(self, micros: list[_Micro], greedy_only: bool, measure: bool) -> None:
    """Runs the micro-batches through every layer. With `measure` (in_flight = 0, depth not yet known)
    they run one at a time and, if nothing compiled meanwhile, the timings set the depth.

    All ready micro-batches are dispatched (furthest along first) before the host blocks on any of
    their q, k, v, so the accelerator's queue holds the next step while the host sends the last."""
    waiting = list(micros)  # not started yet
    active: list[_Micro] = []
    before = (dataclasses.replace(self.stats), len(self.compiled_shapes),
              self._servers_busy() if measure and self.spread else None)
    while waiting or active:
      ready = sorted((m for m in active if m.pending.done()), key=lambda m: (len(m.results), m.layer),
                     reverse=True)
      if ready:
        launched = [(m, self._dispatch(m, self._with_local(m, self._reply(m)), greedy_only)) for m in ready]
        for m, step in launched:
          if not self._complete(m, step):
            active.remove(m)
      elif waiting and len(active) < max(self.depth, 1):
        m = waiting.pop(0)
        m.tokens, m.positions, m.positions_on_device = _pad(m.tokens), _pad(m.positions), {}
        if m.sampling is not None:
          m.sampling = tuple(_pad(a) for a in m.sampling)
        if m.block_tables is not None:
          m.block_tables = _pad(m.block_tables)
        self._complete(m, self._dispatch_first(m))
        active.append(m)
      else:
        t = time.perf_counter()
        futures.wait([m.pending for m in active], return_when=futures.FIRST_COMPLETED)
        self.stats.wait_s += time.perf_counter() - t
    if measure and len(self.compiled_shapes) == before[1]:
      s, b = self.stats, before[0]
      rounds = max(s.num_round_trips - b.num_round_trips, 1)
      t1_s, rtt_s = (s.tier1_s - b.tier1_s) / max(s.num_steps - b.num_steps, 1), (s.rtt_s - b.rtt_s) / rounds
      if self.spread:
        busy = self._servers_busy()  # a server sees 1 / layer_slices of the round trips
        work_s = 0.0 if busy is None or before[2] is None or not busy.size or len(busy) != len(before[2]) else \
            float(np.max(busy - before[2])) * self.layout.layer_slices / rounds
        # At most the round trip: servers shared with another client must not flatten the bound to depth 1.
        self.depth = spread_depth(t1_s, rtt_s, min(work_s, rtt_s))
      else:
        self.depth = auto_depth(t1_s, rtt_s)

  def _servers_busy(self) -> np.ndarray | None:
    """Each tier-2 server's busy seconds so far (Stats), or None when the client cannot tell."""
    stats = getattr(self.client, "stats", None)
    if stats is None:
      return None
    try:
      return np.array([row["busy_seconds"] for row in stats()])
    except (grpc.RpcError, Tier2Error, KeyError):
      return None

  def _positions_on(self, m: _Micro, layer: int) -> jax.Array:
    """m's positions on the devices of `layer`'s slice (whose pre-attention reads them), copied there once a
    step: jit copies a NumPy argument at every dispatch."""
    s = self.layout.slice_of(layer)
    if s not in m.positions_on_device:
      m.positions_on_device[s] = jax.device_put(m.positions, self.layout.replicated(s))
    return m.positions_on_device[s]

  def _dispatch_first(self, m: _Micro):
    return self._attend_locally(m, 0, self._launch("first", self._first, self.outer, self.layers[0], m.tokens,
                                                   self._positions_on(m, 0)))

  def _dispatch(self, m: _Micro, attn: np.ndarray, greedy_only: bool):
    """Enqueues m's next tier-1 step after the attention of m.layer: (kind, device outputs), or None
    when m is done (a prefill past its last layer)."""
    if m.layer < self.num_layers - 1:
      nxt = self.layout.slice_of(m.layer + 1)
      step = self._middle if self.layout.slice_of(m.layer) == nxt else functools.partial(self._cross, nxt)
      return self._attend_locally(m, m.layer + 1, self._launch("middle", step, self.layers[m.layer],
                                                               self.layers[m.layer + 1], m.x, attn,
                                                               self._positions_on(m, m.layer + 1)))
    if m.sampling is None:
      return None
    return self._launch("last", functools.partial(self._last, greedy_only=greedy_only), self.outer_last,
                        self.layers[-1], m.x, attn, *m.sampling, tag=(greedy_only,))

  def _launch(self, kind: str, fn, *args, tag=()):
    """Dispatches a jitted step (no waiting) and starts copying what the host needs: q, k, v or tokens."""
    self.compiled_shapes.add((kind, *tag) + tuple(a.shape for a in args[2:]))
    t = time.perf_counter()
    out = fn(*args)
    if kind == "last":
      out.copy_to_host_async()
    elif self._host_copy != "fused":  # x and q, k, v on the device (local attention reads them there), then
      out = (*out, self._to_host(out[1]))  # q, k, v's host copy ("fused": the step made it)
    with self._stats_lock:
      self.stats.dispatch_s += time.perf_counter() - t
      self.stats.tier1_s += time.perf_counter() - t
      self.stats.num_steps += 1
    return kind, out

  def _to_host(self, x: jax.Array) -> jax.Array:
    """Starts x's copy to the host: x in pinned host memory (np.asarray of it then reads host memory; for
    np.asarray only, no device compute), or with host_copy "pageable" x itself (its NumPy copy on the way)."""
    if self._host_copy != "pageable":
      return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
    x.copy_to_host_async()
    return x

  def _complete(self, m: _Micro, step) -> bool:
    """Waits for a dispatched step and sends its q, k, v to tier 2; False when m has finished."""
    if step is None:
      return False
    kind, out = step
    t = time.perf_counter()
    if kind == "last":
      tokens = np.asarray(out)
      with self._stats_lock:
        self.stats.tier1_s += time.perf_counter() - t
      m.results.append(tokens[:len(m.seq_ids)])
      if len(m.results) == self.decode_steps:
        return False
      # The next decode step of this micro-batch starts at once, without waiting for the others.
      m.tokens, m.positions, m.context_lens = tokens[:, None], m.positions + 1, m.context_lens + 1
      m.positions_on_device = {}
      m.index = ()
      m.sampling = m.sampling[:4] + (m.sampling[4] + 1,)
      return self._complete(m, self._dispatch_first(m))
    x, qkv, qkv_host = out
    m.x, m.layer = x, 0 if kind == "first" else m.layer + 1
    if not m.index:
      m.index = self._real_tokens(m)
    m.q_shape = qkv.shape[:2] + (self.num_heads, qkv.shape[3])
    # The sender thread waits for q, k, v on the host and sends them while this thread dispatches the next
    # micro-batch's step (the copies and the wait release the GIL).
    m.pending = futures.Future()
    m.pending.set_running_or_notify_cancel()
    if self._sender:
      self._sender.submit(self._send, m, qkv_host, m.layer, m.pending)
    else:
      self._send(m, qkv_host, m.layer, m.pending)
    return True

  def _send(self, m: _Micro, qkv: jax.Array, layer: int, reply: futures.Future) -> None:
    """On the sender thread (or the main one): q, k, v of m's step (qkv [R, T, H + 2 KV, D], heads of q then
    k then v) to tier 2; `reply` gets the attention output (or the error)."""
    try:
      t = time.perf_counter()
      qkv = np.asarray(qkv)  # one device-to-host copy for q, k and v
      sent = time.perf_counter()
      real = qkv[m.index, 0] if isinstance(m.index, slice) else qkv[m.index]
      h, kv = self.num_heads, self.num_kv_heads
      q, k, v = real[:, :h], real[:, h:h + kv], real[:, h + kv:]
      padded = None  # a decode step's output, written straight into m's rows (padding rows zero)
      if isinstance(m.index, slice):
        padded = np.empty((m.q_shape[0],) + q.shape[1:], q.dtype)
        padded[len(q):] = 0
      call = self.client.attend_async(layer, m.real_ids, m.real_positions, q, k, v, timeout_s=self.timeout_s,
                                      plan=m.plan, out=padded)
      m.sent_at = time.perf_counter()
      with self._stats_lock:
        self.stats.tier1_s += sent - t
        self.stats.send_s += m.sent_at - sent
        if m.replied_at:
          turn = m.sent_at - m.replied_at
          self.stats.turnaround_s += turn
          self.stats.max_turnaround_s = max(self.stats.max_turnaround_s, turn)
          self.stats.num_turnarounds += 1
        self.stats.tier2_bytes += 2 * q.nbytes + 2 * k.nbytes
    except BaseException as e:  # noqa: BLE001 (raised on the main thread by m.pending.result())
      reply.set_exception(e)
      return
    call.add_done_callback(functools.partial(self._arrived, m, layer, reply))

  def _arrived(self, m: _Micro, layer: int, reply: futures.Future, call: futures.Future) -> None:
    """On the thread that completed tier 2's call: its attention output to `reply`, for a decode step
    already padded to m's rows [R, 1, H, D] and (not on the CPU) on its way to the device."""
    t = time.perf_counter()
    try:
      out = call.result()
      if isinstance(m.index, slice):
        out = out[:, None]
        if self._place_replies:
          out = jax.device_put(out, self.layout.replicated(self.layout.slice_of(layer)))
    except BaseException as e:  # noqa: BLE001 (raised on the main thread by m.pending.result())
      reply.set_exception(e)
      return
    m.replied_at = time.perf_counter()
    with self._stats_lock:
      self.stats.reply_s += m.replied_at - t
    reply.set_result(out)

  def _real_tokens(self, m: _Micro):
    """(rows, cols) of m's real tokens, or the slice of rows holding them when they are one token (column
    0) in each of the first rows (a decode step: padding and local rows come last); also sets their
    sequence ids, positions and the client's plan, fixed for m's whole step."""
    seq_ids = _pad(m.seq_ids, -1)
    rows, cols = valid_tokens(seq_ids, m.positions, _pad(m.context_lens, 1))
    m.real_ids, m.real_positions = seq_ids[rows], m.positions[rows, cols]
    m.plan = self.client.plan(m.real_ids, m.real_positions)
    if m.positions.shape[1] == 1 and (not len(rows) or rows[-1] == len(rows) - 1):
      return slice(0, len(rows))
    return rows, cols

  def _reply(self, m: _Micro):
    out = m.pending.result()
    self.stats.rtt_s += time.perf_counter() - m.sent_at
    self.stats.num_round_trips += 1
    if isinstance(m.index, slice):
      return out  # [R, 1, H, D], padded in _arrived
    attn = np.zeros(m.q_shape, out.dtype)
    attn[m.index] = out
    return attn


def token_take(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """gather_tokens' `take` [2, N']: the tokens' (rows, cols), padded with (0, 0) to a power of two N' (few
  compiled shapes; the padding tokens' K, V are gathered and never sent)."""
  take = np.zeros((2, pow2_at_least(max(len(rows), 1))), np.int32)
  take[:, :len(rows)] = rows, cols
  return take


@jax.jit
def gather_tokens(k, v, take):
  """k, v [R, T, KV, D] -> [2, N, KV, D]: the tokens at (rows, cols) = take [2, N]."""
  return jnp.stack([k[take[0], take[1]], v[take[0], take[1]]])


def append_layer(client, layer: int, ids: np.ndarray, pos: np.ndarray, kv, timeout_s: float) -> futures.Future:
  """Appends a layer's K, V to tier 2: kv [2, N', KV, D] (device or host) whose first len(ids) tokens are
  real, grouped by shard (each shard's request is then a view of the host copy, not a gather)."""
  kv = np.asarray(kv)[:, :len(ids)]
  return client.append_async(layer, ids, pos, kv[0], kv[1], timeout_s=timeout_s)


def auto_depth(t1_s: float, rtt_s: float) -> int:
  """Micro-batches that keep tier 1 busy: ceil((t1 + rtt) / t1), clamped to [1, MAX_IN_FLIGHT]."""
  return int(min(max(math.ceil((t1_s + rtt_s) / max(t1_s, 1e-6)), 1), MAX_IN_FLIGHT))


def spread_depth(t1_s: float, rtt_s: float, work_s: float = 0.0) -> int:
  """Micro-batches for tier2.split "spread", from one micro-batch of the whole batch (t1: tier 1's step
  and host work, rtt: its round trip, work: the busiest server's time serving it). k micro-batches that
  each span every shard take about rtt / k at tier 2, so a layer takes at least max(k t1 (tier 1 serves
  each), t1 + rtt / k (one micro-batch's cycle), work (tier 2 serves the whole batch)): the k in
  [1, MAX_IN_FLIGHT] that minimizes it, the smallest of equals, since each micro-batch costs every server
  a call's host work. On an H200 host (docs/BENCHMARKS.md) 2 against more, in one call each: Llama-2-7B
  0.800 against 0.76-0.79 (4), 0.78 and 0.65 against 0.71 (3); Llama-3-8B 0.59 and 0.77 against 0.67, 0.61
  and 0.64 against 0.56 (3): better in 4 of 5 comparisons, within a drift as large."""
  t1_s = max(t1_s, 1e-6)
  return min(range(1, MAX_IN_FLIGHT + 1), key=lambda k: (max(k * t1_s, t1_s + rtt_s / k, work_s), k))


def _local_tables(seq_ids: np.ndarray, block_tables: np.ndarray) -> np.ndarray | None:
  """A micro-batch's block tables when it has LOCAL_ROW rows, else None (no local step)."""
  return block_tables if np.any(seq_ids == LOCAL_ROW) else None


def _fuse(qkv) -> jax.Array:
  """q [R, T, H, D], k and v [R, T, KV, D] -> [R, T, H + 2 KV, D]: one host copy instead of three."""
  return jnp.concatenate(qkv, axis=2)


def _pad(a: np.ndarray, fill=0) -> np.ndarray:
  """Pads the leading (row) axis to a power of two, repeating `fill`."""
  rows = pow2_at_least(len(a))
  if rows == len(a):
    return a
  return np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], fill, a.dtype)])
