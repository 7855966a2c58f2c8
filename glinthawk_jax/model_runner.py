"""Runs the model on scheduled batches: one jitted call per prefill chunk batch, one per decode burst.

Attention and its cache sit behind an attention backend (here `LocalPagedAttention`): an object that
owns the cache state and hands the model an `attend(layer, q, k, v, state)` function for a batch's
metadata. Two-tier placements swap the backend and keep the scheduler and the runner.

A decode call runs `decode_steps` steps under `fori_loop`, each a pass over all layers with sampling on
the device; the cache state is donated so pages update in place and the host sees only tokens [n, B].
The layer pass is a scan over stacked weights (`layer_loop="scan"`: one compiled layer) or a Python loop
over per-layer copies of the weights (`"unrolled"`: longer compiles, but no per-layer dynamic slice of
the stacked weights, which XLA may materialize as a copy on GPU).

Several devices (sharding.Layout): weights and KV pool are sharded over each slice's devices and XLA
runs the same functions tensor-parallel. With layer slices, every jitted call runs one slice's layers
(embed on the first, sampling on the last) and the residual stream moves between slices; a decode step
then costs one call per slice (steps are not fused), and slices run one after another (no overlap of
micro-batches): a capacity feature, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glinthawk_jax import paged_attention, paged_cache, pallas_paged_attention
from glinthawk_jax.config import DECODE_ATTENTION_KERNELS, LAYER_LOOPS
from glinthawk_jax.sampling import sample
from glinthawk_jax.sharding import Layout
from models.llama import Llama, scan_layers
from models.model_config import ModelConfig


class LocalPagedAttention:
  """Paged KV cache on the accelerator; state = (k_pool, v_pool), each [L, pages, page_size, KV, D].

  Holds layers [first_layer, first_layer + L) (all by default); attend() takes model layer indices.
  """

  def __init__(self, model: ModelConfig, num_pages: int, page_size: int, decode_kernel: str = "xla",
               first_layer: int = 0, num_layers: int | None = None,
               sharding: jax.sharding.NamedSharding | None = None):
    if decode_kernel not in DECODE_ATTENTION_KERNELS:
      raise ValueError(f"decode_kernel={decode_kernel!r}: expected one of {', '.join(DECODE_ATTENTION_KERNELS)}")
    self.model = model
    self.num_pages = num_pages
    self.page_size = page_size
    self.decode_kernel = decode_kernel
    self.first_layer = first_layer
    self.num_layers = num_layers or model.num_layers
    self.sharding = sharding

  def for_slice(self, first_layer: int, num_layers: int, sharding) -> "LocalPagedAttention":
    """The backend of one layer slice: its layers' pages, split over its devices by `sharding` (a copy of
    this backend, so subclasses keep their behaviour)."""
    clone = copy.copy(self)
    clone.first_layer, clone.num_layers, clone.sharding = first_layer, num_layers, sharding
    return clone

  def init_state(self) -> Any:
    return paged_cache.init_pool(self.model, self.num_pages, self.page_size, self.num_layers, self.sharding)

  def write(self, state, layer, k, v, page_ids, offsets):
    """Stores k, v of model layer `layer` at (page_ids, offsets), or as whole pages page_ids when offsets is
    None (k, v: [P, page_size, KV, D]); returns (slice-local layer, k_pool, v_pool)."""
    k_pool, v_pool = state
    layer = layer - self.first_layer
    if offsets is None:
      k_pool = paged_attention.write_pages(k_pool, layer, k, page_ids)
      v_pool = paged_attention.write_pages(v_pool, layer, v, page_ids)
    else:
      k_pool = paged_attention.write_kv(k_pool, layer, k, page_ids, offsets)
      v_pool = paged_attention.write_kv(v_pool, layer, v, page_ids, offsets)
    if self.sharding is not None:  # keep the donated pools' layout (KV heads split) across calls
      k_pool = jax.lax.with_sharding_constraint(k_pool, self.sharding)
      v_pool = jax.lax.with_sharding_constraint(v_pool, self.sharding)
    return layer, k_pool, v_pool

  def prefill_attend(self, page_ids, offsets, block_tables, q_positions, context_lens, seq_ids=None):
    """attend for q: [B, T, H, D] whose k, v go to (page_ids, offsets): [B, T] (seq_ids unused here)."""
    window = self.model.sliding_window

    def attend(layer, q, k, v, state):
      layer, k_pool, v_pool = self.write(state, layer, k, v, page_ids, offsets)
      out = paged_attention.paged_prefill_attention(q, k_pool, v_pool, layer, block_tables, q_positions,
                                                    context_lens, window)
      return out, (k_pool, v_pool)

    return attend

  def decode_attend(self, page_ids, offsets, block_tables, context_lens, seq_ids=None):
    """attend for one token a row: q: [B, 1, H, D]; page_ids, offsets: [B, 1] (seq_ids unused here)."""
    window = self.model.sliding_window

    def attend(layer, q, k, v, state):
      with jax.named_scope("kv_write"):  # scope names let profiles group kernels (benchmarks/profile_decode.py)
        layer, k_pool, v_pool = self.write(state, layer, k, v, page_ids, offsets)
      with jax.named_scope("decode_attention"):
        out = self._decode_kernel(layer)(q[:, 0], k_pool, v_pool, layer, block_tables, context_lens, window)
      return out[:, None], (k_pool, v_pool)

    return attend

  def _decode_kernel(self, layer):
    """XLA's gather-then-reduce, or the Pallas kernel (for a static layer; interpreted off the GPU)."""
    if self.decode_kernel == "xla":
      return paged_attention.paged_decode_attention
    if not isinstance(layer, int):
      raise ValueError("decode_attention='pallas' needs layer_loop='unrolled' (a static layer per call)")
    return functools.partial(pallas_paged_attention.paged_decode_attention,
                             interpret=jax.default_backend() != "gpu")


@dataclasses.dataclass
class _Slice:
  """One layer slice: layers [first_layer, first_layer + num_layers) with their weights and cache."""

  index: int
  first_layer: int
  num_layers: int
  backend: Any
  params: Any  # (outer state, stacked layer state) or (outer, [per-layer states]) when unrolled
  state: Any = None


class ModelRunner:
  """Owns the weights, the backend's cache state and the jitted prefill/decode; counts compilations."""

  def __init__(self, model: Llama, backend: LocalPagedAttention, decode_steps: int, layer_loop: str = "scan",
               layout: Layout | None = None):
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={layer_loop!r}: expected one of {', '.join(LAYER_LOOPS)}")
    self.layer_loop = layer_loop
    self.layout = layout or Layout(model.config.num_layers)
    self.graphdef, params = nnx.split(model)
    self.layer_graphdef = nnx.split(model.layers)[0]
    params = self.layout.place(params)
    self.slices = []
    for s, (first, end) in enumerate(self.layout.bounds):
      outer, stacked = self.layout.slice_params(params, s)
      layers = self.layout.split_layers(stacked, s) if layer_loop == "unrolled" else stacked
      slice_backend = (backend.for_slice(first, end - first, self.layout.kv_sharding(s))
                       if hasattr(backend, "for_slice") else backend)  # tier-2 backends: one for all slices
      self.slices.append(_Slice(s, first, end - first, slice_backend, (outer, layers)))
      self.slices[-1].state = slice_backend.init_state()
    self.backend = backend
    self.page_size = backend.page_size
    self.decode_steps = decode_steps
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,), static_argnames=("slice_index",))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,),
                           static_argnames=("slice_index", "steps", "greedy_only"))
    self._write_kv = jax.jit(self._write_kv_fn, donate_argnums=(0,), static_argnames=("slice_index",))
    self._embed = jax.jit(self._embed_fn)
    self._take = jax.jit(lambda kv, take: kv[:, :, take])  # a small compile per token bucket
    self._prefill_layers = jax.jit(self._prefill_layers_fn, donate_argnums=(1,),
                                   static_argnames=("slice_index", "count"))
    self.compiled_shapes: set[tuple] = set()

  @property
  def num_compilations(self) -> int:
    """Distinct (function, shapes, slice) signatures run so far: each one compiled exactly once."""
    return len(self.compiled_shapes)

  def prefill(self, tokens: np.ndarray, positions: np.ndarray, page_ids: np.ndarray, offsets: np.ndarray,
              block_tables: np.ndarray, context_lens: np.ndarray, seq_ids: np.ndarray | None = None) -> None:
    """Writes the KV of tokens: [B, T] at positions: [B, T] into the cache (no sampling).

    seq_ids: [B] the rows' tier-2 sequence ids (-1 = padding row), for backends that need them.
    """
    seq_ids = _row_ids(seq_ids, tokens.shape[0])
    x = tokens
    for sl in self.slices:
      self.compiled_shapes.add(("prefill", tokens.shape, block_tables.shape, sl.index))
      sl.state, x = self._prefill(sl.params, sl.state, self.layout.to_slice(x, sl.index), positions, page_ids,
                                  offsets, block_tables, context_lens, seq_ids, slice_index=sl.index)

  def prefill_by_layer(self, tokens: np.ndarray, positions: np.ndarray, page_ids: np.ndarray,
                       offsets: np.ndarray, block_tables: np.ndarray, context_lens: np.ndarray,
                       take: np.ndarray, layers_per_call: int = 1) -> list[jax.Array]:
    """prefill() as one jitted call per `layers_per_call` layers, returning the K,V of the tokens at flat
    indices take: [N] (row * T + column): per call kv: [layers, 2, N, KV, D] on the device (in layer
    order, a slice's last call may hold fewer layers), its copy to the host begun.

    The calls are only queued (async dispatch): a consumer thread reads a call's K,V (np.asarray) while
    later layers still compute, and no host callback stalls the device or defeats the compilation cache.
    """
    x = tokens
    out = []
    for sl in self.slices:
      outer, layers = sl.params
      x = self.layout.to_slice(x, sl.index)
      if sl.index == 0:
        x = self._embed(outer, x)
      for first in range(0, sl.num_layers, layers_per_call):
        count = min(layers_per_call, sl.num_layers - first)
        self.compiled_shapes.add(("prefill_layers", tokens.shape, block_tables.shape, count, sl.index))
        self.compiled_shapes.add(("take_kv", tokens.shape, take.shape, count, sl.index))
        params = layers[first:first + count] if self.layer_loop == "unrolled" else layers
        sl.state, x, kv = self._prefill_layers(params, sl.state, x, np.int32(sl.first_layer + first), positions,
                                               page_ids, offsets, block_tables, context_lens,
                                               slice_index=sl.index, count=count)
        kv = self._take(kv, take)
        kv.copy_to_host_async()
        out.append(kv)
    return out

  def decode(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
             token_index: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
             seeds: np.ndarray, greedy_only: bool, seq_ids: np.ndarray | None = None) -> np.ndarray:
    """`decode_steps` steps from tokens: [B] at positions: [B]; returns sampled tokens [steps, B].

    One slice fuses the steps into one call; several run each step slice by slice.
    """
    seq_ids = _row_ids(seq_ids, tokens.shape[0])
    steps = self.decode_steps if len(self.slices) == 1 else 1
    outs, tok = [], tokens
    for i in range(0, self.decode_steps, steps):
      x = tok
      for sl in self.slices:
        self.compiled_shapes.add(("decode", tokens.shape, block_tables.shape, greedy_only, sl.index))
        sl.state, x = self._decode(sl.params, sl.state, self.layout.to_slice(x, sl.index), positions + i,
                                   block_tables, token_index + i, temperature, top_k, top_p, seeds, seq_ids,
                                   slice_index=sl.index, steps=steps, greedy_only=greedy_only)
      outs.append(x)
      tok = x[-1]
    return np.concatenate([np.asarray(o) for o in outs])

  def wait(self) -> None:
    """Blocks until every dispatched call has finished on the device (calls return before they run)."""
    jax.block_until_ready([sl.state for sl in self.slices])
    jax.effects_barrier()  # the callback placement's state lives on tier 2: its calls are effects

  def write_layer_kv(self, layer: int, k, v, page_ids, offsets=None) -> None:
    """Stores k, v: [T, KV, D] of model layer `layer` at (page_ids, offsets): [T] in its slice's pools
    (KV computed elsewhere, e.g. received from a prefill worker); offsets=None: k, v: [P, page_size, KV, D]
    are whole pages page_ids: [P] (local paged cache only)."""
    sl = next(sl for sl in self.slices if sl.first_layer <= layer < sl.first_layer + sl.num_layers)
    if offsets is not None:
      k, v, page_ids, offsets = k[None], v[None], page_ids[None], offsets[None]
    sl.state = self._write_kv(sl.state, layer, k, v, page_ids, offsets, slice_index=sl.index)

  def _write_kv_fn(self, state, layer, k, v, page_ids, offsets, *, slice_index):
    _, k_pool, v_pool = self.slices[slice_index].backend.write(state, layer, k, v, page_ids, offsets)
    return k_pool, v_pool

  def _merge(self, sl: _Slice, params):
    """(model for embed/logits, run_layers(x, positions, attend, state) -> (x, state)) of a slice;
    attend gets model layer indices."""
    outer, layers = params
    replicated = self.layout.replicated(sl.index)

    def run_layers(x, positions, attend, state):
      x = jax.lax.with_sharding_constraint(x, replicated)  # the residual stream whole on every device
      return self._layer_loop(layers, sl.first_layer, x, positions, attend, state)

    return nnx.merge(self.graphdef, outer), run_layers

  def _layer_loop(self, layers, first_layer, x, positions, attend, state, keep_kv: bool = False):
    """The decoder layers `layers` (per-layer states if unrolled, else stacked) over x, numbered from
    first_layer for attend; returns (x, state), and with keep_kv their K,V [layers, 2, B, T, KV, D]."""
    if self.layer_loop != "unrolled":
      return scan_layers(self.layer_graphdef, layers, x, positions, attend, state, first_layer, keep_kv)
    kvs = []
    for i, layer_state in enumerate(layers):
      layer = nnx.merge(self.layer_graphdef, layer_state)
      q, k, v = layer.pre_attention(x, positions)
      out, state = attend(first_layer + i, q, k, v, state)
      x = layer.post_attention(x, out)
      if keep_kv:
        kvs.append(jnp.stack([k, v]))
    return (x, state, jnp.stack(kvs)) if keep_kv else (x, state)

  def _prefill_fn(self, params, state, inp, positions, page_ids, offsets, block_tables, context_lens, seq_ids,
                  *, slice_index):
    """Slice `slice_index`'s layers over inp (tokens [B, T] on the first slice, else x [B, T, E])."""
    sl = self.slices[slice_index]
    model, run_layers = self._merge(sl, params)
    attend = sl.backend.prefill_attend(page_ids, offsets, block_tables, positions, context_lens, seq_ids)
    x = model.embed(inp) if slice_index == 0 else inp
    x, state = run_layers(x, positions, attend, state)
    return state, (None if slice_index == len(self.slices) - 1 else x)

  def _embed_fn(self, outer, tokens):
    return nnx.merge(self.graphdef, outer).embed(tokens)

  def _prefill_layers_fn(self, layer_params, state, x, first, positions, page_ids, offsets, block_tables,
                         context_lens, *, slice_index, count):
    """Model layers first .. first + count - 1 over x: [B, T, E]; returns (state, x, kv: [count, 2, B * T,
    KV, D]). layer_params: those layers' states, or the slice's stacked state (scan layout: a scan over
    the `count` layers from `first`)."""
    sl = self.slices[slice_index]
    attend = sl.backend.prefill_attend(page_ids, offsets, block_tables, positions, context_lens)
    x = jax.lax.with_sharding_constraint(x, self.layout.replicated(slice_index))
    if self.layer_loop != "unrolled":
      layer_params = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, first - sl.first_layer, count),
                                  layer_params)
    x, state, kvs = self._layer_loop(layer_params, first, x, positions, attend, state, keep_kv=True)
    return state, x, kvs.reshape(count, 2, -1, *kvs.shape[-2:])

  def _decode_fn(self, params, state, inp, positions, block_tables, token_index, temperature, top_k,
                 top_p, seeds, seq_ids, *, slice_index, steps, greedy_only):
    """`steps` decode steps of a slice: inp is tokens [B] (first slice) or x [B, 1, E]; returns the
    state and tokens [steps, B] (last slice) or x."""
    sl = self.slices[slice_index]
    first, last = slice_index == 0, slice_index == len(self.slices) - 1
    model, run_layers = self._merge(sl, params)
    page_size, width = self.page_size, block_tables.shape[1]

    def step(i, carry):
      h, st, out = carry
      pos = positions + i
      col = pos // page_size
      page = jnp.take_along_axis(block_tables, jnp.minimum(col, width - 1)[:, None], axis=1)
      page = jnp.where(col[:, None] < width, page, paged_cache.SCRATCH_PAGE)
      attend = sl.backend.decode_attend(page, (pos % page_size)[:, None], block_tables, pos + 1, seq_ids)
      x, st = run_layers(model.embed(h[:, None]) if first else h, pos[:, None], attend, st)
      if not last:
        return x, st, out
      logits = model.logits(x[:, 0])
      with jax.named_scope("sampling"):
        nxt = sample(logits, temperature, top_k, top_p, seeds, token_index + i, greedy_only)
      return nxt, st, out.at[i].set(nxt)

    carry = (inp, state, jnp.zeros((steps, positions.shape[0]), jnp.int32))
    h, state, out = step(0, carry) if steps == 1 else jax.lax.fori_loop(0, steps, step, carry)
    return state, (out if last else h)


def _row_ids(seq_ids, rows: int) -> np.ndarray:
  return np.full((rows,), -1, np.int32) if seq_ids is None else np.asarray(seq_ids, np.int32)
