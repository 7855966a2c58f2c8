"""ModelRunner's KV layouts: one pool array per layer (unrolled) holds exactly what the stacked pool holds."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from glinthawk_jax import config as config_lib
from glinthawk_jax.model_runner import LocalPagedAttention, ModelRunner
from models.llama import init_model

PAGE, PAGES, B, T, STEPS = 4, 9, 2, 6, 3


@pytest.fixture(scope="module")
def model():
  c = tiny.get_config()
  c.dtype = "float32"
  cfg = config_lib.model_config(c)
  return cfg, init_model(cfg, 0)


def _runner(model, per_layer):
  cfg, m = model
  return ModelRunner(m, LocalPagedAttention(cfg, PAGES, PAGE), STEPS, "unrolled", kv_per_layer=per_layer)


def _stacked(runner):
  k, v = runner.slices[0].state
  return (np.asarray(jnp.concatenate(k)), np.asarray(jnp.concatenate(v))) if isinstance(k, tuple) else (
      np.asarray(k), np.asarray(v))


def _run(runner, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  tables = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  page_ids = np.take_along_axis(tables, positions // PAGE, axis=1)
  runner.prefill(tokens, positions, page_ids, positions % PAGE, tables, np.full(B, T, np.int32))
  zeros = np.zeros(B, np.int32)
  return runner.decode(tokens[:, -1], np.full(B, T, np.int32), tables, zeros, np.zeros(B, np.float32), zeros,
                       np.ones(B, np.float32), np.arange(B, dtype=np.uint32), greedy_only=True)


def test_per_layer_pools_match_the_stacked_pool(model):
  cfg, _ = model
  stacked, per_layer = _runner(model, False), _runner(model, True)
  assert isinstance(per_layer.slices[0].state[0], tuple) and len(per_layer.slices[0].state[0]) == cfg.num_layers
  np.testing.assert_array_equal(_run(stacked, cfg.vocab_size), _run(per_layer, cfg.vocab_size))
  for a, b in zip(_stacked(stacked), _stacked(per_layer)):
    assert np.abs(a).sum() > 0
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_write_layer_kv_into_per_layer_pools(model):
  cfg, _ = model
  runners = _runner(model, False), _runner(model, True)
  k = np.arange(2 * cfg.num_kv_heads * cfg.head_dim, dtype=np.float32).reshape(2, cfg.num_kv_heads, cfg.head_dim)
  for r in runners:
    r.write_layer_kv(1, k, -k, np.array([3, 5], np.int32), np.array([0, 2], np.int32))
  (ks, vs), (kp, vp) = map(_stacked, runners)
  np.testing.assert_array_equal(ks, kp)
  np.testing.assert_array_equal(vs, vp)
  np.testing.assert_array_equal(kp[1, 3, 0], k[0])
  np.testing.assert_array_equal(vp[1, 5, 2], -k[1])
  assert not kp[0].any()


def test_per_layer_pools_need_the_unrolled_loop(model):
  cfg, m = model
  with pytest.raises(ValueError, match="kv_per_layer=True needs layer_loop='unrolled'"):
    ModelRunner(m, LocalPagedAttention(cfg, PAGES, PAGE), STEPS, "scan", kv_per_layer=True)
