"""Paged attention (XLA and the Pallas kernel, interpreted here) vs the dense reference
(models/attention.py) on the same keys and values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glinthawk_jax import paged_attention, pallas_paged_attention
from models.attention import causal_mask, grouped_attention

LAYERS, PAGES, PAGE, D = 2, 24, 4, 8


def _scatter_pool(rng, k_dense, v_dense, layer, lengths, kv):
  """Random pools with each row's first `length` tokens stored on shuffled pages; returns block tables."""
  k_pool = rng.standard_normal((LAYERS, PAGES, PAGE, kv, D)).astype(np.float32)  # garbage elsewhere
  v_pool = rng.standard_normal((LAYERS, PAGES, PAGE, kv, D)).astype(np.float32)
  free = list(rng.permutation(np.arange(1, PAGES)))
  width = max(-(-n // PAGE) for n in lengths) + 1
  tables = np.zeros((len(lengths), width), np.int32)
  for b, n in enumerate(lengths):
    for j in range(-(-n // PAGE)):
      tables[b, j] = free.pop()
    for t in range(n):
      k_pool[layer, tables[b, t // PAGE], t % PAGE] = k_dense[b, t]
      v_pool[layer, tables[b, t // PAGE], t % PAGE] = v_dense[b, t]
  return jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(tables)


DECODE_KERNELS = {"xla": paged_attention.paged_decode_attention,
                  "pallas": functools.partial(pallas_paged_attention.paged_decode_attention, interpret=True)}


@pytest.mark.parametrize("kernel", sorted(DECODE_KERNELS))
@pytest.mark.parametrize("heads,kv,window", [(4, 4, None), (4, 2, None), (8, 2, 5), (4, 1, None)])
def test_decode_matches_dense_reference(heads, kv, window, kernel):
  rng = np.random.default_rng(0)
  lengths = [1, 7, 13, 9]
  s = max(lengths)
  q = rng.standard_normal((len(lengths), heads, D)).astype(np.float32)
  k = rng.standard_normal((len(lengths), s, kv, D)).astype(np.float32)
  v = rng.standard_normal((len(lengths), s, kv, D)).astype(np.float32)
  k_pool, v_pool, tables = _scatter_pool(rng, k, v, 1, lengths, kv)
  lens = jnp.asarray(lengths, jnp.int32)
  got = jax.jit(DECODE_KERNELS[kernel], static_argnums=(3, 6))(
      jnp.asarray(q), k_pool, v_pool, 1, tables, lens, window)

  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (len(lengths), s))
  mask = causal_mask((lens - 1)[:, None], kv_pos, window) & (kv_pos < lens[:, None])[:, None, :]
  want = jax.jit(grouped_attention)(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v), mask)[:, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_chunk_after_cached_context_matches_dense(window):
  """A chunk at positions [start, start+T) attends to cached tokens and causally to itself."""
  rng = np.random.default_rng(1)
  heads, kv, chunk = 4, 2, 5
  starts = [0, 6, 11]
  total = [st + chunk for st in starts]
  s = max(total)
  q = rng.standard_normal((3, chunk, heads, D)).astype(np.float32)
  k = rng.standard_normal((3, s, kv, D)).astype(np.float32)
  v = rng.standard_normal((3, s, kv, D)).astype(np.float32)
  k_pool, v_pool, tables = _scatter_pool(rng, k, v, 0, total, kv)
  q_pos = jnp.asarray([np.arange(st, st + chunk) for st in starts], jnp.int32)
  lens = jnp.asarray(total, jnp.int32)
  got = jax.jit(paged_attention.paged_prefill_attention, static_argnums=7)(
      jnp.asarray(q), k_pool, v_pool, jnp.int32(0), tables, q_pos, lens, window)

  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (3, s))
  mask = causal_mask(q_pos, kv_pos, window) & (kv_pos < lens[:, None])[:, None, :]
  want = jax.jit(grouped_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_write_kv_stores_at_page_and_offset_of_the_given_layer_only():
  pool = jnp.zeros((LAYERS, PAGES, PAGE, 2, D), jnp.bfloat16)
  new = jnp.arange(2 * 3 * 2 * D, dtype=jnp.float32).reshape(2, 3, 2, D)
  pages = jnp.asarray([[5, 5, 9], [3, 3, 3]], jnp.int32)
  offsets = jnp.asarray([[2, 3, 0], [0, 1, 2]], jnp.int32)
  out = np.asarray(paged_attention.write_kv(pool, 1, new, pages, offsets).astype(jnp.float32))
  for b in range(2):
    for t in range(3):
      np.testing.assert_array_equal(out[1, pages[b, t], offsets[b, t]], np.asarray(new[b, t]))
  assert np.count_nonzero(out[0]) == 0
  assert np.count_nonzero(out[1]) == np.count_nonzero(np.asarray(new))


def test_gather_pages_concatenates_pages_in_table_order():
  pool = jnp.arange(LAYERS * PAGES * PAGE, dtype=jnp.float32).reshape(LAYERS, PAGES, PAGE, 1, 1)
  got = paged_attention.gather_pages(pool, 1, jnp.asarray([[7, 2]], jnp.int32))
  want = np.concatenate([np.asarray(pool[1, 7]), np.asarray(pool[1, 2])])[None]
  np.testing.assert_array_equal(np.asarray(got), want)
