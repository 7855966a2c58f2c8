"""Attention ops over dense q, k, v: the reference the paged and tier-2 kernels are checked against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30


def grouped_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Softmax attention with grouped KV heads; logits and softmax in float32.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim];
  mask: [batch, q_len, kv_len] bool (True = attend). Returns [batch, q_len, heads, dim] in q's dtype.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, h // kv_heads, d).astype(jnp.float32)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
  logits = jnp.where(mask[:, None, None, :, :], logits, MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(b, t, h, d).astype(q.dtype)


def causal_mask(q_positions: jnp.ndarray, kv_positions: jnp.ndarray,
                sliding_window: int | None = None) -> jnp.ndarray:
  """[batch, q_len, kv_len] mask: a query sees keys at its position or before (and within the window)."""
  diff = q_positions[:, :, None] - kv_positions[:, None, :]
  mask = diff >= 0
  if sliding_window is not None:
    mask &= diff < sliding_window
  return mask
