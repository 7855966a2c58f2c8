"""Two-tier throughput: placements local, callback and pipelined, and pipelined under injected tier-2 delay.

Llama-2-7B and Llama-3-8B shapes, random weights, bf16, one GPU for tier 1 and --spawn tier-2 server
processes sharing this host's cores (config.tier2.cpus = auto). Each (model, placement) runs the batch
twice, the first run compiling; the second is timed. For pipelined it reports tier 1's busy fraction
(time in tier-1 steps / wall), tier-2 traffic in GB/s (q, k, v out, attention back) and the pipeline
efficiency (tier-1 step time / (step time + time tier 1 waited for tier 2)). The delay sweep reruns
pipelined on servers started with config.tier2.inject_delay_ms, at the in-flight depth the run chose,
for the first model only and with --sweep_output_len tokens (each token costs layers x delay / depth).

  python benchmarks/two_tier.py --out two_tier.json                # H100 + 16 cores, about 4 minutes
  python benchmarks/two_tier.py --small --out /tmp/two_tier.json   # CPU smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PLACEMENTS = ("local", "callback", "pipelined")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="two_tier.json", help="JSON file of every number")
  p.add_argument("--small", action="store_true", help="tiny model, CPU, seconds (smoke test)")
  p.add_argument("--models", default=None, help="config modules (default llama2_7b,llama3_8b; small: tiny)")
  p.add_argument("--placements", default=",".join(PLACEMENTS))
  p.add_argument("--batch", type=int, default=None, help="prompts = decode slots (default 64; small: 8)")
  p.add_argument("--prompt_len", type=int, default=None, help="default 128 (small: 16)")
  p.add_argument("--output_len", type=int, default=None, help="default 32 (small: 8)")
  p.add_argument("--spawn", type=int, default=None, help="tier-2 servers (default 4; small: 2)")
  p.add_argument("--kv_cache_gb", type=float, default=None, help="KV pool per server (default 4; small 0.01)")
  p.add_argument("--in_flight", type=int, default=0, help="config.tier2.in_flight (0 = auto)")
  p.add_argument("--delays", default=None, help="ms for the sweep (default 0,5,20,50,100,200; small: 0,5)")
  p.add_argument("--decode_steps", type=int, default=4, help="engine.decode_steps_per_call")
  p.add_argument("--sweep_output_len", type=int, default=4, help="new tokens per request in the delay sweep")
  args = p.parse_args(argv)
  args.models = (args.models or ("tiny" if args.small else "llama2_7b,llama3_8b")).split(",")
  args.placements = [x for x in args.placements.split(",") if x]
  args.batch = args.batch or (8 if args.small else 64)
  args.prompt_len = args.prompt_len or (16 if args.small else 128)
  args.output_len = args.output_len or (8 if args.small else 32)
  args.spawn = args.spawn or (2 if args.small else 4)
  args.kv_cache_gb = args.kv_cache_gb or (0.01 if args.small else 4.0)
  delays = args.delays if args.delays is not None else ("0,5" if args.small else "0,5,20,50,100,200")
  args.delays = [float(d) for d in delays.split(",") if d]
  return args


def make_config(args, model: str, placement: str, delay_ms: float = 0.0, in_flight: int | None = None):
  import importlib

  c = importlib.import_module(f"configs.{model}").get_config()
  c.dtype = "float32" if args.small else "bfloat16"
  c.placement = placement
  c.engine.max_num_seqs = args.batch
  c.engine.max_model_len = args.prompt_len + args.output_len + 8
  c.engine.max_prefill_tokens = max(args.prompt_len, 16) * min(args.batch, 16)
  c.engine.decode_steps_per_call = args.decode_steps
  c.engine.kv_cache_gb = 0.0 if not args.small else 0.01
  c.tier2.spawn = args.spawn
  c.tier2.kv_dtype = "float32" if args.small else "bfloat16"
  c.tier2.kv_cache_gb = args.kv_cache_gb
  c.tier2.inject_delay_ms = delay_ms
  c.tier2.in_flight = args.in_flight if in_flight is None else in_flight
  return c


def run_one(args, config, output_len: int) -> dict:
  """Builds the engine, runs the batch twice (compile, then timed); returns the timed run's numbers."""
  import numpy as np

  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams

  rng = np.random.default_rng(0)
  vocab = config.model.vocab_size
  prompts = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.batch)]
  params = SamplingParams(max_tokens=output_len, ignore_eos=True)
  warm = SamplingParams(max_tokens=min(2, output_len), ignore_eos=True)  # one decode call: same shapes
  with Engine(config) as engine:
    runner = engine.runner
    engine.generate(prompts, warm)
    for _ in range(2):  # an auto depth is measured on a compiled run; then its own shapes compile
      depth = getattr(runner, "depth", None)
      if depth is None or config.tier2.in_flight:
        break
      engine.generate(prompts, warm)
    before = dict(vars(runner.stats)) if hasattr(runner, "stats") else None
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    row = {"placement": config.placement, "delay_ms": config.tier2.inject_delay_ms,
           "output_tok_s": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall}
    if before is not None:
      s = {k: v - before[k] for k, v in vars(runner.stats).items()}
      row.update(in_flight=runner.depth, tier1_busy_fraction=s["tier1_s"] / wall,
                 tier2_gb_s=s["tier2_bytes"] / wall / 1e9,
                 pipeline_efficiency=s["tier1_s"] / max(s["tier1_s"] + s["wait_s"], 1e-9),
                 mean_rtt_ms=1e3 * s["rtt_s"] / max(s["num_round_trips"], 1))
  gc.collect()
  return row


def main(argv=None):
  args = parse_args(argv)
  import jax

  results = {"device": str(jax.devices()[0].device_kind), "date": datetime.datetime.now().isoformat(),
             "command": " ".join([sys.executable] + sys.argv), "args": vars(args), "runs": []}
  print(f"{'model':>10} {'placement':>10} {'delay ms':>8} {'tok/s':>9} {'depth':>5} {'t1 busy':>7} "
        f"{'t2 GB/s':>7} {'pipe eff':>8}")
  for model in args.models:
    depth = None
    runs = [(p, 0.0) for p in args.placements]
    if model == args.models[0] and "pipelined" in args.placements:
      runs += [("pipelined", d) for d in args.delays if d > 0]
    for placement, delay in runs:
      config = make_config(args, model, placement, delay, depth if delay > 0 else None)
      row = {"model": model, **run_one(args, config, args.sweep_output_len if delay > 0 else args.output_len)}
      if placement == "pipelined" and delay == 0:
        depth = row["in_flight"]  # the sweep keeps the depth chosen without delay
      results["runs"].append(row)
      print(f"{model:>10} {placement:>10} {delay:>8.0f} {row['output_tok_s']:>9.1f} "
            f"{row.get('in_flight', ''):>5} {row.get('tier1_busy_fraction', float('nan')):>7.2f} "
            f"{row.get('tier2_gb_s', float('nan')):>7.3f} {row.get('pipeline_efficiency', float('nan')):>8.2f}",
            flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
