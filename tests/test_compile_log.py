"""compile_log counts this process's XLA compiles: a new shape adds one, a repeated one none."""

import jax
import jax.numpy as jnp

from glinthawk_jax.compile_log import compile_log


def test_a_new_shape_compiles_once_and_a_repeat_not_at_all():
  log = compile_log()
  assert compile_log() is log  # one listener a process

  @jax.jit
  def twice_plus_one(x):
    return x * 2 + 1

  before = log.snapshot()
  twice_plus_one(jnp.ones((3, 5))).block_until_ready()
  after_new = log.snapshot()
  twice_plus_one(jnp.zeros((3, 5))).block_until_ready()
  assert log.snapshot()["count"] == after_new["count"]
  assert after_new["count"] > before["count"] and after_new["seconds"] > before["seconds"]
  grew = {f: n - before["by_function"].get(f, 0) for f, n in after_new["by_function"].items()}
  assert grew.get("jit(twice_plus_one)") == 1
