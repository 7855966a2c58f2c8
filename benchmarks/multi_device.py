"""Tier-1 throughput over devices: one device vs tensor parallelism vs layer slices (local placement).

Llama-2-13B shape (configs/llama2_13b.py), random bf16 weights (26 GB: they fit one H200, so one device
is the baseline), prompt 128 / output 128, ignore_eos. Each layout ("TPxSLICES": 1x1 = one device, 2x1 =
tensor_parallel 2, 1x2 = two layer slices) gets one Engine (weights built sharded in place) with
engine.max_num_seqs = the largest batch; each batch size runs twice with the same shapes, the first
compiling, and the second is timed. Layouts needing more devices than present are skipped (and listed).
Layer slices run one after another (no micro-batch overlap), so 1x2 measures the cost of the boundary,
not a speed-up (docs/MULTI_DEVICE.md).

  python benchmarks/multi_device.py --out multi_device.json     # 2 GPUs, about 5 minutes
  python benchmarks/multi_device.py --smoke --out /tmp/md.json  # CPU, 2 forced host devices, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glinthawk_jax.json_file import write_json  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="multi_device.json", help="JSON file of every number")
  p.add_argument("--smoke", action="store_true", help="tiny model on the CPU with 2 forced host devices")
  p.add_argument("--layouts", default="1x1,2x1,1x2", help="TPxSLICES list (engine.tensor_parallel x layer_slices)")
  p.add_argument("--batches", default=None, help="batch sizes (default 32,128; smoke: 4)")
  p.add_argument("--prompt_len", type=int, default=None, help="default 128 (smoke: 16)")
  p.add_argument("--output_len", type=int, default=None, help="default 128 (smoke: 8)")
  p.add_argument("--decode_steps", type=int, default=8, help="engine.decode_steps_per_call (one slice)")
  p.add_argument("--layer_loop", default="unrolled", choices=("scan", "unrolled"), help="engine.layer_loop")
  args = p.parse_args(argv)
  args.layouts = [tuple(int(n) for n in lay.split("x")) for lay in args.layouts.split(",")]
  args.batches = [int(b) for b in (args.batches or ("4" if args.smoke else "32,128")).split(",")]
  args.prompt_len = args.prompt_len or (16 if args.smoke else 128)
  args.output_len = args.output_len or (8 if args.smoke else 128)
  return args


def make_config(args, tp: int, slices: int):
  from configs import llama2_13b, tiny

  c = tiny.get_config() if args.smoke else llama2_13b.get_config()
  c.dtype = "float32" if args.smoke else "bfloat16"
  c.placement = "local"
  c.engine.update(dict(max_num_seqs=max(args.batches), max_model_len=args.prompt_len + args.output_len,
                       max_prefill_tokens=8192, kv_cache_gb=0.0, page_size=16,
                       decode_steps_per_call=args.decode_steps, layer_loop=args.layer_loop,
                       tensor_parallel=tp, layer_slices=slices))
  return c


def run_layout(args, tp: int, slices: int) -> list[dict]:
  import numpy as np

  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams

  start = time.perf_counter()
  engine = Engine(make_config(args, tp, slices))
  build_s = time.perf_counter() - start
  vocab = engine.model_config.vocab_size
  params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
  rng = np.random.default_rng(0)
  rows = []
  for b in args.batches:
    prompts = rng.integers(3, vocab, (b, args.prompt_len)).tolist()
    start = time.perf_counter()
    engine.generate(prompts, params)  # compiles every shape the timed run uses
    first_s = time.perf_counter() - start
    before = engine.stats_dict()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    after = engine.stats_dict()
    tokens = sum(len(o.token_ids) for o in outs)
    steps = (after["num_decode_calls"] - before["num_decode_calls"]) * args.decode_steps
    decode_s = after["decode_time_s"] - before["decode_time_s"]
    rows.append(dict(layout=f"{tp}x{slices}", tensor_parallel=tp, layer_slices=slices, batch=b,
                     elapsed_s=elapsed, output_tokens=tokens, output_tok_s=tokens / elapsed,
                     prefill_s=after["prefill_time_s"] - before["prefill_time_s"], decode_s=decode_s,
                     decode_step_ms=decode_s / max(steps, 1) * 1e3, first_run_s=first_s, build_s=build_s,
                     kv_pool_gib=after["kv_pool_gib"], num_preemptions=after["num_preemptions"]))
    print(f"  {tp}x{slices} batch {b}: {tokens / elapsed:,.0f} tok/s", flush=True)
  del engine
  gc.collect()  # free the weights and the KV pool before the next layout
  return rows


def table(rows) -> str:
  base = {r["batch"]: r["output_tok_s"] for r in rows if r["layout"] == "1x1"}
  lines = [f"{'layout':>7} {'batch':>6} {'tok/s':>10} {'vs 1x1':>7} {'step ms':>8} {'prefill s':>10} "
           f"{'KV GiB':>7} {'preempt':>8}"]
  for r in rows:
    ratio = r["output_tok_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
    lines.append(f"{r['layout']:>7} {r['batch']:>6} {r['output_tok_s']:>10,.0f} {ratio:>7.2f} "
                 f"{r['decode_step_ms']:>8.2f} {r['prefill_s']:>10.2f} {r['kv_pool_gib']:>7.1f} "
                 f"{r['num_preemptions']:>8}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:  # before JAX starts: it reads XLA_FLAGS once
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  import jax

  devices = jax.devices()
  rows, skipped = [], []
  for tp, slices in args.layouts:
    if tp * slices > len(devices):
      skipped.append(f"{tp}x{slices}")
      continue
    rows += run_layout(args, tp, slices)
  report = dict(device=devices[0].device_kind, num_devices=len(devices),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), model="tiny" if args.smoke
                else "llama2_13b", prompt_len=args.prompt_len, output_len=args.output_len,
                decode_steps_per_call=args.decode_steps, layer_loop=args.layer_loop, skipped=skipped, rows=rows)
  write_json(args.out, report)
  print(f"{report['model']} on {len(devices)} x {report['device']}, prompt {args.prompt_len} / output "
        f"{args.output_len}, layer_loop={args.layer_loop}" + (f"; skipped (too few devices): {skipped}"
                                                             if skipped else ""))
  print(table(rows))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
