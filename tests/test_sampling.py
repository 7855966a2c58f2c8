"""Sampling: greedy, top-k, top-p mass, and per-request seeds independent of the batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glinthawk_jax.sampling import sample

V = 32


@functools.partial(jax.jit, static_argnames="greedy_only")
def _sample(logits, temperature, top_k, top_p, seeds, index, greedy_only=False):
  return sample(logits, temperature, top_k, top_p, seeds, index, greedy_only)


def _rows(b, temperature=1.0, top_k=0, top_p=1.0, seed=0, index=0):
  return (jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_k, jnp.int32),
          jnp.full((b,), top_p, jnp.float32), jnp.full((b,), seed, jnp.uint32), jnp.full((b,), index, jnp.int32))


def _logits(b, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, V)) * 2, jnp.float32)


def test_greedy_and_top_k_one_are_argmax():
  logits = _logits(16)
  want = np.argmax(np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(_sample(logits, *_rows(16, temperature=0.0)), want)
  np.testing.assert_array_equal(_sample(logits, *_rows(16), greedy_only=True), want)
  np.testing.assert_array_equal(_sample(logits, *_rows(16, temperature=1.5, top_k=1)), want)


def test_seeded_rows_do_not_depend_on_batch_composition():
  logits = _logits(8)
  temperature, top_k, top_p, _, index = _rows(8, temperature=1.0, top_k=10, top_p=0.9)
  seeds = jnp.arange(8, dtype=jnp.uint32) + 100
  full = np.asarray(_sample(logits, temperature, top_k, top_p, seeds, index))
  perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
  permuted = np.asarray(_sample(logits[perm], temperature, top_k, top_p, seeds[perm], index))
  np.testing.assert_array_equal(permuted, full[perm])
  alone = [int(_sample(logits[i:i + 1], *_rows(1, top_k=10, top_p=0.9, seed=100 + i))[0]) for i in (3, 6)]
  assert alone == [full[3], full[6]]
  other_index = np.asarray(_sample(logits, temperature, top_k, top_p, seeds, index + 1))
  assert not np.array_equal(other_index, full)  # the token index moves the key


def _draws(logits_row, n, **kw):
  logits = jnp.broadcast_to(logits_row, (n, V))
  temperature, top_k, top_p, _, _ = _rows(n, **kw)
  seeds = jnp.arange(n, dtype=jnp.uint32)
  return np.asarray(_sample(logits, temperature, top_k, top_p, seeds, jnp.zeros((n,), jnp.int32)))


def test_top_p_keeps_the_smallest_set_reaching_the_mass_with_renormalized_frequencies():
  probs = np.array([0.4, 0.25, 0.15, 0.1] + [0.1 / (V - 4)] * (V - 4))
  logits_row = jnp.asarray(np.log(probs)[np.random.default_rng(0).permutation(V)], jnp.float32)
  order = np.argsort(-np.asarray(logits_row))
  draws = _draws(logits_row, 4000, top_p=0.75)
  assert set(draws) == set(order[:3].tolist())  # 0.4 + 0.25 < 0.75 <= 0.4 + 0.25 + 0.15
  freq = np.array([(draws == t).mean() for t in order[:3]])
  np.testing.assert_allclose(freq, probs[:3] / probs[:3].sum(), atol=0.03)


def test_top_k_restricts_to_the_k_largest_and_temperature_sharpens():
  logits_row = _logits(1, seed=3)[0]
  order = np.argsort(-np.asarray(logits_row))
  assert set(_draws(logits_row, 2000, top_k=4)) <= set(order[:4].tolist())
  hot = _draws(logits_row, 2000, temperature=2.0)
  cold = _draws(logits_row, 2000, temperature=0.25)
  assert (cold == order[0]).mean() > (hot == order[0]).mean() + 0.2
  p = np.exp(np.asarray(logits_row) - np.asarray(logits_row).max())
  p /= p.sum()
  assert abs((_draws(logits_row, 4000) == order[0]).mean() - p[order[0]]) < 0.03
