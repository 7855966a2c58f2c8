"""Token sampling: a pure function over logits [B, V] with per-row parameters, run on the device.

Each row draws with key = fold_in(PRNGKey(seed), token_index), so a request's tokens depend only on its
seed and logits, never on which other requests share the batch. Top-k is applied before top-p (vLLM's
order); temperature 0 is greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sample_row(logits, temperature, top_k, top_p, seed, token_index):
  vocab = logits.shape[-1]
  key = jax.random.fold_in(jax.random.PRNGKey(seed), token_index)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, stable=True)
  ranked = scaled[order]
  rank = jnp.arange(vocab, dtype=jnp.int32)
  keep = (top_k <= 0) | (rank < top_k)
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf))
  keep &= (jnp.cumsum(probs) - probs) < top_p  # smallest prefix whose mass reaches top_p
  choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf))
  return jnp.where(temperature > 0, order[choice], jnp.argmax(logits)).astype(jnp.int32)


def sample(logits: jnp.ndarray, temperature: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray,
           seeds: jnp.ndarray, token_index: jnp.ndarray, greedy_only: bool = False) -> jnp.ndarray:
  """Next tokens [B] int32 from logits [B, V] (float32).

  temperature, top_p: [B] float32; top_k: [B] int32 (0 = off); seeds: [B] uint32; token_index: [B] int32
  (index of the token being drawn within the request's output). `greedy_only` (static) skips the sort
  when every row is greedy.
  """
  if greedy_only:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(_sample_row)(logits, temperature, top_k, top_p, seeds, token_index)
