"""ModelRunner.prefill_by_layer (a Splitwise prefill worker's path) against the fused prefill: the same
paged cache, and per layer the K,V of exactly the requested tokens."""

import numpy as np
import pytest

from configs import tiny
from glinthawk_jax.engine import Engine


@pytest.mark.parametrize("layer_loop,layers_per_call", [("scan", 1), ("scan", 2), ("unrolled", 2)])
def test_prefill_by_layer_matches_the_fused_prefill(layer_loop, layers_per_call):
  c = tiny.get_config()
  c.placement, c.engine.layer_loop = "local", layer_loop
  runner = Engine(c).runner
  rows, width, page = 2, 32, runner.page_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 512, (rows, width)).astype(np.int32)
  positions = np.tile(np.arange(width, dtype=np.int32), (rows, 1))
  lengths = np.array([width, 20], np.int32)  # row 1: 20 real tokens, then padding to the scratch page
  positions[1, 20:] = 19
  pages = np.array([[1, 2], [3, 4]], np.int32)
  page_ids = np.where(np.arange(width) < lengths[:, None], pages[np.arange(rows)[:, None], positions // page], 0)
  offsets = (positions % page).astype(np.int32)
  block_tables = np.concatenate([pages, np.zeros((rows, 2), np.int32)], axis=1)
  args = (tokens, positions, page_ids.astype(np.int32), offsets, block_tables, lengths)

  runner.prefill(*args)
  k_pool, v_pool = (np.asarray(a) for a in runner.slices[0].state)
  take = np.array([width + 3, width + 19, 0, 5, 0], np.int32)  # row 1's tokens 3 and 19, row 0's 0 and 5
  kvs = runner.prefill_by_layer(*args, take, layers_per_call)
  got = [np.asarray(a) for a in runner.slices[0].state]
  np.testing.assert_allclose(got[0], k_pool, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], v_pool, rtol=1e-5, atol=1e-5)
  assert len(kvs) == c.model.num_layers // layers_per_call
  for layer, kv in enumerate(np.concatenate([np.asarray(group) for group in kvs])):
    assert kv.shape == (2, len(take), c.model.num_kv_heads, c.model.head_dim)
    for j, (row, col) in enumerate(divmod(int(t), width) for t in take):
      page_id, off = pages[row, col // page], col % page
      np.testing.assert_allclose(kv[0, j], k_pool[layer, page_id, off], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(kv[1, j], v_pool[layer, page_id, off], rtol=1e-5, atol=1e-5)
