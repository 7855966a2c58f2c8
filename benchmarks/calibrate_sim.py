"""Calibration: measured pipelined two-tier runs vs the simulator driven by a profile of this machine.

One command: (a) profiles this machine for the config (glinthawk_jax/sim/measure.py, as
launch/profile.py's measured mode: tier-1 step by micro-batch rows split into dispatch, compute and
device-to-host copy; tier-2 RPC send, round trip and service by rows and context on real tier-2
servers, spread over the shards and with all of a micro-batch's rows on one shard; bulk prefill
steps split into dispatch, compute, copy and gather, and appends at the prefill chunk's shape;
control RPCs; the CPU tier 1 and the servers use per round trip and the cores free) and writes the
profile JSON; (b) runs real
generation with placement pipelined through the Engine for each shape (batch, prompt, output,
in-flight depth, injected tier-2 delay), configs as benchmarks/two_tier.py builds them; (c) predicts
each run from the profile alone (glinthawk_jax/sim/generation.py: the two-tier event model per fused
decode call, prefill chunks, control RPCs); (d) prints measured vs simulated tokens/s with the error
and writes JSON. Tier-2 servers are spawned once per injected delay and shared by the runs.

  python benchmarks/calibrate_sim.py                         # CPU, tiny model, about 2 minutes
  python benchmarks/calibrate_sim.py --num_layers=8          # CPU, tiny widths with 8 layers
  python benchmarks/calibrate_sim.py --config=configs/llama2_7b.py --out=calibrate_7b.json  # GPU
  python benchmarks/calibrate_sim.py --replay=calibrate_7b.json --profile=out/calibrate_profile.json
      # no runs: (c) and (d) again from a saved profile and saved measured runs (after a model change)
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

from glinthawk_jax.json_file import write_json  # noqa: E402

TINY_SHAPES = "8:16:32:1:0,8:16:32:2:0,16:16:32:4:0,16:32:32:2:0,8:16:16:2:5"
LARGE_SHAPES = "64:128:16:2:0,64:128:16:4:0,32:128:16:2:0,64:128:8:4:20"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.py", help="config file under configs/")
  p.add_argument("--shapes", default=None, help="BATCH:PROMPT:OUTPUT:IN_FLIGHT:DELAY_MS,... (default by "
                 f"config: tiny {TINY_SHAPES}; others {LARGE_SHAPES})")
  p.add_argument("--num_layers", type=int, default=0, help="override the model's layer count (0 = keep)")
  p.add_argument("--spawn", type=int, default=None, help="tier-2 servers (default 2 tiny, 4 otherwise)")
  p.add_argument("--kv_cache_gb", type=float, default=None, help="KV pool per server (0.05 tiny, 4 otherwise)")
  p.add_argument("--decode_steps", type=int, default=4, help="engine.decode_steps_per_call")
  p.add_argument("--split", default="spread", choices=("spread", "shards"),
                 help="config.tier2.split of the measured runs, and of their predictions")
  p.add_argument("--reps", type=int, default=9, help="repetitions of each profiled timing (median, after "
                 "untimed warm-up calls)")
  p.add_argument("--repeats", type=int, default=None, help="timed runs of each shape and of each profile "
                 "runner run (median; default 3 tiny, 1 otherwise)")
  p.add_argument("--profile_output_len", type=int, default=16,
                 help="new tokens of the profile's depth-1 runner runs (one per micro-batch size)")
  p.add_argument("--full_roofline", action="store_true", help="the profile's full roofline sweeps (batch to "
                 "512, prefill to 8192 tokens; not needed for the calibration)")
  p.add_argument("--tolerance", type=float, default=0.15, help="relative error that counts as a match")
  p.add_argument("--profile_out", default="out/calibrate_profile.json", help="the measured profile")
  p.add_argument("--out", default="out/calibrate_sim.json", help="JSON of every number")
  p.add_argument("--replay", default="", help="a JSON this script wrote: predict its measured runs again "
                 "from --profile, nothing run (the shapes and run settings come from that JSON)")
  p.add_argument("--profile", default="", help="with --replay: the measured profile JSON (default: the "
                 "one named in the --replay JSON)")
  args = p.parse_args(argv)
  if args.profile and not args.replay:
    p.error("--profile: only with --replay (a measuring run writes --profile_out)")
  args.model = os.path.splitext(os.path.basename(args.config))[0]
  args.small = args.model == "tiny"
  spec = args.shapes or (TINY_SHAPES if args.small else LARGE_SHAPES)
  try:
    args.shapes = [tuple(float(x) if i == 4 else int(x) for i, x in enumerate(s.split(":")))
                   for s in spec.split(",") if s]
    if any(len(s) != 5 for s in args.shapes):
      raise ValueError
  except ValueError:
    p.error(f"--shapes={spec!r}: expected BATCH:PROMPT:OUTPUT:IN_FLIGHT:DELAY_MS,...")
  args.spawn = args.spawn or (2 if args.small else 4)
  args.repeats = args.repeats or (3 if args.small else 1)
  args.kv_cache_gb = args.kv_cache_gb or (0.05 if args.small else 4.0)
  return args


def base_config(args):
  """Everything the runs share (servers are spawned from it): benchmarks/two_tier.py's config with
  room for the largest shape."""
  from benchmarks.two_tier import make_config

  shapes = args.shapes
  ns = argparse.Namespace(smoke=args.small, decode_steps=args.decode_steps, spawn=args.spawn, in_flight=1,
                          host_ram_gb=args.kv_cache_gb * args.spawn, local_fraction=0.0)
  largest = dict(batch=max(s[0] for s in shapes), prompt=max(s[1] for s in shapes), output=max(s[2] for s in shapes))
  c = make_config(ns, args.model, "pipelined", largest, timed_tokens=largest["output"])
  c.tier2.kv_cache_gb = args.kv_cache_gb
  c.tier2.split = args.split
  if args.num_layers:
    c.model.num_layers = args.num_layers
  return c


def run_config(base, shape, addresses):
  """The config of one run: the base with this shape's batch, prefill budget, depth and servers."""
  batch, _, _, in_flight, _ = shape
  c = base.copy_and_resolve_references()
  c.engine.max_num_seqs = batch
  c.engine.max_prefill_tokens = _prefill_budget(shape)
  c.tier2.in_flight = in_flight
  c.tier2.addresses = ",".join(addresses)
  return c


def _prefill_budget(shape) -> int:
  """engine.max_prefill_tokens of a run: the batch's prompts in chunks of at most 16 rows."""
  return max(shape[1], 16) * min(shape[0], 16)


def _run_shape(args, shape):
  """The shape as generation.RunShape, with the run's decode steps, prefill budget and micro-batch split."""
  from glinthawk_jax.sim import generation

  return generation.RunShape(*shape, decode_steps=args.decode_steps, max_prefill_tokens=_prefill_budget(shape),
                             shards=args.spawn, split=args.split)


def measure_run(config, model, shape, repeats: int) -> dict:
  """Runs the batch once to compile, then `repeats` timed times with placement pipelined; the
  numbers of the timed run with the median throughput."""
  import numpy as np

  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams

  batch, prompt, output, _, _ = shape
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, config.model.vocab_size, prompt).tolist() for _ in range(batch)]
  with Engine(config, model=model) as engine:
    engine.generate(prompts, SamplingParams(max_tokens=min(2, output), ignore_eos=True))
    runs = []
    for _ in range(repeats):
      before = engine.stats_dict()
      start = time.perf_counter()
      outs = engine.generate(prompts, SamplingParams(max_tokens=output, ignore_eos=True))
      wall = time.perf_counter() - start
      s = {k: v - before[k] for k, v in engine.stats_dict().items()}
      runs.append({"output_tok_s": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall,
                   "prefill_s": s["prefill_time_s"], "decode_s": s["decode_time_s"],
                   "decode_calls": s["num_decode_calls"]})
  del engine
  gc.collect()  # frees the runner's per-layer weight copies (its jit closures hold cycles)
  runs.sort(key=lambda r: r["output_tok_s"])
  return {**runs[len(runs) // 2], "all_tok_s": [r["output_tok_s"] for r in runs]}


def main(argv=None):
  args = parse_args(argv)
  if args.replay:
    replay(args)
    return
  import jax

  from glinthawk_jax.config import model_config
  from glinthawk_jax.sim import generation, measure, profiles
  from glinthawk_jax.tier2_launch import Tier2Servers
  from models.llama import init_model

  t0 = time.perf_counter()
  base = base_config(args)
  m = model_config(base)
  delays = sorted({s[4] for s in args.shapes})
  servers = {}
  try:
    for d in delays:
      c = base.copy_and_resolve_references()
      c.tier2.inject_delay_ms = d
      servers[d] = Tier2Servers(c, m)
    # (a) the profile: micro-batch rows and contexts the shapes use, their prefill chunks.
    micro_rows = {s: generation.micro_batches(s[0], s[3])[1] for s in args.shapes}
    rows = sorted(set(micro_rows.values()))
    contexts = sorted({s[1] for s in args.shapes} | {s[1] + s[2] for s in args.shapes})
    prefill = sorted({generation.prefill_chunk(_run_shape(args, s))[1:] for s in args.shapes})
    if delays[0] != 0:
      raise SystemExit("--shapes: at least one shape needs DELAY_MS=0 (the profile is measured without delay)")
    # Rows a shard holds: in the runs' micro-batches (grouped by shard) and in the depth-1 runner runs.
    shard_rows = sorted({n for s in args.shapes for mb in generation.micro_batch_shards(s[0], args.spawn, s[3])
                         for n in mb.values()} | {max(r // args.spawn, 1) for r in rows})
    two_tier = dict(client=servers[0].client, rows=rows, contexts=contexts, prefill=prefill,
                    queue=max(1, -(-8 // m.num_layers)), reps=args.reps, dtype=measure.wire_dtype(base.dtype),
                    shard_rows=shard_rows)
    profile = measure.measured_profile(base, tiny=not args.full_roofline, two_tier=two_tier,
                                       command=" ".join([sys.executable] + sys.argv))
    # The runner's own costs (depth-1 runs, one per micro-batch size), each measured just before
    # the runs that use it: on a shared machine speed drifts over minutes. (b) the real runs.
    model = init_model(m, seed=0)
    profile_config = base.copy_and_resolve_references()
    profile_config.tier2.addresses = ",".join(servers[0].addresses)
    runner, real = [], {}
    for r in rows:
      runner += measure.runner_overheads(profile_config, model, [r], min(s[1] for s in args.shapes),
                                         args.profile_output_len, args.repeats, server_pids=servers[0].pids)
      for shape in (s for s in args.shapes if micro_rows[s] == r):
        real[shape] = measure_run(run_config(base, shape, servers[shape[4]].addresses), model, shape, args.repeats)
        print(f"run {shape}: measured {real[shape]['output_tok_s']:.1f} tok/s", flush=True)
    profile.measurements["two_tier"]["runner"] = runner
    profiles.save(profile, args.profile_out)
    measure.print_tables(profile.measurements)
    print(f"wrote {args.profile_out}", flush=True)
  finally:
    for s in servers.values():
      s.close()
  # (c) predictions from the profile just written (loaded back, as a user would), (d) the table.
  meas = profiles.load(args.profile_out).measurements["two_tier"]
  report(compare(meas, m.num_layers, args, real), args, str(jax.devices()[0].device_kind), m.num_layers,
         time.perf_counter() - t0)


def compare(meas: dict, num_layers: int, args, real: dict) -> list[dict]:
  """Each measured run beside its prediction from the profile's two-tier tables `meas`."""
  from glinthawk_jax.sim import generation

  rows = []
  for shape in args.shapes:
    sim = generation.predict(meas, num_layers, _run_shape(args, shape))
    error = sim["output_tok_s"] / real[shape]["output_tok_s"] - 1
    rows.append({"shape": dict(zip(("batch", "prompt_len", "output_len", "in_flight", "delay_ms"), shape)),
                 "measured": real[shape], "simulated": sim, "error": error})
  return rows


def report(rows_out: list[dict], args, device: str, num_layers: int, seconds: float, **extra) -> None:
  """Prints measured vs simulated (the table last) and writes the JSON."""
  import numpy as np

  errors = np.abs([r["error"] for r in rows_out])
  results = {"device": device, "date": datetime.datetime.now().isoformat(),
             "command": " ".join([sys.executable] + sys.argv), "args": dict(vars(args)),
             "profile": args.profile or args.profile_out, "num_layers": num_layers, "runs": rows_out,
             "max_abs_error": float(errors.max()), "mean_abs_error": float(errors.mean()),
             "within_tolerance": bool((errors <= args.tolerance).all()), "seconds": seconds, **extra}
  print(f"\n{num_layers}-layer {args.model} on {device}, decode_steps_per_call={args.decode_steps}, "
        f"{args.spawn} tier-2 servers")
  print(f"{'batch':>5} {'prompt':>6} {'output':>6} {'depth':>5} {'delay':>5} | {'measured':>9} {'simulated':>9} "
        f"{'error':>7} | {'prefill s meas/sim':>18} {'decode s meas/sim':>18}")
  for r in rows_out:
    sh, me, si = r["shape"], r["measured"], r["simulated"]
    print(f"{sh['batch']:>5} {sh['prompt_len']:>6} {sh['output_len']:>6} {sh['in_flight']:>5} {sh['delay_ms']:>5.0f} | "
          f"{me['output_tok_s']:>9.1f} {si['output_tok_s']:>9.1f} {100 * r['error']:>+6.1f}% | "
          f"{me['prefill_s']:>8.3f}/{si['prefill_s']:<9.3f} {me['decode_s']:>8.3f}/{si['decode_s']:<9.3f}")
  print(f"max |error| {100 * results['max_abs_error']:.1f}%, mean {100 * results['mean_abs_error']:.1f}% "
        f"(tolerance {100 * args.tolerance:.0f}%: {'met' if results['within_tolerance'] else 'NOT met'}); "
        f"{results['seconds']:.0f} s")
  write_json(args.out, results)
  print(f"wrote {args.out}")


def replay(args) -> None:
  """Predicts the runs a previous invocation measured (args.replay) from a saved profile, no runs:
  shapes, decode steps, servers and tolerance are that invocation's."""
  from glinthawk_jax.sim import profiles

  with open(args.replay) as f:
    saved = json.load(f)
  for key in ("decode_steps", "spawn", "tolerance", "model"):
    setattr(args, key, saved["args"][key])
  args.split = saved["args"].get("split", "shards")  # runs saved before --split were grouped by shard
  args.profile = args.profile or saved["profile"]
  args.shapes = [tuple(s["shape"][k] for k in ("batch", "prompt_len", "output_len", "in_flight", "delay_ms"))
                 for s in saved["runs"]]
  real = {shape: r["measured"] for shape, r in zip(args.shapes, saved["runs"])}
  meas = profiles.load(args.profile).measurements["two_tier"]
  report(compare(meas, saved["num_layers"], args, real), args, saved["device"], saved["num_layers"], 0.0,
         replay_of={"results": args.replay, "date": saved["date"], "command": saved["command"]})


if __name__ == "__main__":
  main()
