"""Tier-2 kernel GB/s by pool size and page backing, in this process (pin it with taskset):

  GLIBC_TUNABLES= taskset -c 5 python benchmarks/tier2_pool_pages.py small
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 taskset -c 8-11 python benchmarks/tier2_pool_pages.py big

`small`: one layer holding only the 13 rows a call reads (like benchmarks/tier2.py's floor processes);
`big`: 8 layers of 36 sequences, calls of 13 of them over every layer in turn (like a tier-2 server of
the 7B long shape). Llama-2-7B heads (32/32, dim 128), context 496, bf16. GLIBC_TUNABLES=
glibc.malloc.hugetlb=1 backs the pool with transparent huge pages (tier2.huge_pages). Prints one JSON
line: GB/s of KV read and the process's AnonHugePages.
"""

import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from tier2_cpu.kv_pool import KVPool  # noqa: E402

ROWS, CONTEXT, PAGE, KV_HEADS, HEAD_DIM, SEQUENCES, LAYERS = 13, 496, 16, 32, 128, 36, 8


def main(kind: str) -> None:
  layers, sequences = (1, ROWS) if kind == "small" else (LAYERS, SEQUENCES)
  pages_per_seq = CONTEXT // PAGE
  pool = KVPool(layers, sequences * pages_per_seq, PAGE, KV_HEADS, HEAD_DIM, "bfloat16")
  rng = np.random.default_rng(0)
  k = rng.standard_normal((1024, KV_HEADS, HEAD_DIM), np.float32)
  page_of = np.arange(sequences * pages_per_seq, dtype=np.int32).reshape(sequences, pages_per_seq)
  slots = (page_of[:, :, None] * PAGE + np.arange(PAGE)).reshape(-1)
  for layer in range(layers):
    for s in range(0, len(slots), len(k)):
      part = slots[s:s + len(k)]
      pool.write(layer, part, k[:len(part)], k[:len(part)])
  q = rng.standard_normal((ROWS, KV_HEADS, HEAD_DIM), np.float32)
  positions = np.full(ROWS, CONTEXT - 1, np.int32)
  calls = [(layer, page_of[(np.arange(ROWS) + ROWS * i) % sequences]) for i in range(3) for layer in range(layers)]
  for layer, tables in calls[:4]:
    pool.attend(layer, q, tables, positions)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < 2.0:
    layer, tables = calls[n % len(calls)]
    pool.attend(layer, q, tables, positions)
    n += 1
  seconds = time.perf_counter() - start
  with open("/proc/self/smaps_rollup") as f:
    huge = next((line.split(":")[1].strip() for line in f if line.startswith("AnonHugePages")), "")
  print(json.dumps({"kind": kind, "cores": len(os.sched_getaffinity(0)),
                    "gb_s": round(n * ROWS * CONTEXT * pool.bytes_per_token / layers / seconds / 1e9, 2),
                    "tunables": os.environ.get("GLIBC_TUNABLES", ""), "anon_huge": huge}))


if __name__ == "__main__":
  if len(sys.argv) != 2 or sys.argv[1] not in ("small", "big"):
    sys.exit("usage: tier2_pool_pages.py small|big")
  main(sys.argv[1])
