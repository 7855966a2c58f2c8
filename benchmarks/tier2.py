"""Tier-2 benchmark: KV-read GB/s of the paged attention kernel per KV storage, and KV-write GB/s of
the append (a prefill chunk), with 1..16 processes each pinned to one core and single-threaded
(--cores_per_proc N: N cores and kernel threads each, a tier-2 server's layout), beside the host's copy
bandwidth in the same run.

  python benchmarks/tier2.py --out tier2.json            # full run (about 2 minutes on 16 cores)
  python benchmarks/tier2.py --tiny --out /tmp/t2.json   # seconds, smoke test
  python benchmarks/tier2.py --skip_rpc --kinds float32,bfloat16,int8 --seconds 1  # kernel only

Rows: `copy` (numpy copyto, read+write bytes), `float32` / `bfloat16` / `int8` (KVPool.attend,
C++ kernel via the XLA FFI; bytes = stored K,V (+scales) read; calls rotate over pools of
--working_set_gb in all, 8 by default: past the last-level cache, as a server's pool is), `float32_xla`
(the same decode attention as a jitted gather over pages + einsum in XLA, for comparison), and
`append_<storage>` (KVPool.write of --append-tokens tokens, bf16 k, v into a bf16 pool, float32 into the others; bytes =
stored K,V (+scales) written). GB/s sums over processes.
"""

from __future__ import annotations

import os

# Before numpy/jax load, in this process and in every spawned worker (which re-imports this module):
# one BLAS/OpenMP thread per process (FACTS.md: 16 pinned processes collapsed otherwise), JAX on CPU.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import multiprocessing as mp  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from glinthawk_jax.json_file import write_json  # noqa: E402
from tier2_cpu.process import huge_page_env  # noqa: E402

# The attention rows' pools in total: far past a last-level cache (300 MiB on the H200 host), where a
# server's pool of every layer and sequence is. On that host one call's sequences a process read 2% faster
# in the floor's layout (30 single-core processes) and 9% faster in 7 servers' (docs/BENCHMARKS.md).
WORKING_SET_BYTES = 8 << 30

KINDS = ("copy", "float32", "float32_xla", "float32_xla_dense", "bfloat16", "int8", "append_bfloat16",
         "append_float32", "append_int8")


def _timed(fn, seconds: float) -> tuple[int, float]:
  """Call fn (one warm-up first) until `seconds` pass; returns (calls, elapsed)."""
  fn()
  calls, start = 0, time.perf_counter()
  while True:
    fn()
    calls += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return calls, elapsed


def _copy_case(cfg):
  src = np.ones(cfg["copy_bytes"] // 4, np.float32)
  dst = np.empty_like(src)
  return (lambda: np.copyto(dst, src)), 2 * src.nbytes


def _pool_case(cfg, storage):
  """KVPool.attend of `batch` sequences of `context` tokens, each call reading the next of as many such
  sets as cfg["pool_bytes"] holds (at least one): a pool past the last-level cache times memory, as a
  server's pool of every layer and sequence does, not the cache."""
  from tier2_cpu.kv_pool import KVPool
  b, ctx, ps = cfg["batch"], cfg["context"], cfg["page_size"]
  kv, h, d = cfg["kv_heads"], cfg["heads"], cfg["head_dim"]
  pages_per_set = b * (ctx // ps)
  sets = pool_sets(cfg, storage)
  pool = KVPool(1, sets * pages_per_set, ps, kv, d, storage)
  rng = np.random.default_rng(0)
  chunk = min(ctx, 1024)
  k = rng.standard_normal((chunk, kv, d), np.float32)
  tokens = sets * b * ctx
  for start in range(0, tokens, chunk):
    n = min(chunk, tokens - start)
    pool.write(0, np.arange(start, start + n), k[:n], k[:n])
  tables = np.arange(sets * pages_per_set, dtype=np.int32).reshape(sets, b, ctx // ps)
  q = rng.standard_normal((b, h, d), np.float32)
  pos = np.full(b, ctx - 1, np.int32)
  calls = itertools.count()
  return (lambda: pool.attend(0, q, tables[next(calls) % sets], pos)), b * ctx * pool.bytes_per_token


def pool_sets(cfg, storage) -> int:
  """How many sets of `batch` sequences of `context` tokens _pool_case's pool holds (at least one)."""
  from tier2_cpu.kv_pool import KVPool
  pages_per_set = cfg["batch"] * (cfg["context"] // cfg["page_size"])
  return max(1, KVPool.pages_for_budget(cfg.get("pool_bytes", 0), 1, cfg["page_size"], cfg["kv_heads"],
                                        cfg["head_dim"], storage) // pages_per_set)


def _append_case(cfg, storage):
  """KVPool.write of a prefill chunk into the next of 8 chunk-sized regions of the pool in turn (the
  writes miss the cache, as a long prefill's do)."""
  import ml_dtypes
  from tier2_cpu.kv_pool import KVPool
  n, ps, kv, d = cfg["append_tokens"], cfg["page_size"], cfg["kv_heads"], cfg["head_dim"]
  pages = -(-n // ps)
  pool = KVPool(1, 8 * pages, ps, kv, d, storage)
  rng = np.random.default_rng(0)
  dtype = ml_dtypes.bfloat16 if storage == "bfloat16" else np.float32
  k, v = (rng.standard_normal((n, kv, d), np.float32).astype(dtype) for _ in range(2))
  slots = [r * pages * ps + np.arange(n) for r in range(8)]
  calls = itertools.count()
  return (lambda: pool.write(0, slots[next(calls) % 8], k, v)), n * pool.bytes_per_token


def _xla_case(cfg):
  """Decode attention in XLA over an fp32 paged pool [pages, page_size, kv, dim]: gather + einsum."""
  import jax
  import jax.numpy as jnp
  from models.attention import grouped_attention
  b, ctx, ps = cfg["batch"], cfg["context"], cfg["page_size"]
  kv, h, d = cfg["kv_heads"], cfg["heads"], cfg["head_dim"]
  pages_per_seq = ctx // ps
  rng = np.random.default_rng(0)
  k_pool = jnp.asarray(rng.standard_normal((b * pages_per_seq, ps, kv, d), np.float32))
  v_pool = k_pool + 1

  @jax.jit
  def attend(k_pool, v_pool, q, tables, pos):
    k = k_pool[tables].reshape(b, ctx, kv, d)
    v = v_pool[tables].reshape(b, ctx, kv, d)
    mask = (jnp.arange(ctx)[None, :] <= pos[:, None])[:, None, :]
    return grouped_attention(q[:, None], k, v, mask)[:, 0]

  tables = np.arange(b * pages_per_seq, dtype=np.int32).reshape(b, pages_per_seq)
  q = rng.standard_normal((b, h, d), np.float32)
  pos = np.full(b, ctx - 1, np.int32)
  return (lambda: attend(k_pool, v_pool, q, tables, pos).block_until_ready()), 2 * k_pool.nbytes


def _xla_dense_case(cfg):
  """Decode attention in XLA over contiguous fp32 K,V [batch, context, kv, dim] (no pages): the
  formulation FACTS.md measured, as the reference for the paged kernels."""
  import jax
  from models.attention import grouped_attention
  b, ctx, kv, h, d = cfg["batch"], cfg["context"], cfg["kv_heads"], cfg["heads"], cfg["head_dim"]
  rng = np.random.default_rng(0)
  k = jax.device_put(rng.standard_normal((b, ctx, kv, d), np.float32))
  v = k + 1
  mask = np.ones((b, 1, ctx), bool)
  attend = jax.jit(lambda q, k, v: grouped_attention(q[:, None], k, v, mask)[:, 0])
  q = rng.standard_normal((b, h, d), np.float32)
  return (lambda: attend(q, k, v).block_until_ready()), 2 * k.nbytes


def _worker(cores, cfg, barrier, results):
  os.sched_setaffinity(0, cores)  # before jax loads: XLA sizes its thread pool (the kernel's threads) from affinity
  for kind in cfg["kinds"]:
    if kind == "copy":
      fn, nbytes = _copy_case(cfg)
    elif kind == "float32_xla":
      fn, nbytes = _xla_case(cfg)
    elif kind == "float32_xla_dense":
      fn, nbytes = _xla_dense_case(cfg)
    elif kind.startswith("append_"):
      fn, nbytes = _append_case(cfg, kind[len("append_"):])
    else:
      fn, nbytes = _pool_case(cfg, kind)
    barrier.wait()
    calls, elapsed = _timed(fn, cfg["seconds"])
    results.put((kind, min(cores), calls * nbytes / elapsed / 1e9, elapsed / calls))
    del fn
    barrier.wait()


@contextlib.contextmanager
def _environment(changes: dict[str, str]):
  """os.environ with `changes` inside the block (what spawned children inherit), as it was after."""
  before = {k: os.environ.get(k) for k in changes}
  os.environ.update(changes)
  try:
    yield
  finally:
    for k, v in before.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def kernel_rows(cfg: dict, procs: list[int]) -> list[dict]:
  """One row per (kind, process count): total GB/s and mean seconds per call. Each process has
  cfg["cores_per_proc"] cores (default 1), as many kernel threads, and an attention pool of its share of
  cfg["working_set_bytes"] (default 0: one call's sequences only)."""
  ctx = mp.get_context("spawn")
  cores = sorted(os.sched_getaffinity(0))
  per = cfg.get("cores_per_proc", 1)
  rows = []
  for n in procs:
    if n * per > len(cores):
      print(f"skipping {n} processes of {per} cores: only {len(cores)} cores available", file=sys.stderr)
      continue
    barrier, results = ctx.Barrier(n), ctx.Queue()
    mine = dict(cfg, pool_bytes=cfg.get("working_set_bytes", 0) // n)
    workers = [ctx.Process(target=_worker, args=(set(cores[i * per:(i + 1) * per]), mine, barrier, results))
               for i in range(n)]
    with _environment(huge_page_env(cfg.get("huge_pages", False))):  # read at the workers' startup
      for w in workers:
        w.start()
    got = [results.get(timeout=300) for _ in range(n * len(cfg["kinds"]))]
    for w in workers:
      w.join()
      if w.exitcode:
        raise RuntimeError(f"benchmark worker pid {w.pid} exited with {w.exitcode}")
    for kind in cfg["kinds"]:
      mine = [g for g in got if g[0] == kind]
      rows.append({"kind": kind, "processes": n, "cores_per_proc": per, "gb_per_s": sum(g[2] for g in mine),
                   "seconds_per_call": float(np.mean([g[3] for g in mine]))})
  return rows


def _device_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
  except OSError:
    pass
  return "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tier2.json", help="JSON file for every number")
  parser.add_argument("--tiny", action="store_true",
                      help="small sizes, 1-2 processes, one call's sequences a process (no working set), seconds")
  parser.add_argument("--procs", default="1,4,8,16", help="process counts")
  parser.add_argument("--cores_per_proc", type=int, default=1,
                      help="cores (and kernel threads) of each process; > 1 is laid out like a tier-2 server")
  parser.add_argument("--seconds", type=float, default=1.5, help="measured time per row")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--append-tokens", type=int, default=2048, help="tokens per append_* write")
  parser.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {KINDS}")
  parser.add_argument("--skip_rpc", action="store_true", help="kernel rows only, no RPC rows")
  parser.add_argument("--working_set_gb", type=float, default=WORKING_SET_BYTES / 2**30,
                      help="attention pools' total size over the processes, calls rotating through it (0: one "
                      "call's sequences each, partly cache-resident)")
  parser.add_argument("--no_huge_pages", action="store_true",
                      help="pools on 4 KiB pages (default: transparent huge pages, as servers with tier2.huge_pages)")
  args = parser.parse_args()
  cfg = {"batch": args.batch, "context": args.context, "heads": args.heads,
         "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page_size": args.page_size,
         "append_tokens": args.append_tokens, "seconds": args.seconds, "copy_bytes": 256 << 20,
         "kinds": args.kinds.split(","), "huge_pages": not args.no_huge_pages, "cores_per_proc": args.cores_per_proc,
         "working_set_bytes": int(args.working_set_gb * 2**30)}
  procs = [int(p) for p in args.procs.split(",")]
  if args.tiny:
    cfg.update(batch=2, context=512, seconds=0.3, copy_bytes=16 << 20, append_tokens=256, working_set_bytes=0)
    procs = [1, 2]
  rows = kernel_rows(cfg, procs)
  try:
    from tier2_cpu.rpc_bench import rpc_rows  # B1's RPC round-trip rows, when present
  except ImportError:
    rpc_rows = None
  if args.skip_rpc:
    rpc_rows = None
  extra = rpc_rows(tiny=args.tiny) if rpc_rows else []

  print(f"\nTier-2 attention, decode: {cfg['cores_per_proc']} core(s) a process, batch {cfg['batch']}, context {cfg['context']}, heads "
        f"{cfg['heads']}/{cfg['kv_heads']} KV, dim {cfg['head_dim']}, page {cfg['page_size']}; "
        f"append: {cfg['append_tokens']} tokens; "
        f"{_device_name()}")
  print(f"{'processes':>9} " + " ".join(f"{k:>12}" for k in cfg["kinds"]) + "   (GB/s total)")
  by = {(r["kind"], r["processes"]): r["gb_per_s"] for r in rows}
  for n in sorted({r["processes"] for r in rows}):
    print(f"{n:>9} " + " ".join(f"{by[(k, n)]:>12.1f}" for k in cfg["kinds"]))
  if "bfloat16" in cfg["kinds"] and "float32" in cfg["kinds"]:
    for n in sorted({r["processes"] for r in rows}):
      print(f"bf16 / fp32 GB/s at {n} processes: {by[('bfloat16', n)] / by[('float32', n)]:.2f}")
  for row in extra:
    print("  ".join(f"{k}={v}" for k, v in row.items()))
  record = {"device": _device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join([sys.executable, *sys.argv]), "config": cfg, "kernel_rows": rows,
            "rpc_rows": extra}
  write_json(args.out, record, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
