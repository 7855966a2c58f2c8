"""Tier 1's host cost per pipelined step, alone: a middle step's launch, its q, k, v reaching the host, and a
reply's copy to the device, per micro-batch and layer, without tier 2 or other threads competing for the GIL.

Builds the pipelined runner's jitted steps for a model's shapes (random weights, --layers layers, the real
dims) under each tier2.host_copy mode and times, over --iters calls each: the middle step's dispatch as the
runner launches it (the jitted call plus, unless "fused", the host copy's start; it returns before the
device finishes), a whole step back to back (launch, then `np.asarray` of q, k, v's host copy: the critical
path of a micro-batch's turnaround without tier 2), and the device's pace (launches queued, one wait);
then a reply's `device_put` (what a reply thread does before the next step).

  python benchmarks/tier1_dispatch.py --model llama3_8b --rows 128 --out t1.json   # GPU, about a minute
  python benchmarks/tier1_dispatch.py --model tiny --rows 8 --dtype float32 --out /tmp/t1.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from glinthawk_jax.config import TIER2_HOST_COPIES, model_config  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.placements.pipelined import PipelinedRunner  # noqa: E402
from models.llama import init_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3_8b", help="config module under configs/")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--rows", type=int, default=128, help="a micro-batch's rows (one decode token each)")
  p.add_argument("--layers", type=int, default=2, help="layers built, >= 2 (the dims are the model's)")
  p.add_argument("--iters", type=int, default=200)
  p.add_argument("--out", default="tier1_dispatch.json")
  args = p.parse_args(argv)
  if args.layers < 2 or args.rows < 1 or args.iters < 1:
    p.error("--layers must be at least 2 (a middle step spans two), --rows and --iters at least 1")
  return args


def mean_us(fn, iters: int) -> float:
  """Mean microseconds of fn() over iters calls (after one untimed call)."""
  fn()
  t = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t) / iters * 1e6


def measure_mode(model, model_cfg, host_copy: str, rows: int, iters: int) -> dict:
  """One host_copy mode's launch, back-to-back step and device pace, in microseconds."""
  runner = PipelinedRunner(model, client=None, decode_steps=1, in_flight=2, timeout_s=10.0, host_copy=host_copy)
  x = jnp.zeros((rows, 1, model_cfg.hidden_size), model_cfg.dtype)
  positions = jax.device_put(np.full((rows, 1), 100, np.int32))
  attn = jnp.zeros((rows, 1, model_cfg.num_heads, model_cfg.head_dim), model_cfg.dtype)
  layers = runner.layers

  def launch():
    return runner._launch("middle", runner._middle, layers[0], layers[1], x, attn, positions)[1]

  def step():
    return np.asarray(launch()[2])

  row = {"host_copy": host_copy, "launch_us": mean_us(launch, iters), "step_us": mean_us(step, iters)}
  jax.block_until_ready(launch())
  t = time.perf_counter()
  for _ in range(iters):
    out = launch()
  jax.block_until_ready(out)
  row["device_pace_us"] = (time.perf_counter() - t) / iters * 1e6
  row["qkv_bytes"] = int(out[1].size * out[1].dtype.itemsize)
  return row


def main(argv=None):
  args = parse_args(argv)
  config = importlib.import_module(f"configs.{args.model}").get_config()
  config.dtype = args.dtype
  model_cfg = dataclasses.replace(model_config(config), num_layers=args.layers)
  model = init_model(model_cfg)
  rows = [measure_mode(model, model_cfg, mode, args.rows, args.iters) for mode in TIER2_HOST_COPIES]
  reply = np.zeros((args.rows, 1, model_cfg.num_heads, model_cfg.head_dim), model_cfg.dtype)
  reply_us = mean_us(lambda: jax.device_put(reply).block_until_ready(), args.iters)
  results = {"device": jax.devices()[0].device_kind, "date": datetime.datetime.now().isoformat(),
             "command": " ".join([sys.executable] + sys.argv), "args": vars(args), "modes": rows,
             "reply_device_put_us": reply_us, "reply_bytes": int(reply.nbytes)}
  print(f"{args.model} ({args.layers} layers), {args.rows} rows, {rows[0]['qkv_bytes'] / 1e6:.2f} MB q, k, v "
        f"on {results['device']}, us per step:")
  print(f"{'host_copy':>10} {'launch':>8} {'step':>8} {'device pace':>11}")
  for r in rows:
    print(f"{r['host_copy']:>10} {r['launch_us']:8.1f} {r['step_us']:8.1f} {r['device_pace_us']:11.1f}")
  print(f"a reply's device_put ({reply.nbytes / 1e6:.2f} MB, waited): {reply_us:.1f} us")
  write_json(args.out, results)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
