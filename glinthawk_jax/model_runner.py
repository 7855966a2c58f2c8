"""Runs the model on scheduled batches: one jitted call per prefill chunk batch, one per decode burst.

Attention and its cache sit behind an attention backend (here `LocalPagedAttention`): an object that
owns the cache state and hands the model an `attend(layer, q, k, v, state)` function for a batch's
metadata. Two-tier placements swap the backend and keep the scheduler and the runner.

A decode call runs `decode_steps` steps under `fori_loop`, each a pass over all layers with sampling on
the device; the cache state is donated so pages update in place and the host sees only tokens [n, B].
The layer pass is the model's scan over stacked weights (`layer_loop="scan"`: one compiled layer) or a
Python loop over per-layer copies of the weights (`"unrolled"`: longer compiles, but no per-layer
dynamic slice of the stacked weights, which XLA may materialize as a copy on GPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glinthawk_jax import paged_attention, paged_cache, pallas_paged_attention
from glinthawk_jax.config import DECODE_ATTENTION_KERNELS, LAYER_LOOPS
from glinthawk_jax.sampling import sample
from models.llama import Llama
from models.model_config import ModelConfig


class LocalPagedAttention:
  """Paged KV cache on the accelerator; state = (k_pool, v_pool), each [L, pages, page_size, KV, D]."""

  def __init__(self, model: ModelConfig, num_pages: int, page_size: int, decode_kernel: str = "xla"):
    if decode_kernel not in DECODE_ATTENTION_KERNELS:
      raise ValueError(f"decode_kernel={decode_kernel!r}: expected one of {', '.join(DECODE_ATTENTION_KERNELS)}")
    self.model = model
    self.num_pages = num_pages
    self.page_size = page_size
    self.decode_kernel = decode_kernel

  def init_state(self) -> Any:
    return paged_cache.init_pool(self.model, self.num_pages, self.page_size)

  def prefill_attend(self, page_ids, offsets, block_tables, q_positions, context_lens, seq_ids=None):
    """attend for q: [B, T, H, D] whose k, v go to (page_ids, offsets): [B, T] (seq_ids unused here)."""
    window = self.model.sliding_window

    def attend(layer, q, k, v, state):
      k_pool, v_pool = state
      k_pool = paged_attention.write_kv(k_pool, layer, k, page_ids, offsets)
      v_pool = paged_attention.write_kv(v_pool, layer, v, page_ids, offsets)
      out = paged_attention.paged_prefill_attention(q, k_pool, v_pool, layer, block_tables, q_positions,
                                                    context_lens, window)
      return out, (k_pool, v_pool)

    return attend

  def decode_attend(self, page_ids, offsets, block_tables, context_lens, seq_ids=None):
    """attend for one token a row: q: [B, 1, H, D]; page_ids, offsets: [B, 1] (seq_ids unused here)."""
    window = self.model.sliding_window

    def attend(layer, q, k, v, state):
      k_pool, v_pool = state
      k_pool = paged_attention.write_kv(k_pool, layer, k, page_ids, offsets)
      v_pool = paged_attention.write_kv(v_pool, layer, v, page_ids, offsets)
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


class ModelRunner:
  """Owns the weights, the backend's cache state and the jitted prefill/decode; counts compilations."""

  def __init__(self, model: Llama, backend: LocalPagedAttention, decode_steps: int, layer_loop: str = "scan"):
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={layer_loop!r}: expected one of {', '.join(LAYER_LOOPS)}")
    self.layer_loop = layer_loop
    self.graphdef, self.params = nnx.split(model)
    if layer_loop == "unrolled":
      self.layer_graphdef = nnx.split(model.layers)[0]
      stacked = self.params["layers"]
      layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(model.config.num_layers))
      # The outer model keeps zero-size layer leaves: embed and logits never read them.
      outer = nnx.State({**{k: v for k, v in self.params.items() if k != "layers"},
                         "layers": jax.tree.map(lambda a: a[:0], stacked)})
      self.params = (outer, layers)
    self.backend = backend
    self.page_size = backend.page_size
    self.decode_steps = decode_steps
    self.state = backend.init_state()
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("greedy_only",))
    self.compiled_shapes: set[tuple] = set()

  @property
  def num_compilations(self) -> int:
    """Distinct (function, shapes) signatures run so far: each one compiled exactly once."""
    return len(self.compiled_shapes)

  def prefill(self, tokens: np.ndarray, positions: np.ndarray, page_ids: np.ndarray, offsets: np.ndarray,
              block_tables: np.ndarray, context_lens: np.ndarray, seq_ids: np.ndarray | None = None) -> None:
    """Writes the KV of tokens: [B, T] at positions: [B, T] into the cache (no sampling).

    seq_ids: [B] the rows' tier-2 sequence ids (-1 = padding row), for backends that need them.
    """
    self.compiled_shapes.add(("prefill", tokens.shape, block_tables.shape))
    seq_ids = _row_ids(seq_ids, tokens.shape[0])
    self.state = self._prefill(self.params, self.state, tokens, positions, page_ids, offsets, block_tables,
                               context_lens, seq_ids)

  def decode(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
             token_index: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
             seeds: np.ndarray, greedy_only: bool, seq_ids: np.ndarray | None = None) -> np.ndarray:
    """`decode_steps` steps from tokens: [B] at positions: [B]; returns sampled tokens [steps, B]."""
    self.compiled_shapes.add(("decode", tokens.shape, block_tables.shape, greedy_only))
    seq_ids = _row_ids(seq_ids, tokens.shape[0])
    self.state, out = self._decode(self.params, self.state, tokens, positions, block_tables, token_index,
                                   temperature, top_k, top_p, seeds, seq_ids, greedy_only=greedy_only)
    return np.asarray(out)

  def _merge(self, params):
    """(model for embed/logits, run_layers(x, positions, attend, state) -> (x, state))."""
    if self.layer_loop == "scan":
      model = nnx.merge(self.graphdef, params)
      return model, model.run_layers
    outer, layers = params

    def run_layers(x, positions, attend, state):
      for i, layer_state in enumerate(layers):
        layer = nnx.merge(self.layer_graphdef, layer_state)
        q, k, v = layer.pre_attention(x, positions)
        out, state = attend(i, q, k, v, state)
        x = layer.post_attention(x, out)
      return x, state

    return nnx.merge(self.graphdef, outer), run_layers

  def _prefill_fn(self, params, state, tokens, positions, page_ids, offsets, block_tables, context_lens,
                  seq_ids):
    model, run_layers = self._merge(params)
    attend = self.backend.prefill_attend(page_ids, offsets, block_tables, positions, context_lens, seq_ids)
    _, state = run_layers(model.embed(tokens), positions, attend, state)
    return state

  def _decode_fn(self, params, state, tokens, positions, block_tables, token_index, temperature, top_k,
                 top_p, seeds, seq_ids, *, greedy_only):
    model, run_layers = self._merge(params)
    page_size, width = self.page_size, block_tables.shape[1]

    def step(i, carry):
      tok, st, out = carry
      pos = positions + i
      col = pos // page_size
      page = jnp.take_along_axis(block_tables, jnp.minimum(col, width - 1)[:, None], axis=1)
      page = jnp.where(col[:, None] < width, page, paged_cache.SCRATCH_PAGE)
      attend = self.backend.decode_attend(page, (pos % page_size)[:, None], block_tables, pos + 1, seq_ids)
      x, st = run_layers(model.embed(tok[:, None]), pos[:, None], attend, st)
      nxt = sample(model.logits(x[:, 0]), temperature, top_k, top_p, seeds, token_index + i, greedy_only)
      return nxt, st, out.at[i].set(nxt)

    out = jnp.zeros((self.decode_steps, tokens.shape[0]), jnp.int32)
    _, state, out = jax.lax.fori_loop(0, self.decode_steps, step, (tokens, state, out))
    return state, out


def _row_ids(seq_ids, rows: int) -> np.ndarray:
  return np.full((rows,), -1, np.int32) if seq_ids is None else np.asarray(seq_ids, np.int32)
