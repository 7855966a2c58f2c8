"""The paged KV cache: pool sizing from a memory budget, the device pool, and the host page allocator.

Pool layout: k and v are each [layers, num_pages, page_size, kv_heads, head_dim]. Page 0 is a scratch
page never handed out: padded rows and padded tokens write there and block tables are padded with it.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from models.model_config import ModelConfig

SCRATCH_PAGE = 0
GIB = 1 << 30


class KVCacheTooSmallError(ValueError):
  """The KV budget cannot hold one sequence of engine.max_model_len tokens."""


class OutOfPagesError(RuntimeError):
  """The allocator was asked for more pages than are free (the scheduler should have preempted)."""


def pages_per_sequence(max_model_len: int, page_size: int) -> int:
  return math.ceil(max_model_len / page_size)


def pool_budget_bytes(engine_config, needed_bytes: int, device: jax.Device | None = None) -> int:
  """KV bytes to allocate: engine.kv_cache_gb if set, else kv_cache_memory_fraction of free device memory.

  Where the device reports no memory statistics (the CPU backend), the fallback is the bytes needed to
  hold every slot at full length (`needed_bytes`), logged so the choice is visible.
  """
  if engine_config.kv_cache_gb > 0:
    return int(engine_config.kv_cache_gb * GIB)
  device = device or jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    logging.info("device %s reports no memory_stats; KV pool sized for max_num_seqs x max_model_len "
                 "(%.3f GiB); set engine.kv_cache_gb to choose", device, needed_bytes / GIB)
    return needed_bytes
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return int(free * engine_config.kv_cache_memory_fraction)


def num_pages_for(engine_config, model: ModelConfig, device: jax.Device | None = None, num_devices: int = 1) -> int:
  """Pages in the pool (scratch page included), capped at what max_num_seqs full-length sequences use.

  With `num_devices` > 1 (tensor parallelism, layer slices) each device holds 1/num_devices of every page
  and the budget is per device. Raises KVCacheTooSmallError when one max_model_len sequence does not fit.
  """
  page_bytes = -(-engine_config.page_size * model.kv_bytes_per_token // num_devices)
  per_seq = pages_per_sequence(engine_config.max_model_len, engine_config.page_size)
  cap = engine_config.max_num_seqs * per_seq + 1
  budget = pool_budget_bytes(engine_config, cap * page_bytes, device)
  pages = min(budget // page_bytes, cap)
  if pages < per_seq + 1:
    raise KVCacheTooSmallError(
        f"KV budget of {budget / GIB:.4f} GiB holds {pages} pages of {engine_config.page_size} tokens; "
        f"one sequence of engine.max_model_len={engine_config.max_model_len} needs {per_seq} (+1 scratch). "
        "Raise engine.kv_cache_gb / kv_cache_memory_fraction or lower engine.max_model_len")
  return int(pages)


def init_pool(model: ModelConfig, num_pages: int, page_size: int, num_layers: int | None = None,
              sharding: jax.sharding.Sharding | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Zeroed (k_pool, v_pool), each [layers, num_pages, page_size, kv_heads, head_dim] at the model dtype.

  num_layers: the layers of this pool (a layer slice's), default all; sharding: where it lives (default
  device if None), created in place so a pool split over devices never exists whole on one.
  """
  shape = (num_layers or model.num_layers, num_pages, page_size, model.num_kv_heads, model.head_dim)
  zeros = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(model.dtype)), out_shardings=sharding)
  return zeros(), zeros()


class PageAllocator:
  """Free list of page ids 1..num_pages-1 (page 0 is scratch). Host side, O(1) per page."""

  def __init__(self, num_pages: int):
    self.num_pages = num_pages
    self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))

  @property
  def num_free(self) -> int:
    return len(self._free)

  def allocate(self, count: int) -> list[int]:
    if count > len(self._free):
      raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
    taken = self._free[len(self._free) - count:]
    del self._free[len(self._free) - count:]
    return taken[::-1]

  def free(self, pages: list[int]) -> None:
    self._free.extend(reversed(pages))
