"""Placement "pipelined": one jitted tier-1 step per layer, tier-2 attention as futures, several
micro-batches in flight so tier 1 computes one while tier 2 serves another.

Steps (each compiled once per shape and reused for every layer; layer weights are arguments):
  first:  embed + pre-attention of layer 0                    -> x, q, k, v
  middle: post-attention of layer L + pre-attention of L + 1  -> x, q, k, v
  last:   post-attention of the last layer + logits + sampling -> tokens
After a step, q, k, v go to the host (`copy_to_host_async`) and to tier 2 (`attend_async`, which
appends K, V and returns the attention output). A batch is split into up to `in_flight` micro-batches;
whenever tier 1 is free it advances the ready micro-batch that is furthest along (the furthest layer),
else starts a new one, else waits for the first tier-2 reply.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures

import jax
import numpy as np
from flax import nnx

from glinthawk_jax.config import MAX_IN_FLIGHT
from glinthawk_jax.placements.tokens import valid_tokens
from glinthawk_jax.sampling import sample
from glinthawk_jax.scheduler import pow2_at_least
from glinthawk_jax.tier2_client import Tier2Client


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
  q_shape: tuple = ()  # the padded q [R', T, H, D] of the last step
  index: tuple = ()  # (rows, cols) of the real tokens in it
  result: np.ndarray | None = None  # sampled tokens [R] once done


@dataclasses.dataclass
class PipelineStats:
  """Where the time went (seconds), over the runner's lifetime."""

  tier1_s: float = 0.0  # tier-1 steps, dispatch to q, k, v on the host
  wait_s: float = 0.0  # tier 1 idle, waiting for a tier-2 reply
  rtt_s: float = 0.0  # sum of tier-2 round trips (send to reply)
  num_steps: int = 0
  num_round_trips: int = 0
  tier2_bytes: int = 0  # q, k, v sent plus attention outputs received


class PipelinedRunner:
  """Same prefill/decode interface as ModelRunner, attention on tier 2 through `client`."""

  def __init__(self, model, client: Tier2Client, decode_steps: int, in_flight: int, timeout_s: float):
    self.client = client
    self.decode_steps = decode_steps
    self.timeout_s = timeout_s
    self.depth = in_flight  # 0 until measured
    self.num_layers = model.config.num_layers
    self.page_size = 1
    self.graphdef, params = nnx.split(model)
    self.layer_graphdef = nnx.split(model.layers)[0]
    stacked = params["layers"]
    self.layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.num_layers)]
    self.outer = nnx.State({**{k: v for k, v in params.items() if k != "layers"},
                            "layers": jax.tree.map(lambda a: a[:0], stacked)})
    self._first = jax.jit(self._first_fn)
    self._middle = jax.jit(self._middle_fn)
    self._last = jax.jit(self._last_fn, static_argnames=("greedy_only",))
    self.stats = PipelineStats()
    self.compiled_shapes: set[tuple] = set()

  @property
  def num_compilations(self) -> int:
    return len(self.compiled_shapes)

  # Jitted steps.

  def _first_fn(self, outer, layer, tokens, positions):
    x = nnx.merge(self.graphdef, outer).embed(tokens)
    q, k, v = nnx.merge(self.layer_graphdef, layer).pre_attention(x, positions)
    return x, q, k, v

  def _middle_fn(self, layer, next_layer, x, attn, positions):
    x = nnx.merge(self.layer_graphdef, layer).post_attention(x, attn)
    q, k, v = nnx.merge(self.layer_graphdef, next_layer).pre_attention(x, positions)
    return x, q, k, v

  def _last_fn(self, outer, layer, x, attn, temperature, top_k, top_p, seeds, token_index, *, greedy_only):
    x = nnx.merge(self.layer_graphdef, layer).post_attention(x, attn)
    logits = nnx.merge(self.graphdef, outer).logits(x[:, -1])
    return sample(logits, temperature, top_k, top_p, seeds, token_index, greedy_only)

  # The ModelRunner interface.

  def prefill(self, tokens, positions, page_ids, offsets, block_tables, context_lens, seq_ids) -> None:
    """Sends every layer's K, V of tokens: [B, T] to tier 2 (attention of the chunk through tier 2)."""
    del page_ids, offsets, block_tables
    micros = [_Micro(rows, tokens[rows], positions[rows], context_lens[rows], seq_ids[rows], None)
              for rows in self._split(len(tokens), seq_ids)]
    self._run(micros, greedy_only=True, measure=False)

  def decode(self, tokens, positions, block_tables, token_index, temperature, top_k, top_p, seeds,
             greedy_only, seq_ids) -> np.ndarray:
    """`decode_steps` steps from tokens: [B] at positions: [B]; returns sampled tokens [steps, B]."""
    del block_tables
    out = np.zeros((self.decode_steps, len(tokens)), np.int32)
    tokens = np.asarray(tokens, np.int32)
    for step in range(self.decode_steps):
      pos = positions + step
      micros = [_Micro(rows, tokens[rows, None], pos[rows, None], pos[rows] + 1, seq_ids[rows],
                       (temperature[rows], top_k[rows], top_p[rows], seeds[rows], token_index[rows] + step))
                for rows in self._split(len(tokens), seq_ids)]
      self._run(micros, greedy_only, measure=self.depth == 0)
      for m in micros:
        out[step, m.rows] = m.result
      tokens = out[step]
    return out

  # The pipeline.

  def _split(self, num_rows: int, seq_ids: np.ndarray) -> list[slice]:
    """Up to `depth` micro-batches of the real rows, each a power of two rows (padding rows at the end)."""
    real = int(np.count_nonzero(seq_ids >= 0)) or 1
    parts = min(max(self.depth, 1), real)
    size = pow2_at_least(math.ceil(real / parts))
    return [slice(s, min(s + size, num_rows)) for s in range(0, real, size)]

  def _run(self, micros: list[_Micro], greedy_only: bool, measure: bool) -> None:
    """Runs the micro-batches through every layer. With `measure` (in_flight = 0, depth not yet known)
    they run one at a time and, if nothing compiled meanwhile, the timings set the depth."""
    waiting = list(micros)  # not started yet
    active: list[_Micro] = []
    before = (dataclasses.replace(self.stats), len(self.compiled_shapes))
    while waiting or active:
      ready = [m for m in active if m.pending.done()]
      if ready:
        m = max(ready, key=lambda m: m.layer)
        attn = self._reply(m)
        if m.layer == self.num_layers - 1:
          active.remove(m)
          if m.sampling is not None:
            t = time.perf_counter()
            m.result = np.asarray(self._last(self.outer, self.layers[-1], m.x, attn, *m.sampling,
                                             greedy_only=greedy_only))[:_pad_rows(m)]
            self.stats.tier1_s += time.perf_counter() - t
          continue
        self._send(m, *self._step(self._middle, ("middle",), self.layers[m.layer], self.layers[m.layer + 1],
                                  m.x, attn, m.positions), m.layer + 1)
      elif waiting and len(active) < max(self.depth, 1):
        m = waiting.pop(0)
        m.tokens, m.positions = _pad(m.tokens), _pad(m.positions)
        if m.sampling is not None:
          m.sampling = tuple(_pad(a) for a in m.sampling)
        self._send(m, *self._step(self._first, ("first",), self.outer, self.layers[0], m.tokens, m.positions), 0)
        active.append(m)
      else:
        t = time.perf_counter()
        futures.wait([m.pending for m in active], return_when=futures.FIRST_COMPLETED)
        self.stats.wait_s += time.perf_counter() - t
    if measure and len(self.compiled_shapes) == before[1]:
      s, b = self.stats, before[0]
      self.depth = auto_depth((s.tier1_s - b.tier1_s) / max(s.num_steps - b.num_steps, 1),
                              (s.rtt_s - b.rtt_s) / max(s.num_round_trips - b.num_round_trips, 1))

  def _step(self, fn, name, *args):
    """Runs a jitted step; returns x and q, k, v on the host."""
    self.compiled_shapes.add(name + tuple(a.shape for a in args[2:]))
    t = time.perf_counter()
    x, *qkv = fn(*args)
    for a in qkv:
      a.copy_to_host_async()
    qkv = [np.asarray(a) for a in qkv]
    self.stats.tier1_s += time.perf_counter() - t
    self.stats.num_steps += 1
    return x, qkv

  def _send(self, m: _Micro, x, qkv, layer: int) -> None:
    q, k, v = qkv
    m.x, m.layer = x, layer
    rows, cols = valid_tokens(_pad(m.seq_ids, -1), m.positions, _pad(m.context_lens, 1))
    m.q_shape, m.index = q.shape, (rows, cols)
    m.pending = self.client.attend_async(layer, m.seq_ids[rows], m.positions[rows, cols], q[rows, cols],
                                         k[rows, cols], v[rows, cols], timeout_s=self.timeout_s)
    m.sent_at = time.perf_counter()
    self.stats.tier2_bytes += 2 * q[rows, cols].nbytes + 2 * k[rows, cols].nbytes

  def _reply(self, m: _Micro) -> np.ndarray:
    out = m.pending.result()
    self.stats.rtt_s += time.perf_counter() - m.sent_at
    self.stats.num_round_trips += 1
    attn = np.zeros(m.q_shape, out.dtype)
    attn[m.index] = out
    return attn


def auto_depth(t1_s: float, rtt_s: float) -> int:
  """Micro-batches that keep tier 1 busy: ceil((t1 + rtt) / t1), clamped to [1, MAX_IN_FLIGHT]."""
  return int(min(max(math.ceil((t1_s + rtt_s) / max(t1_s, 1e-6)), 1), MAX_IN_FLIGHT))


def _pad_rows(m: _Micro) -> int:
  return len(m.seq_ids)


def _pad(a: np.ndarray, fill=0) -> np.ndarray:
  """Pads the leading (row) axis to a power of two, repeating `fill`."""
  rows = pow2_at_least(len(a))
  if rows == len(a):
    return a
  return np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], fill, a.dtype)])
