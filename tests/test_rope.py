"""RoPE: frequencies as transformers computes them, rotation against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from models.rope import apply_rope, inverse_frequencies

LLAMA3 = ("llama3", 8.0, 1.0, 4.0, 8192)


def _hf_config(theta, scaling):
  params = {"rope_type": "default", "rope_theta": theta}
  if scaling is not None:
    _, factor, low, high, original = scaling
    params.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                  original_max_position_embeddings=original)
  return transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params)


@pytest.mark.parametrize("theta, scaling", [(10000.0, None), (500000.0, None), (500000.0, LLAMA3),
                                            (500000.0, ("llama3", 8.0, 1.0, 4.0, 64))])
def test_inverse_frequencies_match_transformers(theta, scaling):
  config = _hf_config(theta, scaling)
  if scaling is None:
    ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
  else:
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
  ours = inverse_frequencies(128, theta, scaling)
  np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)
  if scaling is not None:  # the scaling really changes some frequencies and keeps others
    plain = inverse_frequencies(128, theta)
    assert (ours < plain).any() and (ours == plain).any()


def _rope_float64(x, positions, inv_freq):
  freqs = positions[..., None].astype(np.float64) * inv_freq
  cos, sin = np.cos(freqs)[:, :, None], np.sin(freqs)[:, :, None]
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_apply_rope_matches_float64_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16))
  positions = np.array([[0, 1, 2, 3, 4], [7, 100, 1000, 3000, 4095]])
  inv_freq = inverse_frequencies(16, 10000.0)
  ours = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), inv_freq)
  np.testing.assert_allclose(np.asarray(ours), _rope_float64(x, positions, inv_freq), atol=2e-3)
  np.testing.assert_allclose(np.asarray(ours)[:, 0][0], x[0, 0], atol=1e-6)  # position 0 is identity


def test_rotation_preserves_norms_and_relative_angles():
  """q·k after RoPE depends only on the distance between positions."""
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 32))
  inv_freq = inverse_frequencies(32, 10000.0)

  def dot(pq, pk):
    rq = apply_rope(jnp.asarray(q, jnp.float32), jnp.array([[pq]]), inv_freq)
    rk = apply_rope(jnp.asarray(k, jnp.float32), jnp.array([[pk]]), inv_freq)
    return float(jnp.sum(rq * rk))

  assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-4)
  rotated = apply_rope(jnp.asarray(q, jnp.float32), jnp.array([[123]]), inv_freq)
  assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(np.linalg.norm(q)), rel=1e-5)
