"""The device's measured ceilings, taken in the same run as the benchmark that divides by them."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def seconds_per_call(fn, args, iters: int) -> float:
  """Mean seconds of fn(*args) over `iters` calls dispatched back to back, after one warm-up call."""
  fn(*args).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  out.block_until_ready()
  return (time.perf_counter() - start) / iters


def copy_bandwidth_gbs(nbytes: int = 4 << 30, iters: int = 20) -> float:
  """Device memory bandwidth in GB/s, bytes read plus written, of y = x * 2 over nbytes of bf16."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  return 2 * nbytes / seconds_per_call(jax.jit(lambda a: a * 2), (x,), iters) / 1e9


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
  """Dense bf16 matrix-product rate in TFLOP/s on random n x n operands."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
  b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
  return 2 * n**3 / seconds_per_call(jax.jit(lambda x, y: x @ y), (a, b), iters) / 1e12
