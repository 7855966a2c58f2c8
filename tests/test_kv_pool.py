"""KVPool against a float64 NumPy reference: MHA and GQA, mixed lengths, decode and prefill."""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tier2_cpu.kv_pool import KVPool

# Max abs error of the attention output over max |v| (k ~ N(0, 4), v ~ N(0, 1), head_dim 64),
# measured over the cases below: fp32 3e-7, bf16 3.5e-3, int8 1.4e-2 (int8's step is
# max|row| / 127 per token and head). The bounds leave 2-3x margin; fp32 is also held to 1e-5
# relative error in test_fp32_relative_error.
BOUNDS = {"float32": 1e-5, "bfloat16": 1e-2, "int8": 3e-2}


def reference(q, k_seq, v_seq, position):
  """float64 attention of q: [H, D] over k_seq/v_seq: [T, KV, D] positions 0..position."""
  h, d = q.shape
  group = h // k_seq.shape[1]
  k = np.repeat(k_seq[:position + 1].astype(np.float64), group, axis=1)
  v = np.repeat(v_seq[:position + 1].astype(np.float64), group, axis=1)
  s = np.einsum("hd,thd->ht", q.astype(np.float64), k) / np.sqrt(d)
  p = np.exp(s - s.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  return np.einsum("ht,thd->hd", p, v)


def run_case(storage, heads, kv_heads, lengths, seed, page_size=4, dim=64, layers=2):
  """Prefill every sequence (mixed lengths), then one decode step; return max error / max |v|."""
  rng = np.random.default_rng(seed)
  max_len = max(lengths) + 1
  pages_per_seq = -(-max_len // page_size)
  pool = KVPool(layers, pages_per_seq * len(lengths) + 3, page_size, kv_heads, dim, storage)
  # Sequences get scattered, non-contiguous pages.
  perm = rng.permutation(pool.num_pages)[:pages_per_seq * len(lengths)]
  tables = perm.reshape(len(lengths), pages_per_seq).astype(np.int32)
  k_all = rng.standard_normal((len(lengths), max_len, kv_heads, dim)).astype(np.float32) * 2
  v_all = rng.standard_normal((len(lengths), max_len, kv_heads, dim)).astype(np.float32)
  layer = layers - 1

  def slots(seq, pos):
    return tables[seq, pos // page_size] * page_size + pos % page_size

  # Prefill: all sequences' prompt tokens in one write and one attend.
  rows = [(s, p) for s, n in enumerate(lengths) for p in range(n)]
  seq_ids = np.array([s for s, _ in rows])
  pos = np.array([p for _, p in rows], np.int32)
  pool.write(layer, slots(seq_ids, pos), k_all[seq_ids, pos], v_all[seq_ids, pos])
  q = rng.standard_normal((len(rows), heads, dim)).astype(np.float32)
  out = pool.attend(layer, q, tables[seq_ids], pos)
  ref = np.stack([reference(q[i], k_all[s], v_all[s], p) for i, (s, p) in enumerate(rows)])
  err = np.abs(out - ref).max()
  # Decode: one new token per sequence, q as bf16 from the wire.
  seq_ids = np.arange(len(lengths))
  pos = np.array(lengths, np.int32)
  pool.write(layer, slots(seq_ids, pos), k_all[seq_ids, pos], v_all[seq_ids, pos])
  q = rng.standard_normal((len(lengths), heads, dim)).astype(ml_dtypes.bfloat16)
  out = pool.attend(layer, q, tables, pos)
  ref = np.stack([reference(q[s].astype(np.float32), k_all[s], v_all[s], p)
                  for s, p in enumerate(pos)])
  err = max(err, np.abs(out - ref).max())
  return err / np.abs(v_all).max(), np.abs(ref).max()


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_attend_matches_float64(storage, heads, kv_heads):
  for seed in range(3):
    err, _ = run_case(storage, heads, kv_heads, lengths=[1, 7, 70, 33], seed=seed)
    assert err < BOUNDS[storage], f"{storage} seed {seed}: error {err:.2e}"


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("page_size,heads,kv_heads", [(16, 8, 2), (32, 32, 2)],
                         ids=["page16-gqa4", "page32-gqa16"])
def test_vector_page_path(storage, page_size, heads, kv_heads):
  """Pages a multiple of the vector width (8 or 16 lanes) take the kernel's vectorized scores."""
  err, _ = run_case(storage, heads, kv_heads, lengths=[1, 16, 40, 97], seed=11,
                    page_size=page_size)
  assert err < BOUNDS[storage], f"{storage} page {page_size}: error {err:.2e}"


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_head_dim_off_the_vector_width(storage):
  """head_dim 12 takes the kernel's scalar V path (the vector path needs a multiple of 8 or 16)."""
  err, _ = run_case(storage, 6, 2, lengths=[5, 40], seed=7, dim=12)
  assert err < BOUNDS[storage], f"{storage}: error {err:.2e}"


def test_fp32_relative_error():
  rng = np.random.default_rng(5)
  pool = KVPool(1, 40, 8, 2, 32, "float32")
  k = rng.standard_normal((300, 2, 32)).astype(np.float32)
  v = rng.standard_normal((300, 2, 32)).astype(np.float32) + 3.0  # outputs far from zero
  table = rng.permutation(40)[:38].astype(np.int32)
  slots = table[np.arange(300) // 8] * 8 + np.arange(300) % 8
  pool.write(0, slots, k, v)
  q = rng.standard_normal((2, 6, 32)).astype(np.float32)
  out = pool.attend(0, q, np.stack([table, table]), np.array([299, 150], np.int32))
  for i, p in enumerate([299, 150]):
    ref = reference(q[i], k, v, p)
    assert np.abs(out[i] - ref).max() / np.abs(ref).max() < 1e-5


def test_layers_are_separate_and_sizes():
  pool = KVPool(2, 4, 2, 1, 8, "bfloat16")
  assert pool.bytes_per_token == 2 * 2 * 8 * 2
  assert pool.nbytes == 4 * 2 * pool.bytes_per_token
  assert KVPool.pages_for_budget(pool.nbytes + 10, 2, 2, 1, 8, "bfloat16") == 4
  assert KVPool.pages_for_budget(10**6, 1, 16, 8, 128, "int8") == 10**6 // (16 * 2 * 8 * 132)
  k = np.ones((1, 1, 8), np.float32)
  pool.write(0, [0], k, k)
  pool.write(1, [0], 2 * k, 3 * k)
  q = np.ones((1, 1, 8), np.float32)
  np.testing.assert_allclose(pool.attend(0, q, [[0]], [0]), 1.0)
  np.testing.assert_allclose(pool.attend(1, q, [[0]], [0]), 3.0)


def test_errors_name_the_input():
  pool = KVPool(1, 4, 2, 1, 8, "float32")
  k = np.ones((1, 1, 8), np.float32)
  with pytest.raises(IndexError, match="slot 8"):
    pool.write(0, [8], k, k)
  with pytest.raises(IndexError, match="layer 1"):
    pool.write(1, [0], k, k)
  with pytest.raises(ValueError, match="k: shape"):
    pool.write(0, [0], np.ones((1, 2, 8), np.float32), k)
  with pytest.raises(IndexError, match=r"positions\[0\]"):
    pool.attend(0, np.ones((1, 1, 8), np.float32), [[0]], [2])
  with pytest.raises(Exception, match="block_tables entry 9"):
    pool.attend(0, np.ones((1, 1, 8), np.float32), [[9]], [0])
  with pytest.raises(ValueError, match="storage 'fp8'"):
    KVPool(1, 4, 2, 1, 8, "fp8")


SPLIT_CASE = """
import os, sys
os.sched_setaffinity(0, [min(os.sched_getaffinity(0))])  # before jax: XLA's pool gets one thread
sys.path.insert(0, {root!r})
import numpy as np
from tests.test_kv_pool import split_case
np.save({path!r}, split_case()[0])
"""


def split_case():
  """8 tokens at ~1,500 positions over 8 KV heads: enough keys that the kernel splits the call over
  the XLA CPU pool's threads. Returns (output, float64 reference)."""
  rng = np.random.default_rng(3)
  n, ctx, kv, heads, dim, page = 8, 1536, 8, 16, 64, 16
  pool = KVPool(1, n * ctx // page, page, kv, dim, "float32")
  k, v = (rng.standard_normal((n * ctx, kv, dim)).astype(np.float32) for _ in range(2))
  pool.write(0, np.arange(n * ctx), k, v)
  tables = np.arange(n * ctx // page, dtype=np.int32).reshape(n, ctx // page)
  q = rng.standard_normal((n, heads, dim)).astype(np.float32)
  positions = ctx - 1 - rng.integers(0, 200, n).astype(np.int32)
  out = pool.attend(0, q, tables, positions)
  ref = np.stack([reference(q[i], k[i * ctx:(i + 1) * ctx], v[i * ctx:(i + 1) * ctx], positions[i])
                  for i in range(n)])
  return out, ref


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for the threaded split")
def test_a_call_split_over_threads_matches_one_thread_and_float64(tmp_path):
  out, ref = split_case()
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  path = str(tmp_path / "one_thread.npy")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", SPLIT_CASE.format(root=root, path=path)], check=True, timeout=120,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  np.testing.assert_array_equal(np.load(path), out)  # same items, same arithmetic, any thread


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_write_attend_is_write_then_attend(storage):
  rng = np.random.default_rng(8)
  pools = [KVPool(2, 8, 4, 2, 16, storage) for _ in range(2)]
  k, v = (rng.standard_normal((5, 2, 16)).astype(np.float32) for _ in range(2))
  q = rng.standard_normal((5, 4, 16)).astype(np.float32)
  slots, tables, positions = np.arange(5), np.array([[0, 1]] * 5, np.int32), np.arange(5, dtype=np.int32)
  pools[0].write(1, slots, k, v)
  expected = pools[0].attend(1, q, tables, positions)
  np.testing.assert_array_equal(pools[1].write_attend(1, slots, k, v, q, tables, positions), expected)
  np.testing.assert_array_equal(pools[1].attend(1, q, tables, positions), expected)  # the write stayed
  # A bf16 output is rounded in the kernel exactly as NumPy rounds the float32 one.
  out = pools[1].write_attend(1, slots, k, v, q, tables, positions, out_dtype="bfloat16")
  assert out.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out.view(np.uint16), expected.astype(ml_dtypes.bfloat16).view(np.uint16))
  with pytest.raises(ValueError, match="out_dtype 'float16'"):
    pools[1].write_attend(1, slots, k, v, q, tables, positions, out_dtype="float16")


def test_bfloat16_keys_are_stored_as_sent_like_float32_rounded():
  """bf16 k, v into a bf16 pool are stored bit for bit (no float32 round trip): the same attention as the
  float32 values they round from, through write and write_attend."""
  rng = np.random.default_rng(9)
  pools = [KVPool(2, 8, 4, 2, 16, "bfloat16") for _ in range(2)]
  k, v = (rng.standard_normal((5, 2, 16)).astype(ml_dtypes.bfloat16) for _ in range(2))
  q = rng.standard_normal((5, 4, 16)).astype(np.float32)
  slots, tables, positions = np.arange(5), np.array([[0, 1]] * 5, np.int32), np.arange(5, dtype=np.int32)
  pools[0].write(1, slots, k.astype(np.float32), v.astype(np.float32))
  pools[1].write(1, slots, k, v)
  expected = pools[0].attend(1, q, tables, positions)
  np.testing.assert_array_equal(pools[1].attend(1, q, tables, positions), expected)
  np.testing.assert_array_equal(pools[1].write_attend(1, slots, k, v, q, tables, positions), expected)
