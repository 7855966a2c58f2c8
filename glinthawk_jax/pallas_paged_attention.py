"""Decode attention over the paged KV pool as a Pallas (Triton) GPU kernel that reads pages in place.

XLA's gather-then-reduce formulation (paged_attention.paged_decode_attention) materialises the gathered
pages, so each cached byte crosses HBM about three times (docs/BENCHMARKS.md). This kernel follows
FlashDecoding: one program per (row, KV head, split of the row's pages) keeps an online softmax over its
pages and writes a partial output; XLA combines the splits. It indexes the stacked pool
[layers, pages, page_size, kv_heads, head_dim] of one static layer through its BlockSpec, so no layer
slice is copied. Adapted from JAX's jax.experimental.pallas.ops.gpu.paged_attention (Apache-2.0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from glinthawk_jax.paged_cache import SCRATCH_PAGE
from glinthawk_jax.scheduler import pow2_at_least, pow2_at_most

DOT_ROWS = 16  # Triton's dot needs at least 16 rows: larger GQA groups are padded to a multiple of it;
# smaller ones (MHA: one query head per KV head) multiply and reduce instead, so nothing is padded.
MAX_PAGES_PER_BLOCK = 8  # pages loaded per inner-loop step
TARGET_SPLITS = 16  # splits of a row's pages, for parallelism at small batch
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(q_ref, k_ref, v_ref, tables_ref, lengths_ref, o_ref, l_ref, m_ref, *, pages_per_block: int,
            sliding_window: int | None):
  split = pl.program_id(2)
  block_h, head_dim = q_ref.shape
  page_size = k_ref.shape[-2]
  pages_per_split = tables_ref.shape[0]
  block_k = pages_per_block * page_size
  length = lengths_ref[0]
  q = q_ref[...]

  def body(step, carry):
    o_prev, m_prev, l_prev = carry
    pages = tables_ref[pl.ds(step * pages_per_block, pages_per_block)]
    k = k_ref[pages].reshape(block_k, head_dim)
    v = v_ref[pages].reshape(block_k, head_dim)
    if block_h >= DOT_ROWS:
      logits = plgpu.dot(q, k.T)  # [block_h, block_k], float32
    else:
      logits = jnp.sum(q[:, None, :].astype(jnp.float32) * k[None].astype(jnp.float32), axis=-1)
    first_token = (split * pages_per_split + step * pages_per_block) * page_size
    kv_pos = jnp.arange(block_k) + first_token
    valid = kv_pos < length
    if sliding_window is not None:
      valid &= (length - 1) - kv_pos < sliding_window
    logits = jnp.where(lax.broadcast_in_dim(valid, (block_h, block_k), (1,)), logits, _MASKED)
    m_next = jnp.maximum(m_prev, logits.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    s = jnp.exp(logits - m_next[:, None])
    l_next = correction * l_prev + s.sum(axis=-1)
    if block_h >= DOT_ROWS:
      update = plgpu.dot(s.astype(v.dtype), v)
    else:
      update = jnp.sum(s[:, :, None] * v[None].astype(jnp.float32), axis=1)
    o_next = correction[:, None] * o_prev + update
    return o_next, m_next, l_next

  start_page = split * pages_per_split
  end_page = jnp.minimum(pl.cdiv(length, page_size), start_page + pages_per_split)
  steps = pl.cdiv(jnp.maximum(end_page - start_page, 0), pages_per_block)
  init = (jnp.zeros((block_h, head_dim), jnp.float32), jnp.full((block_h,), _MASKED, jnp.float32),
          jnp.zeros((block_h,), jnp.float32))
  o, m, l = lax.fori_loop(0, steps, body, init)
  o_ref[...] = o
  l_ref[...] = l
  m_ref[...] = m


def _splits(width: int) -> tuple[int, int]:
  """(pages per split, pages per inner step) for a block-table width; Triton needs powers of two."""
  low_bit = width & -width
  per_split = min(low_bit, max(MAX_PAGES_PER_BLOCK, pow2_at_most(width // TARGET_SPLITS)))
  return per_split, min(per_split, MAX_PAGES_PER_BLOCK)


def _one_row(q, k_pool, v_pool, tables, length, *, layer: int, sliding_window, interpret: bool):
  """q: [H, D] pre-scaled; tables: [width]; length: [1]. Returns [H, D] float32."""
  heads, head_dim = q.shape
  _, _, page_size, kv_heads, _ = k_pool.shape
  group = heads // kv_heads
  per_split, per_block = _splits(tables.shape[0])
  num_splits = tables.shape[0] // per_split
  block_h = DOT_ROWS if group >= DOT_ROWS else 1 << (group - 1).bit_length()
  qg = q.reshape(kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, -group % block_h), (0, 0)))
  head_blocks = qg.shape[1] // block_h
  pool_spec = pl.BlockSpec((None, k_pool.shape[1], page_size, None, head_dim),
                           lambda h, i, s: (layer, 0, 0, h, 0))
  o, l, m = pl.pallas_call(
      functools.partial(_kernel, pages_per_block=per_block, sliding_window=sliding_window),
      grid=(kv_heads, head_blocks, num_splits),
      in_specs=[pl.BlockSpec((None, block_h, head_dim), lambda h, i, s: (h, i, 0)), pool_spec, pool_spec,
                pl.BlockSpec((None, per_split), lambda h, i, s: (s, 0)),
                pl.BlockSpec((1,), lambda h, i, s: (0,))],
      out_specs=[pl.BlockSpec((None, None, block_h, head_dim), lambda h, i, s: (s, h, i, 0)),
                 pl.BlockSpec((None, None, block_h), lambda h, i, s: (s, h, i)),
                 pl.BlockSpec((None, None, block_h), lambda h, i, s: (s, h, i))],
      out_shape=[jax.ShapeDtypeStruct((num_splits, *qg.shape), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, *qg.shape[:-1]), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, *qg.shape[:-1]), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="paged_decode_attention",
  )(qg, k_pool, v_pool, tables.reshape(num_splits, per_split), length)
  o, l, m = o[:, :, :group], l[:, :, :group], m[:, :, :group]
  m_all = m.max(axis=0)
  scale = jnp.exp(m - m_all[None])  # splits with no pages have m = _MASKED and l = 0
  out = (o * scale[..., None]).sum(axis=0) / jnp.maximum((l * scale).sum(axis=0), 1e-30)[..., None]
  return out.reshape(heads, head_dim)


def paged_decode_attention(q: jnp.ndarray, k_pool: jnp.ndarray, v_pool: jnp.ndarray, layer: int,
                           block_tables: jnp.ndarray, context_lens: jnp.ndarray,
                           sliding_window: int | None = None, interpret: bool = False) -> jnp.ndarray:
  """Same contract as paged_attention.paged_decode_attention, for a static `layer`.

  q: [B, H, D]; pools [L, pages, page_size, KV, D]; block_tables: [B, width]; context_lens: [B].
  `interpret` runs the kernel in Pallas' interpreter (CPU tests).
  """
  page_size, head_dim = k_pool.shape[2], k_pool.shape[-1]
  if not interpret and not all(n >= 16 and n & (n - 1) == 0 for n in (page_size, head_dim)):
    raise ValueError(f"the Pallas decode kernel needs engine.page_size and head_dim to be powers of two >= 16, "
                     f"got {page_size} and {head_dim}")
  scaled = q / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
  # Splits and inner steps are powers of two dividing the width: a width of the scheduler's ladder (10, 14,
  # ...) would load one or two pages a step. Padded pages past a row's last step are never loaded.
  width = block_tables.shape[1]
  step = MAX_PAGES_PER_BLOCK
  padded = -(-width // step) * step if width > step else pow2_at_least(width)
  block_tables = jnp.pad(block_tables, ((0, 0), (0, padded - width)), constant_values=SCRATCH_PAGE)
  row = functools.partial(_one_row, layer=int(layer), sliding_window=sliding_window, interpret=interpret)
  out = jax.vmap(row, in_axes=(0, None, None, 0, 0))(scaled, k_pool, v_pool, block_tables,
                                                      context_lens.astype(jnp.int32)[:, None])
  return out.astype(q.dtype)
