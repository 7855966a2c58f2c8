"""benchmarks/tier2.py's attention rows: pools of a working set that calls rotate through."""

import numpy as np

from benchmarks import tier2
from tier2_cpu.kv_pool import KVPool

CFG = {"batch": 2, "context": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "page_size": 16}
SET_BYTES = 2 * 64 * 2 * 2 * 16 * 2  # tokens x (K, V) x kv heads x dim x bf16 bytes


def test_pool_sets_fill_the_working_set():
  assert tier2.pool_sets(CFG, "bfloat16") == 1
  assert tier2.pool_sets(dict(CFG, pool_bytes=SET_BYTES * 5 + 7), "bfloat16") == 5
  assert tier2.pool_sets(dict(CFG, pool_bytes=SET_BYTES * 5), "float32") == 2


def test_pool_case_calls_rotate_through_every_set(monkeypatch):
  read = []
  attend = KVPool.attend
  monkeypatch.setattr(KVPool, "attend", lambda self, layer, q, tables, pos: read.append(tables.copy()) or
                      attend(self, layer, q, tables, pos))
  fn, nbytes = tier2._pool_case(dict(CFG, pool_bytes=3 * SET_BYTES), "bfloat16")
  for _ in range(6):
    fn()
  assert nbytes == SET_BYTES
  sets = [tuple(t.reshape(-1)) for t in read]
  assert len(set(sets[:3])) == 3 and sets[3:] == sets[:3]  # three disjoint sets, then the first again
  assert len(np.unique(np.concatenate(read[:3]))) == 3 * 2 * 64 // 16


def test_pool_case_fills_a_context_past_its_write_chunk():
  """Contexts past 1024 tokens that are not a multiple of it (an 8B context of 4080) fill the pool exactly."""
  fn, nbytes = tier2._pool_case(dict(CFG, batch=3, context=1040), "bfloat16")
  fn()
  assert nbytes == 3 * 1040 * 2 * 2 * 16 * 2


def test_kernel_rows_with_a_working_set():
  """kernel_rows gives each of its processes its share of working_set_bytes and times calls over it."""
  cfg = dict(CFG, seconds=0.2, copy_bytes=1 << 20, kinds=["bfloat16"], working_set_bytes=2 * 3 * SET_BYTES)
  (row,) = tier2.kernel_rows(cfg, [2])
  assert row["processes"] == 2 and row["gb_per_s"] > 0 and row["seconds_per_call"] > 0
