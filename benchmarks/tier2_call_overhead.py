"""Tier-2 server host time per decode call, outside the jitted kernel (issue #5's "busy but not in the kernel").

  python benchmarks/tier2_call_overhead.py                  # 7B and 8B dims, about 15 s on 2 cores
  python benchmarks/tier2_call_overhead.py --smoke          # tiny dims, seconds

Times `Tier2Service.attend` (decode the raw request, checks, page table, the pool's arguments, the reply)
on one in-process server holding --sequences sequences of --context tokens, each call --tokens new
tokens per sequence, and subtracts the jitted `_write_attend` call, timed by a wrapper around it:
- cold: every call right after the previous call's kernel, which streams all of the sequences' KV (146 MB
  for the 7B default, 74 MB for 8B), as a busy server runs;
- hot: the wrapper skips the kernel (returns the last output), so the host path runs with warm caches;
- dispatch: the jitted call itself with arguments that do no work (padding rows only), the part of
  the jitted call that is host work too.
Each is the least median of --rounds rounds of --calls calls (the JSON has every round's median).
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.tier2 import _device_name  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.protos import tensor_wire  # noqa: E402
from tier2_cpu import kv_pool  # noqa: E402
from tier2_cpu.server import ServerOptions, Tier2Service  # noqa: E402
from tier2_cpu.shm_doorbell import AbortContext  # noqa: E402

DIMS = {"7b": {"num_heads": 32, "num_kv_heads": 32, "head_dim": 128, "context": 496},  # Llama-2-7B
        "8b": {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "context": 1008},  # Llama-3-8B
        "smoke": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "context": 40}}


class _TimedKernel:
  """Stands in for kv_pool._write_attend: times each jitted call to completion, or skips it (hot)."""

  def __init__(self, jitted):
    self.jitted, self.skip, self.seconds, self.last, self.args, self.kwargs = jitted, False, [], None, (), {}

  def __call__(self, arrays, *args, **kwargs):
    self.args, self.kwargs = args, kwargs  # for _dispatch_seconds
    if self.skip:
      return arrays, self.last
    start = time.perf_counter()
    arrays, self.last = jax.block_until_ready(self.jitted(arrays, *args, **kwargs))
    self.seconds.append(time.perf_counter() - start)
    return arrays, self.last


def _service(dims: dict, sequences: int, page_size: int, kv_dtype: str) -> Tier2Service:
  """A one-layer server holding `sequences` sequences of dims['context'] tokens (random K, V)."""
  context, kv, d = dims["context"], dims["num_kv_heads"], dims["head_dim"]
  token_bytes = 2 * kv * d * np.dtype(kv_pool._DTYPES[kv_dtype]).itemsize
  pages = sequences * (-(-(context + 1) // page_size) + 1)
  options = ServerOptions(num_layers=1, num_heads=dims["num_heads"], num_kv_heads=kv, head_dim=d,
                          page_size=page_size, max_seq_len=context + page_size,
                          kv_cache_gb=pages * page_size * token_bytes / 2**30, kv_dtype=kv_dtype)
  service = Tier2Service(options)
  service.Allocate(type("Request", (), {"seq_ids": list(range(sequences))})(), AbortContext())
  rng = np.random.default_rng(0)
  for s in range(sequences):
    k = rng.standard_normal((context, kv, d)).astype(jax.numpy.bfloat16)
    parts = tensor_wire.request_parts(s, 0, np.full(context, s), np.arange(context), None, k, k,
                                      num_heads=dims["num_heads"])
    service.attend(b"".join(p.tobytes() for p in parts), AbortContext())
  return service


def _decode_payload(dims: dict, sequences: int, tokens: int) -> bytes:
  """Each sequence's next `tokens` tokens (rewritten at the same positions every call)."""
  rng = np.random.default_rng(1)
  n, bf16 = sequences * tokens, jax.numpy.bfloat16
  seq_ids = np.repeat(np.arange(sequences), tokens)
  positions = dims["context"] - tokens + np.tile(np.arange(tokens), sequences)
  q = rng.standard_normal((n, dims["num_heads"], dims["head_dim"])).astype(bf16)
  k = rng.standard_normal((n, dims["num_kv_heads"], dims["head_dim"])).astype(bf16)
  return tensor_wire.encode_request(7, 0, seq_ids, positions, q, k, k)


def _dispatch_seconds(pool: kv_pool.KVPool, timed: _TimedKernel) -> float:
  """One jitted _write_attend with the server's last arguments made padding rows (pages out of range:
  nothing written; positions -1: nothing attended)."""
  page, offset, kv, q, tables, positions = timed.args
  args = (np.full_like(page, pool.num_pages), offset, kv, q, tables, np.full_like(positions, -1))
  start = time.perf_counter()
  pool._layers[0], out = timed.jitted(pool._layers[0], *args, **timed.kwargs)
  np.asarray(out)
  return time.perf_counter() - start


def _least_median(sample, rounds: int, calls: int) -> tuple[float, list[float]]:
  """Median seconds of `sample()` over each round of `calls`, and the least of them: the machine's
  other load inflates some rounds (a shared 2-core machine doubled whole runs' medians)."""
  medians = [float(np.median([sample() for _ in range(calls)])) for _ in range(rounds)]
  return min(medians), medians


def measure(name: str, dims: dict, sequences: int, tokens: int, page_size: int, kv_dtype: str, calls: int,
            rounds: int) -> dict:
  service = _service(dims, sequences, page_size, kv_dtype)
  payload, context = _decode_payload(dims, sequences, tokens), AbortContext()
  timed = kv_pool._write_attend = _TimedKernel(kv_pool._write_attend)
  kernels = []  # seconds of each timed call's jitted call

  def host_seconds() -> float:
    """One call's time less its jitted call's (none when skipped)."""
    timed.seconds = []
    start = time.perf_counter()
    service.attend(payload, context)
    kernels.append(timed.seconds[0] if timed.seconds else 0.0)
    return time.perf_counter() - start - kernels[-1]

  try:
    row = {}  # seconds, reported as ms
    for mode in ("cold", "hot"):
      timed.skip = mode == "hot"
      for _ in range(5):
        service.attend(payload, context)
      row[f"host_{mode}_ms"], row[f"host_{mode}_round_ms"] = _least_median(host_seconds, rounds, calls)
      if mode == "cold":
        row["kernel_ms"] = float(np.median(kernels))
    row["dispatch_ms"], row["dispatch_round_ms"] = _least_median(lambda: _dispatch_seconds(service.pool, timed),
                                                                 rounds, calls)
  finally:
    kv_pool._write_attend = timed.jitted
  ms = {key: [round(1e3 * x, 4) for x in v] if isinstance(v, list) else round(1e3 * v, 4) for key, v in row.items()}
  return {"dims": name, **dims, "sequences": sequences, "tokens": tokens, "page_size": page_size,
          "kv_dtype": kv_dtype, "calls": calls, "rounds": rounds, **ms}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", default="7b,8b", help=f"comma-separated of {sorted(DIMS)}")
  parser.add_argument("--sequences", type=int, default=18)
  parser.add_argument("--tokens", type=int, default=1, help="new tokens per sequence per call")
  parser.add_argument("--context", type=int, default=0, help="tokens held per sequence (0: the dims' default)")
  parser.add_argument("--page_size", type=int, default=16)
  parser.add_argument("--kv_dtype", default="bfloat16", choices=kv_pool.STORAGES)
  parser.add_argument("--calls", type=int, default=100, help="timed calls per round")
  parser.add_argument("--rounds", type=int, default=5, help="rounds per mode; the least round median is reported")
  parser.add_argument("--smoke", action="store_true", help="tiny dims, 4 sequences, 2 rounds of 20 calls")
  parser.add_argument("--out", default="tier2_call_overhead.json", help="JSON file for every number")
  args = parser.parse_args()
  names, sequences, calls = args.dims.split(","), args.sequences, args.calls
  if args.smoke:
    names, sequences, calls, args.rounds = ["smoke"], 4, 20, 2
  rows = []
  for name in names:
    dims = dict(DIMS[name], **({"context": args.context} if args.context else {}))
    rows.append(measure(name, dims, sequences, args.tokens, args.page_size, args.kv_dtype, calls, args.rounds))
  print(f"\nTier-2 host time per call outside the kernel (ms, least of {args.rounds} round medians), {_device_name()}")
  print(f"{'dims':>6} {'heads':>7} {'context':>7} {'seq x tok':>9} {'kernel':>7} {'host cold':>9} {'host hot':>8} "
        f"{'dispatch':>8}")
  for r in rows:
    print(f"{r['dims']:>6} {r['num_heads']:>3}/{r['num_kv_heads']:<3} {r['context']:>7} "
          f"{str(r['sequences']) + 'x' + str(r['tokens']):>9} {r['kernel_ms']:>7.3f} {r['host_cold_ms']:>9.3f} "
          f"{r['host_hot_ms']:>8.3f} {r['dispatch_ms']:>8.3f}")
  write_json(args.out, {"device": _device_name(), "jax_device": str(jax.devices()[0]),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "command": " ".join([sys.executable, *sys.argv]), "rows": rows}, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
