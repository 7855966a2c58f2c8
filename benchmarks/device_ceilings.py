"""The device's measured ceilings, taken in the same run as the benchmark that divides by them."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def copy_bandwidth_gbs(nbytes: int = 4 << 30, iters: int = 20) -> float:
  """Device memory bandwidth in GB/s, bytes read plus written, of y = x * 2 over nbytes of bf16."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 2)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    y = f(x)
  y.block_until_ready()
  gbs = 2 * nbytes * iters / (time.perf_counter() - start) / 1e9
  del x, y
  return gbs


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
  """Dense bf16 matrix-product rate in TFLOP/s on random n x n operands."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
  b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    c = f(a, b)
  c.block_until_ready()
  return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
