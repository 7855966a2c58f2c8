"""Decode attention over a paged KV cache: the XLA formulation vs the Pallas kernel, in GB/s.

One layer of Llama-2-7B decode attention (32 query / 32 KV heads, head dim 128, bf16, page 16) at the
engine's bucketed block-table widths; pages are shuffled across a pool several times the L2. Each kernel is
timed with the o_proj matmul after it, as in the decode step (that matmul's own time subtracted). Bytes
counted are the live K and V tokens read once (the floor), and the device's copy bandwidth (read plus
write) is measured in the same run as the ceiling.

  python benchmarks/decode_attention.py --out decode_attention.json          # GPU, under a minute
  python benchmarks/decode_attention.py --small --out /tmp/da.json           # CPU check (Pallas interpreted)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.device_ceilings import copy_bandwidth_gbs, seconds_per_call  # noqa: E402
from glinthawk_jax import paged_attention, pallas_paged_attention  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.scheduler import width_bucket  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="decode_attention.json")
  p.add_argument("--small", action="store_true", help="tiny shapes on the CPU, Pallas interpreted")
  p.add_argument("--batches", default="32,128,256")
  p.add_argument("--contexts", default="192,1024")
  p.add_argument("--iters", type=int, default=50)
  return p.parse_args(argv)


def run_case(batch, context, heads, kv_heads, head_dim, page_size, dtype, iters, interpret, rng):
  width = width_bucket(-(-context // page_size), 1 << 12)
  num_pages = max(batch * width + 1, 4096 if not interpret else 0)
  k = jnp.asarray(rng.standard_normal((2, num_pages, page_size, kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.standard_normal((2, num_pages, page_size, kv_heads, head_dim)), dtype)
  q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
  tables = jnp.asarray(rng.permutation(np.arange(1, num_pages))[:batch * width].reshape(batch, width), jnp.int32)
  lens = jnp.full((batch,), context, jnp.int32)
  xla = jax.jit(lambda q, k, v, t, n: paged_attention.paged_decode_attention(q, k, v, 1, t, n))
  pallas = jax.jit(lambda q, k, v, t, n: pallas_paged_attention.paged_decode_attention(
      q, k, v, 1, t, n, interpret=interpret))
  ref = xla(q, k, v, tables, lens).astype(jnp.float32)
  got = pallas(q, k, v, tables, lens).astype(jnp.float32)
  rel_err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  live_bytes = 2 * batch * context * kv_heads * head_dim * jnp.dtype(dtype).itemsize
  row = dict(batch=batch, context=context, width_pages=width, live_kv_mb=live_bytes / 1e6, pallas_rel_err=rel_err)
  # Timed as in the decode step, followed by the o_proj matmul (its time measured alone and subtracted): XLA
  # lays out its attention by what consumes it, and with nothing after it materialises the gathered V as
  # float32, transposed (516 MiB at batch 128, width 16), which it does not do inside the engine.
  o_proj = jnp.asarray(rng.standard_normal((heads * head_dim, heads * head_dim)) * 0.02, dtype)
  proj = jax.jit(lambda x, w: x.reshape(batch, -1) @ w)
  row["o_proj_us"] = seconds_per_call(proj, (q, o_proj), iters) * 1e6
  for name, kernel in (("xla", xla), ("pallas", pallas)):
    fn = jax.jit(lambda q, k, v, t, n, w, kernel=kernel: proj(kernel(q, k, v, t, n), w))
    us = max(seconds_per_call(fn, (q, k, v, tables, lens, o_proj), iters) * 1e6 - row["o_proj_us"], 1e-3)
    row[f"{name}_us"] = us
    row[f"{name}_gbs"] = live_bytes / us / 1e3
  return row


def main(argv=None):
  args = parse_args(argv)
  rng = np.random.default_rng(0)
  if args.small:
    shape = dict(heads=4, kv_heads=2, head_dim=16, page_size=16, dtype=jnp.float32)
    batches, contexts, iters, copy_bytes = [2], [40], 2, 1 << 20
  else:
    shape = dict(heads=32, kv_heads=32, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    iters, copy_bytes = args.iters, 4 << 30
  copy_gbs = copy_bandwidth_gbs(copy_bytes, iters)
  rows = [run_case(b, c, iters=iters, interpret=args.small, rng=rng, **shape) for b in batches for c in contexts]
  device = jax.devices()[0].device_kind
  report = dict(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                shape={k: str(v) for k, v in shape.items()}, copy_gbs=copy_gbs, rows=rows)
  write_json(args.out, report)
  print(f"{device}: copy {copy_gbs:,.0f} GB/s (read + write); GB/s below = live K, V bytes / time")
  print(f"{'batch':>6} {'context':>8} {'width':>6} {'KV MB':>8} {'xla us':>8} {'xla GB/s':>9} "
        f"{'pallas us':>10} {'pallas GB/s':>12} {'rel err':>8}")
  for r in rows:
    print(f"{r['batch']:>6} {r['context']:>8} {r['width_pages']:>6} {r['live_kv_mb']:>8.1f} {r['xla_us']:>8.1f} "
          f"{r['xla_gbs']:>9.0f} {r['pallas_us']:>10.1f} {r['pallas_gbs']:>12.0f} {r['pallas_rel_err']:>8.1e}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
