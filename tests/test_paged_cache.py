"""Pool sizing from the budget and the host page allocator."""

import jax.numpy as jnp
import ml_collections
import pytest

from glinthawk_jax import paged_cache
from glinthawk_jax.paged_cache import KVCacheTooSmallError, OutOfPagesError, PageAllocator
from models.model_config import ModelConfig

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, dtype="float32")  # 2*2*2*8*4 = 256 bytes a token


def _engine(**kw):
  c = ml_collections.ConfigDict(dict(max_num_seqs=4, page_size=16, kv_cache_gb=0.0,
                                     kv_cache_memory_fraction=0.5, max_model_len=64))
  c.update(kw)
  return c


def test_budget_in_gib_sets_the_page_count():
  page_bytes = 16 * MODEL.kv_bytes_per_token
  assert paged_cache.num_pages_for(_engine(kv_cache_gb=10 * page_bytes / paged_cache.GIB), MODEL) == 10


def test_pool_is_capped_at_what_max_num_seqs_full_sequences_use():
  assert paged_cache.num_pages_for(_engine(kv_cache_gb=1.0), MODEL) == 4 * 4 + 1


def test_cpu_fallback_without_memory_stats_holds_every_slot():
  assert paged_cache.num_pages_for(_engine(), MODEL) == 4 * 4 + 1


def test_budget_below_one_full_sequence_names_the_keys():
  with pytest.raises(KVCacheTooSmallError, match="max_model_len=64"):
    paged_cache.num_pages_for(_engine(kv_cache_gb=3 * 16 * 256 / paged_cache.GIB), MODEL)


def test_init_pool_shape_and_dtype():
  k, v = paged_cache.init_pool(MODEL, 5, 16)
  assert k.shape == v.shape == (2, 5, 16, 2, 8) and k.dtype == jnp.float32


def test_allocator_never_hands_out_scratch_and_reuses_freed_pages():
  alloc = PageAllocator(6)
  first = alloc.allocate(3)
  second = alloc.allocate(2)
  assert paged_cache.SCRATCH_PAGE not in first + second
  assert len(set(first + second)) == 5 and alloc.num_free == 0
  with pytest.raises(OutOfPagesError, match="asked for 1 pages, 0 free"):
    alloc.allocate(1)
  alloc.free(first)
  assert sorted(alloc.allocate(3)) == sorted(first)
