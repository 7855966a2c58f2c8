"""KVPool.write (the C++ append, kv_append.cc) against a NumPy model of the XLA scatter it replaced:
the same bits in the same places of the page layout, for every storage and input dtype."""

import ml_dtypes
import numpy as np
import pytest

from tier2_cpu.kv_pool import KVPool

# (storage, dtype k and v are sent in)
CASES = [("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16), ("bfloat16", np.float32),
         ("int8", np.float32)]


def quantize(x):
  """int8 rows and scales of x: [n, kv, dim], per token and KV head, in float32 like the scatter."""
  amax = np.abs(x).max(axis=-1)
  scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
  return np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8), scale


def reference_write(storage, arrays, slots, k, v, page_size):
  """arrays (as KVPool.stored gives them) after writing k, v at slots."""
  arrays = [a.copy() for a in arrays]
  page, off = slots // page_size, slots % page_size
  if storage == "int8":
    (kq, ks), (vq, vs) = quantize(k.astype(np.float32)), quantize(v.astype(np.float32))
    arrays[0][page, :, :, off], arrays[1][page, :, off] = kq, vq  # K pages transposed
    arrays[2][page, :, off], arrays[3][page, :, off] = ks, vs
    return arrays
  dtype = np.float32 if storage == "float32" else ml_dtypes.bfloat16
  k, v = (x.astype(dtype).view(arrays[0].dtype) for x in (k, v))  # bf16 as uint16 bits
  arrays[0][page, :, :, off], arrays[1][page, :, off] = k, v
  return arrays


def slots_of(rng, num_pages, page_size, lengths, starts):
  """Slots of sequences of `lengths` tokens from position `starts`, each on its own shuffled pages."""
  pages = rng.permutation(num_pages)
  out, used = [], 0
  for n, start in zip(lengths, starts):
    count = -(-(start + n) // page_size)
    table = pages[used:used + count]
    used += count
    pos = np.arange(start, start + n)
    out.append(table[pos // page_size] * page_size + pos % page_size)
  return np.concatenate(out)


def check(storage, dtype, page_size, kv_heads, dim, lengths, starts, shuffled=False, seed=0):
  rng = np.random.default_rng(seed)
  num_pages = sum(-(-(s + n) // page_size) for n, s in zip(lengths, starts)) + 2
  pool = KVPool(2, num_pages, page_size, kv_heads, dim, storage)
  expected = pool.stored(1)
  slots = slots_of(rng, num_pages, page_size, lengths, starts)
  rows = rng.permutation(len(slots)) if shuffled else np.arange(len(slots))  # in order: runs of slots
  for part in np.array_split(rows, 2):  # two writes
    k = (rng.standard_normal((len(part), kv_heads, dim)) * 3).astype(dtype)
    v = rng.standard_normal((len(part), kv_heads, dim)).astype(dtype)
    if storage == "int8":  # a zero row (scale 1), and ties: amax 127 makes the scale exactly 1
      k[0, 0] = 0
      v[-1, 0] = np.linspace(-127, 127, dim)
      v[-1, 0, :4] = [62.5, 63.5, -0.5, 127]
    pool.write(1, slots[part], k, v)
    expected = reference_write(storage, expected, slots[part], k, v, page_size)
  for got, want in zip(pool.stored(1), expected):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert not any(a.any() for a in pool.stored(0)[:2])  # the other layer untouched


@pytest.mark.parametrize("storage,dtype", CASES)
def test_whole_pages_and_partial_runs_match_the_scatter(storage, dtype):
  """Page size 16, head dim 32: whole pages (the register block transposes) and partial runs,
  sequences starting mid-page, token counts off a power of two (padding rows dropped)."""
  check(storage, dtype, 16, 3, 32, lengths=[40, 1, 17, 33], starts=[0, 5, 9, 16])


@pytest.mark.parametrize("storage,dtype", CASES)
def test_small_pages_and_odd_head_dim_match_the_scatter(storage, dtype):
  check(storage, dtype, 4, 2, 12, lengths=[7, 3, 1, 1, 1], starts=[0, 2, 3, 0, 8], shuffled=True)


@pytest.mark.parametrize("storage,dtype", CASES)
def test_a_large_append_split_over_threads_matches_the_scatter(storage, dtype):
  """About 3 MB of k, v: above the size where the append splits its tokens over XLA's threads."""
  check(storage, dtype, 16, 4, 64, lengths=[1500, 1437], starts=[3, 0], seed=2)


def test_decode_rows_one_token_each_and_write_attend():
  """Twelve sequences, one token each on its own page (a decode step), through write_attend."""
  rng = np.random.default_rng(4)
  pool = KVPool(1, 40, 16, 2, 32, "bfloat16")
  slots = rng.permutation(40)[:12] * 16 + rng.integers(0, 16, 12)
  k, v = (rng.standard_normal((12, 2, 32)).astype(ml_dtypes.bfloat16) for _ in range(2))
  q = rng.standard_normal((12, 4, 32)).astype(np.float32)
  tables = (slots // 16).reshape(12, 1).astype(np.int32)
  pool.write_attend(0, slots, k, v, q, tables, (slots % 16).astype(np.int32))
  expected = reference_write("bfloat16", [np.zeros_like(a) for a in pool.stored(0)], slots, k, v, 16)
  for got, want in zip(pool.stored(0), expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_writes_land_in_the_pools_own_buffers(storage):
  """In place: write and write_attend leave the layer's buffers where they were (no copy of the pool)."""
  pool = KVPool(1, 8, 4, 2, 16, storage)
  buffers = [a.unsafe_buffer_pointer() for a in pool._layers[0]]
  k = np.ones((5, 2, 16), np.float32)
  pool.write(0, np.arange(5), k, k)
  pool.write_attend(0, [5], k[:1], k[:1], np.ones((1, 2, 16), np.float32), [[0, 1]], [5])
  assert [a.unsafe_buffer_pointer() for a in pool._layers[0]] == buffers
