"""Two-tier throughput against each tier's floor: placements local, callback and pipelined, and
pipelined under injected tier-2 delay. One command, a table last, every number in JSON, a PNG plot.

  python benchmarks/two_tier.py --budget_s 540 --out two_tier.json  # 1-2 GPUs + 16-32 host cores; prints its plan
  python benchmarks/two_tier.py --smoke --out /tmp/t.json  # tiny model on the CPU, about a minute
  python benchmarks/two_tier.py --roundtrip                # CPU: host cost of one layer round trip
  python benchmarks/two_tier.py --local_fraction 0.25 ...  # two-tier runs keep ~1/4 of the KV on tier 1
  python benchmarks/two_tier.py --roundtrip --spawn 4 --in_flight 4 --roundtrip_batch 64  # more fan-out

Tier 2 runs as --spawn servers (default: one per 4 of the host's cores, 2 cores left to tier 1), each
pinned to its share of the cores, where its attention kernel splits a call over those cores: fewer,
larger calls than one server per core (each shard a micro-batch touches costs tier 1 a call).
--spawn_sweep reruns pipelined (first model, first shape) at other server counts to check that choice.

Per model (Llama-2-7B and Llama-3-8B shapes, random weights, bf16 weights and tier-2 KV) it runs three
shapes: `short` (batch 64, prompt 128: tier 1 dominates), `long` (batch 256 at the power-of-two context
whose decode step reads 64 GiB of KV, 512 for Llama-2-7B and 2048 for Llama-3-8B: tier 2 dominates,
Glinthawk's regime; --long_context sets another) and `xlong` (128 GiB a step, 1024 and 4096: more KV than one
accelerator holds beside the weights, so two-tier placements only; its tier-2 pools need about 150 GiB of
host RAM, and a run whose pools exceed --host_ram_gb is skipped). The long batches are rounded down to a
multiple of 2 x --spawn (balanced_batch: 252 on 7 servers) so every server serves the same rows.

Floors, both measured in this run before any server starts:
  tier 1: one decode step reads the weights once: weight bytes / the device's copy bandwidth
          (jitted a + 1 over 1 GiB, read + write bytes / time);
  tier 2: one decode step reads every sequence's KV: KV bytes / the host's attention bandwidth, measured
          with benchmarks/tier2.py's kernel (KVPool.attend in --spawn pinned processes, the model's
          heads and the run's KV dtype, their pools 8 GiB in all: past the cache, as the servers' are).
Each run is one Engine and one generate: prompts are prefilled once, the first decode calls compile (and,
with an auto depth, measure it and compile its shapes; `warm_calls`), the last ones are timed. Pipeline
efficiency = decode tokens/s of the timed calls / (batch / max(tier-1 floor, tier-2 floor)). `pf GB/s`
is the bulk prefill's K, V appended to tier 2 per second (prefill calls that compiled nothing).
--budget_s skips a run whose rough estimate (estimate_s) would end past the budget; the JSON is written
after every run, so a run cut short keeps what finished. tier-1 busy = time in tier-1 steps / timed decode time;
wire B/tok/layer = q, k, v out plus the attention output back, per token and layer; tier-2 GB/s = KV
bytes read by the attention kernels / decode time; t2 busy = the servers' time with a tensor request in
service (their Stats; overlapping requests count once) / (servers x timed decode time), t2 kern = the
time in the KV pool's append and attention over the same (each server's: tier2_busy_by_server and
tier2_kernel_by_server in the JSON); turn ms = mean / max of tier 1's turnarounds, a micro-batch's last
tier-2 reply in to its next q, k, v sent (meanwhile tier 2 serves only the other micro-batches); sprd ms =
a micro-batch's first shard reply read to its last, srv sprd = the servers' first reply sent to their last
(shared memory: the servers stamp their replies), lag ms = a server sending a reply to tier 1 reading it,
rep ms = the last reply's output readied for the next step (padded, put on the device); in the JSON also
server_lateness_ms (per server, how long after a call's first server it sent its reply) and the spreads'
p50 / p90 / p99 (reply_spread_p50_ms, ..., server_spread_p99_ms). The delay
sweep reruns pipelined (short shape, first model, one decode step per call) on servers started with
tier2.inject_delay_ms, at the in-flight depth auto mode's rule gives for the no-delay run's step time and
round trip plus the delay.

Pipelined runs once per --splits value (config.tier2.split): "spread" micro-batches each span every tier-2
shard (tier 2 works on all shards at once; depth from spread_depth), "shards" ones hold one or two shards
each (fewer calls per micro-batch). The sweeps use the first value.
--variants reruns pipelined with config overrides, e.g. "tier2.pin_tier1=False;tier2.in_flight=3"
(an A/B in one call; the table's last column names the variant). --sample_stacks samples tier 1's Python
threads during each pipelined run's timed calls (benchmarks/stack_samples.py) and prints their commonest
stacks (with the sampler's GIL use the run itself runs slower: a profile, not a measurement).

--local_fraction F sets config.local_attention_fraction of every two-tier run (the share of sequences
whose KV and attention stay on tier 1). Floors then split the KV read: tier 1 adds F of it at the
device's copy bandwidth, tier 2 reads the other 1 - F; `local share` is the measured share of admissions.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import gc
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import stack_samples  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.sim import cost_model  # noqa: E402
from glinthawk_jax.sim.measure import wire_dtype  # noqa: E402

PLACEMENTS = ("local", "callback", "pipelined")
GIB = 2**30
LONG_BATCH = 256
LONG_KV_GIB = {"long": 64, "xlong": 128}  # KV a decode step of the shape reads (context: the power of two giving it)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="two_tier.json", help="JSON file of every number (the plot beside it)")
  p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, end to end in about a minute")
  p.add_argument("--models", default=None, help="config modules (default llama2_7b,llama3_8b; smoke: tiny)")
  p.add_argument("--shapes", default="short,long,xlong", help="short (batch 64, prompt 128), long and/or xlong")
  p.add_argument("--placements", default=",".join(PLACEMENTS))
  p.add_argument("--spawn", type=int, default=None,
                 help="tier-2 servers (default (host cores - 2) // 4; smoke and roundtrip: 2)")
  p.add_argument("--spawn_sweep", default="", help="server counts to rerun pipelined at, e.g. 4,8,16,30")
  p.add_argument("--output_len", type=int, default=None,
                 help="timed new tokens per request (default 16, long shape half; smoke 8)")
  p.add_argument("--callback_output_len", type=int, default=2, help="timed tokens of callback (one a call)")
  p.add_argument("--in_flight", type=int, default=0, help="config.tier2.in_flight (0 = auto)")
  p.add_argument("--splits", default="spread,shards",
                 help="config.tier2.split values pipelined runs at (the sweeps use the first)")
  p.add_argument("--variants", default="",
                 help='pipelined runs once per variant: ";" between variants, each "" (the config as is) or '
                 '"key=value,..." config overrides, e.g. "tier2.send_thread=True;tier2.send_thread=False" (an A/B '
                 "in one call; the sweeps use the first)")
  p.add_argument("--delays", default=None, help="ms for the sweep (default 0,5,20,50,100,200; smoke 0,20)")
  p.add_argument("--sweep_output_len", type=int, default=2, help="timed tokens per request in the delay sweep")
  p.add_argument("--decode_steps", type=int, default=4, help="engine.decode_steps_per_call")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="skip a run whose estimate would end it past this many seconds (0 = no limit)")
  p.add_argument("--floor_each_run", action="store_true",
                 help="measure the host attention floor again after every run; a run's efficiency then uses the "
                 "mean of the floors measured right before and right after it (the host's bandwidth drifts)")
  p.add_argument("--sample_stacks", action="store_true",
                 help="sample tier 1's Python threads during the timed pipelined decode calls (every 2 ms): each "
                 "thread's commonest stacks printed and in the JSON (benchmarks/stack_samples.py)")
  p.add_argument("--plan", action="store_true", help="print the runs and their rough estimates, run nothing")
  p.add_argument("--roundtrip", action="store_true",
                 help="only the per-layer round trip of the pipelined path on a small model (CPU)")
  p.add_argument("--roundtrip_batch", type=int, default=32, help="sequences in the --roundtrip run")
  p.add_argument("--append", action="store_true",
                 help="only the bulk prefill's K, V append to tier 2 (CPU): GB/s of the runner's host path")
  p.add_argument("--long_context", type=int, default=0,
                 help="the long shape's context, a power of two >= 64 (default: the one at which a decode step "
                 "reads 64 GiB of KV, 512 for Llama-2-7B, 2048 for Llama-3-8B; before 2026-11-30 v23 Llama-3-8B "
                 "ran at 1024)")
  p.add_argument("--host_ram_gb", type=float, default=0.0,
                 help="most GiB all tier-2 pools of a run may take; a run needing more is skipped "
                 "(default: 70%% of this host's RAM)")
  p.add_argument("--local_fraction", type=float, default=0.0,
                 help="config.local_attention_fraction of the two-tier runs (0 = all KV on tier 2)")
  args = p.parse_args(argv)
  args.models = (args.models or ("tiny" if args.smoke else "llama2_7b,llama3_8b")).split(",")
  args.shapes = [s for s in args.shapes.split(",") if s]
  args.placements = [x for x in args.placements.split(",") if x]
  args.splits = [x for x in args.splits.split(",") if x]
  args.variants = [v.strip() for v in args.variants.split(";")]
  from glinthawk_jax.config import base_config

  for variant in args.variants:
    try:
      apply_variant(base_config(), variant)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
      p.error(f"--variants: {variant!r}: {e}")
  cores = len(os.sched_getaffinity(0))
  args.spawn = args.spawn or (2 if args.smoke or args.roundtrip else max(1, (cores - 2) // 4))
  args.spawn_sweep = [int(n) for n in args.spawn_sweep.split(",") if n]
  if args.long_context and (args.long_context < 64 or args.long_context & (args.long_context - 1)):
    p.error(f"--long_context {args.long_context}: expected a power of two >= 64")
  if args.host_ram_gb < 0:
    p.error(f"--host_ram_gb {args.host_ram_gb}: expected GiB > 0 (0 = 70% of this host's RAM)")
  args.host_ram_gb = args.host_ram_gb or 0.7 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
  args.output_len = args.output_len or (8 if args.smoke else 16)
  delays = args.delays if args.delays is not None else ("0,20" if args.smoke else "0,5,20,50,100,200")
  args.delays = [float(d) for d in delays.split(",") if d]
  return args


def apply_variant(config, variant: str) -> None:
  """Sets a variant's "key=value,..." overrides on config (values as Python literals, else strings);
  ml_collections refuses unknown keys and values of another type."""
  for item in filter(None, (x.strip() for x in variant.split(","))):
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"{item!r}: expected key=value")
    *path, name = key.strip().split(".")
    node = functools.reduce(getattr, path, config)
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()
    if not hasattr(node, name):
      raise KeyError(f"{key.strip()}: no such config key")
    setattr(node, name, value)


def shape(args, name: str, model) -> dict:
  """batch, prompt and timed output lengths of a shape for this model. Long prompts end 32 tokens
  before a power-of-two context, so the whole run (warm-up included) stays in one tier-2 block-table
  bucket: no tier-2 compilation in the timed calls."""
  if args.smoke:
    return {"short": dict(batch=8, prompt=16), "long": dict(batch=32, prompt=48),
            "xlong": dict(batch=32, prompt=96)}[name] | dict(output=args.output_len)
  if name == "short":
    return dict(batch=64, prompt=128, output=args.output_len)
  context = (name == "long" and args.long_context) or long_context(model, LONG_KV_GIB[name])
  return dict(batch=balanced_batch(LONG_BATCH, args.spawn), prompt=context - 32,
              output=max(args.decode_steps, args.output_len // 2))


def balanced_batch(batch: int, servers: int) -> int:
  """`batch` rounded down to a multiple of 2 x servers, so that each of depth 2's micro-batches (the depth
  the long shapes choose) gives every server the same rows: 256 on 7 servers gives two of them 19 rows of
  each 128-row micro-batch against 18, and every layer waits for those two (252: 18 each)."""
  return max(batch // (2 * servers) * 2 * servers, 2 * servers)


def long_context(model, kv_gib: int) -> int:
  """The power-of-two context at which LONG_BATCH sequences hold kv_gib GiB of bfloat16 KV (the same tier-2
  work a step for every model), at most the model's max_position_embeddings."""
  tokens = kv_gib * GIB // (LONG_BATCH * kv_bytes_per_token(model, "bfloat16"))
  return min(1 << (max(tokens, 64).bit_length() - 1), model.max_position_embeddings)


def make_config(args, model_name: str, placement: str, s: dict, timed_tokens: int, delay_ms: float = 0.0,
                in_flight: int | None = None, decode_steps: int | None = None, spawn: int | None = None):
  from glinthawk_jax.config import model_config

  c = importlib.import_module(f"configs.{model_name}").get_config()
  c.dtype = "float32" if args.smoke else "bfloat16"
  c.placement = placement
  c.engine.max_num_seqs = s["batch"]
  c.engine.max_prefill_tokens = 4096 if not args.smoke else 256
  c.engine.decode_steps_per_call = decode_steps or args.decode_steps
  c.engine.kv_cache_gb = 0.0 if not args.smoke else 0.05
  c.tier2.spawn = spawn or args.spawn
  c.tier2.kv_dtype = "float32" if args.smoke else "bfloat16"
  c.tier2.inject_delay_ms = delay_ms
  c.tier2.in_flight = args.in_flight if in_flight is None else in_flight
  c.local_attention_fraction = args.local_fraction if placement != "local" else 0.0
  c.engine.max_model_len = s["prompt"] + total_tokens(c, timed_tokens) + 16
  c.tier2.kv_cache_gb = tier2_pools_gib(c, s["batch"]) / c.tier2.spawn + 0.01
  return c


def tier2_pools_gib(config, batch: int) -> float:
  """GiB of KV pool all tier-2 servers of a run need: every slot at full length, + 15% for partial pages."""
  from glinthawk_jax.config import model_config

  kv = kv_bytes_per_token(model_config(config), config.tier2.kv_dtype)
  return batch * config.engine.max_model_len * kv * 1.15 / GIB


def total_tokens(config, timed_tokens: int) -> int:
  """New tokens per request of a run: its warm-up calls' and its timed calls' (whole calls)."""
  steps = config.engine.decode_steps_per_call
  return (warm_calls(config) + -(-timed_tokens // steps)) * steps


def sweep_depth(base_row: dict | None, delay_ms: float) -> int:
  """tier2.in_flight for a delayed run: the rule of its split's auto mode (spread_depth or auto_depth) on
  the no-delay run's tier-1 step and round trip + delay (spread_depth without its tier-2 work term, which
  the row does not hold and the delay outweighs); the servers sleep the delay once per tensor call."""
  from glinthawk_jax.placements.pipelined import auto_depth, spread_depth

  if base_row is None:
    return 0
  rule = spread_depth if base_row["split"] == "spread" else auto_depth
  return rule(base_row["tier1_step_ms"] / 1e3, (base_row["mean_rtt_ms"] + delay_ms) / 1e3)


def kv_bytes_per_token(model, kv_dtype: str) -> int:
  """Tier-2 K, V bytes of one token over all layers."""
  return model.num_layers * cost_model.kv_bytes_per_token_layer(model, wire_dtype(kv_dtype).itemsize)


def wire_bytes_per_token_layer(model, dtype: str) -> int:
  """q, k, v out and the attention output back, per token and layer."""
  return sum(cost_model.wire_bytes_per_token_layer(model, wire_dtype(dtype).itemsize))


def host_attention_gb_s(args, model, s: dict, kv_dtype: str, huge_pages: bool) -> float:
  """The tier-2 kernel's KV-read GB/s summed over pinned single-core processes on the cores tier 2 may
  use (host cores - 2; benchmarks/tier2.py), their pools WORKING_SET_BYTES in all (past the cache, as the
  servers' are): the host's best, whatever the server layout."""
  from benchmarks.tier2 import WORKING_SET_BYTES, kernel_rows

  cores = len(os.sched_getaffinity(0))
  procs = min(args.spawn, cores) if args.smoke else max(1, cores - 2)
  context = s["prompt"] + s["output"] // 2
  cfg = {"batch": max(1, min(s["batch"] // procs, 16)), "context": max(16, context // 16 * 16),
         "heads": model.num_heads, "kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
         "page_size": 16, "seconds": 0.3 if args.smoke else 1.0, "copy_bytes": 16 << 20, "kinds": [kv_dtype],
         "huge_pages": huge_pages, "working_set_bytes": 0 if args.smoke else WORKING_SET_BYTES}
  return kernel_rows(cfg, [procs])[0]["gb_per_s"]


def warm_calls(config) -> int:
  """Decode calls before the timed ones: the first compiles; with an auto depth (pipelined, in_flight 0)
  the second measures it and the third compiles the measured depth's micro-batch shapes."""
  return 3 if config.placement == "pipelined" and not config.tier2.in_flight else 1


class _Calls:
  """Wraps runner.decode or runner.prefill: seconds, result, whether it compiled or measured the depth (not
  steady), the pipeline stats of every call, and with `samples` (a StackSamples) its threads' stacks."""

  def __init__(self, runner, name: str, samples=None):
    self.runner, self.fn, self.calls, self.samples = runner, getattr(runner, name), [], samples
    setattr(runner, name, self)

  def __call__(self, *args, **kwargs):
    import numpy as np

    r = self.runner
    if hasattr(r, "stats"):
      r.stats.max_turnaround_s = 0.0  # the longest of this call's
    before = (r.num_compilations, getattr(r, "depth", None), dict(vars(r.stats)) if hasattr(r, "stats") else None)
    servers_before, timings_before = _server_seconds(r), _client_timings(r)
    if self.samples:
      self.samples.start()
    t = time.perf_counter()
    out = self.fn(*args, **kwargs)
    out = None if out is None else np.asarray(out)
    if self.fn.__name__ == "prefill":
      r.wait()  # the device's work, not only its dispatch
    seconds = time.perf_counter() - t
    stacks = self.samples.stop() if self.samples else None
    stats = None if before[2] is None else {k: v if k.startswith("max_") else v - before[2][k]
                                            for k, v in vars(r.stats).items()}
    servers_after = _server_seconds(r)
    if stats is not None and servers_before is not None and \
        len(servers_after["tier2_busy_s"]) == len(servers_before["tier2_busy_s"]):  # no server lost meanwhile
      stats.update({k: v - servers_before[k] for k, v in servers_after.items()})
    if stats is not None and timings_before is not None:
      for name, after in _client_timings(r).items():
        stats.update({f"{name}_s": after.total_s - timings_before[name].total_s,
                      f"num_{name}s": after.count - timings_before[name].count})
    steady = r.num_compilations == before[0] and before[1] != 0  # depth 0: this call measured it
    self.calls.append(dict(seconds=seconds, out=out, steady=steady, stats=stats, stacks=stacks))
    if self.fn.__name__ == "prefill":  # tokens, positions, page_ids, offsets, block_tables, context_lens, ...
      positions, context_lens = np.asarray(args[1]), np.asarray(args[5])
      self.calls[-1]["tokens"] = int(np.maximum(context_lens - positions[:, 0], 0).sum())
    return out


def _client_timings(runner) -> dict | None:
  """The tier-2 client's reply counters so far (Tier2Client.timings, then server_lateness as "lateness0",
  "lateness1", ...), None without a tier-2 client."""
  client = getattr(runner, "client", None)
  if not hasattr(client, "timings"):
    return None
  return client.timings() | {f"lateness{i}": d for i, d in enumerate(client.server_lateness())}


def _spread_percentiles(client, count: int) -> dict:
  """p50 / p90 / p99 ms of the last `count` calls' reply spread and servers' spread (Tier2Client.recent_spreads;
  {} for a client without it, e.g. layer slices'): one slow call in many against every call alike."""
  import numpy as np

  from glinthawk_jax.metrics import percentiles

  if not hasattr(client, "recent_spreads") or count <= 0:
    return {}
  spreads = client.recent_spreads(count) * 1e3
  out = {}
  for column, name in enumerate(("reply_spread", "server_spread")):
    values = spreads[:, column][~np.isnan(spreads[:, column])]
    if values.size:
      out.update({f"{key}_ms": value for key, value in percentiles(values, name).items()})
  return out


def _server_seconds(runner) -> dict | None:
  """Tier-2 servers' busy and kernel seconds, one entry per server (their Stats); None without a tier-2 client."""
  import numpy as np

  client = getattr(runner, "client", None)
  if client is None:
    return None
  rows = client.stats()
  return {"tier2_busy_s": np.array([r["busy_seconds"] for r in rows]),
          "tier2_kernel_s": np.array([r["kernel_seconds"] for r in rows])}


def prefill_rate(calls: list[dict]) -> float:
  """Prompt tokens per second of the prefill calls that compiled nothing (all of them if each did)."""
  steady = [c for c in calls if c["steady"]] or calls
  return sum(c["tokens"] for c in steady) / max(sum(c["seconds"] for c in steady), 1e-9)


def run_one(config, s: dict, timed_tokens: int, variant: str = "", sample_stacks: bool = False) -> dict:
  """One Engine, one generate: warm_calls(config) decode calls (compile; measure the auto depth), then
  the timed calls (timed_tokens / decode_steps_per_call of them). Prompts are prefilled once. With
  sample_stacks (pipelined), the row's "stacks" are tier 1's threads' commonest stacks in the timed calls."""
  import numpy as np

  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams

  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, config.model.vocab_size, s["prompt"]).tolist() for _ in range(s["batch"])]
  steps = config.engine.decode_steps_per_call
  warm, timed = warm_calls(config), -(-timed_tokens // steps)
  start = time.perf_counter()
  sampling = sample_stacks and config.placement == "pipelined"
  with Engine(config) as engine, (stack_samples.StackSamples() if sampling else contextlib.nullcontext()) as samples:
    setup_s = time.perf_counter() - start
    calls, prefills = _Calls(engine.runner, "decode", samples), _Calls(engine.runner, "prefill")
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=(warm + timed) * steps, ignore_eos=True))
    wall = time.perf_counter() - t
    runner = engine.runner
    got = sum(len(o.token_ids) for o in outs)
    if got != s["batch"] * (warm + timed) * steps:
      raise RuntimeError(f"{got} tokens generated, expected {s['batch']} x {(warm + timed) * steps}")
    last = calls.calls[-timed:]
    decode_s = sum(c["seconds"] for c in last)
    local, admitted = engine.stats.num_local_admissions, engine.stats.num_local_admissions + \
        engine.stats.num_tier2_admissions
    two_tier = config.placement != "local"
    row = {"placement": config.placement, "split": config.tier2.split if config.placement == "pipelined" else "",
           "variant": variant, "send_thread": config.tier2.send_thread,
           "delay_ms": config.tier2.inject_delay_ms, "spawn": config.tier2.spawn,
           "batch": s["batch"], "prompt": s["prompt"], "output": timed * steps, "decode_steps": steps,
           "warm_calls": len(calls.calls) - timed, "timed_calls": timed,
           "warm_tokens": sum(len(c["out"]) for c in calls.calls[:-timed]),
           "unsteady_timed_calls": sum(not c["steady"] for c in last),  # compiled or measured the depth
           "setup_s": setup_s, "generate_s": wall, "prefill_s": engine.stats.prefill_time_s,
           "prefill_tok_s": prefill_rate(prefills.calls),
           "decode_s": decode_s, "decode_tok_s": s["batch"] * timed * steps / max(decode_s, 1e-9),
           "local_fraction": config.local_attention_fraction if two_tier else 1.0,
           "local_share": local / max(admitted, 1)}
    if samples:
      row["stacks"] = stack_samples.top([c["stacks"] for c in last])
    if hasattr(runner, "stats"):
      d = {k: (max if k.startswith("max_") else sum)(c["stats"][k] for c in last) for k in last[0]["stats"]
           if all(k in c["stats"] for c in last)}
      row.update(in_flight=runner.depth, tier1_busy_fraction=d["tier1_s"] / max(decode_s, 1e-9),
                 wire_gb_s=d["tier2_bytes"] / max(decode_s, 1e-9) / 1e9,
                 mean_rtt_ms=1e3 * d["rtt_s"] / max(d["num_round_trips"], 1),
                 mean_turnaround_ms=1e3 * d["turnaround_s"] / max(d["num_turnarounds"], 1),
                 max_turnaround_ms=1e3 * d["max_turnaround_s"],
                 tier1_step_ms=1e3 * d["tier1_s"] / max(d["num_steps"], 1),
                 dispatch_ms=1e3 * d["dispatch_s"] / max(d["num_steps"], 1),
                 send_ms=1e3 * d["send_s"] / max(d["num_round_trips"], 1),
                 reply_ms=1e3 * d["reply_s"] / max(d["num_round_trips"], 1))
      if "spread_s" in d:
        mean_ms = lambda name: 1e3 * d[f"{name}_s"] / max(d[f"num_{name}s"], 1)  # noqa: E731
        row.update(reply_spread_ms=mean_ms("spread"), server_spread_ms=mean_ms("server_spread"),
                   reply_lag_ms=mean_ms("lag"),
                   server_lateness_ms=[round(mean_ms(f"lateness{i}"), 3)
                                       for i in range(sum(k.startswith("num_lateness") for k in d))])
        row.update(_spread_percentiles(runner.client, d["num_spreads"]))
      if "tier2_busy_s" in d:  # each server's seconds over the decode time (every timed call kept its servers)
        busy, kernel, span = d["tier2_busy_s"], d["tier2_kernel_s"], max(decode_s, 1e-9)
        row.update(tier2_busy_fraction=busy.mean() / span, tier2_kernel_fraction=kernel.mean() / span,
                   tier2_busy_by_server=(busy / span).round(3).tolist(),
                   tier2_kernel_by_server=(kernel / span).round(3).tolist())
  del engine, runner, calls, prefills
  gc.collect()  # the engine's device buffers go before the next engine allocates its own
  row["total_s"] = time.perf_counter() - start
  return row


def add_floors(row: dict, model, s: dict, floors: dict, dtype: str, kv_dtype: str) -> None:
  """Tier floors (seconds per decode step) and the efficiency against the slower one."""
  context = s["prompt"] + row.get("warm_tokens", 0) + row["output"] / 2  # mean context of the timed calls
  two_tier = row["placement"] != "local"
  local = row["local_fraction"] if two_tier else 0.0  # share of the KV read on tier 1 beside tier 2
  tier1_kv = s["batch"] * context * model.kv_bytes_per_token
  kv_step = (1 - local) * s["batch"] * context * kv_bytes_per_token(model, kv_dtype)
  t1 = (model.param_count() * wire_dtype(dtype).itemsize + local * tier1_kv) / (floors["device_copy_gb_s"] * 1e9)
  t2 = kv_step / (floors["host_attention_gb_s"] * 1e9)
  floor_s = max(t1, t2) if two_tier else t1 + tier1_kv / (floors["device_copy_gb_s"] * 1e9)
  row.update(tier1_floor_ms=1e3 * t1, tier2_floor_ms=1e3 * t2,
             bound="tier 2" if two_tier and t2 > t1 else "tier 1", floor_tok_s=s["batch"] / floor_s,
             efficiency=row["decode_tok_s"] * floor_s / s["batch"])
  if two_tier:
    row["wire_bytes_per_token_layer"] = wire_bytes_per_token_layer(model, dtype)
    row["tier2_kv_gb_s"] = kv_step * row["decode_tok_s"] / s["batch"] / 1e9
    if "prefill_s" in row:  # the bulk prefill's K, V appended to tier 2
      row["prefill_kv_gb_s"] = (1 - local) * row["prefill_tok_s"] * kv_bytes_per_token(model, kv_dtype) / 1e9


def plot(rows: list[dict], path: str) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot", file=sys.stderr)
    return None
  sweep = sorted((r for r in rows if r.get("sweep")), key=lambda r: r["delay_ms"])
  if not sweep:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["delay_ms"] for r in sweep], [r["decode_tok_s"] for r in sweep], "o-")
  for r in sweep:
    ax.annotate(f"depth {r['in_flight']}", (r["delay_ms"], r["decode_tok_s"]), fontsize=8,
                textcoords="offset points", xytext=(4, 4))
  ax.set_xlabel("injected one-way tier-2 delay (ms)")
  ax.set_ylabel("decode tokens/s (pipelined)")
  ax.set_title(f"{sweep[0]['model']}, batch {sweep[0]['batch']}, prompt {sweep[0]['prompt']}")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def roundtrip(args) -> None:
  """Host cost of the pipelined path: a small model (8 layers, batch --roundtrip_batch, context ~96,
  --spawn servers, --in_flight micro-batches, default 2) whose tier-1 steps and tier-2 attention are
  cheap, so decode time per (step, layer) is mostly the round trip's overhead (dispatch,
  device-to-host copy, send, server, reply). Best of 3 runs."""
  from configs import tiny
  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams
  import numpy as np

  batch = args.roundtrip_batch
  c = tiny.get_config()
  c.placement, c.model.num_layers = "pipelined", 8
  c.engine.update(dict(max_num_seqs=batch, page_size=16, max_model_len=160, max_prefill_tokens=max(1024, 64 * batch),
                       decode_steps_per_call=4))
  c.tier2.update(dict(spawn=args.spawn, kv_cache_gb=0.05, in_flight=args.in_flight or 2, split=args.splits[0]))
  apply_variant(c, args.variants[0])
  prompts = [np.random.default_rng(0).integers(3, 500, 64).tolist() for _ in range(batch)]
  runs = []
  with Engine(c) as engine:
    engine.generate(prompts, SamplingParams(max_tokens=9, ignore_eos=True))
    for _ in range(3):
      before, decode_before = dict(vars(engine.runner.stats)), engine.stats.decode_time_s
      engine.generate(prompts, SamplingParams(max_tokens=33, ignore_eos=True))
      d = {k: v - before[k] for k, v in vars(engine.runner.stats).items()}
      per = (engine.stats.decode_time_s - decode_before) / (32 * c.model.num_layers)
      runs.append({"ms_per_layer_round_trip": 1e3 * per, "mean_rtt_ms": 1e3 * d["rtt_s"] / d["num_round_trips"],
                   "tier1_step_ms": 1e3 * d["tier1_s"] / d["num_steps"],
                   "dispatch_ms": 1e3 * d["dispatch_s"] / d["num_steps"],
                   "send_ms": 1e3 * d["send_s"] / d["num_round_trips"],
                   "transports": engine.tier2.client.transports})
  best = min(runs, key=lambda r: r["ms_per_layer_round_trip"])
  print(json.dumps({"batch": batch, "spawn": args.spawn, "in_flight": c.tier2.in_flight, "split": c.tier2.split,
                    "send_thread": c.tier2.send_thread,
                    "roundtrip_best": best,
                    "runs": runs}, indent=1))


def append(args) -> None:
  """The bulk prefill's host path to tier 2 at the Llama-2-7B long shape's sizes, no model (CPU): per layer a
  chunk's K, V (8 prompts of 503 tokens, 32 KV heads x 128, bf16), grouped by shard as the device gather of
  PipelinedRunner._bulk_prefill leaves them, go to --spawn servers with its append_layer, 4 layers sent
  back to back, then all waited for. GB/s of K, V per chunk (the first one warms up) and the share of the
  time the sending thread was busy."""
  import ml_dtypes
  import numpy as np

  from configs import tiny
  from glinthawk_jax.config import model_config
  from glinthawk_jax.placements.pipelined import append_layer
  from glinthawk_jax.tier2_launch import Tier2Servers

  rows, width, prompt, layers = 8, 512, 503, 4
  c = tiny.get_config()
  c.model.update(dict(num_layers=layers, num_heads=32, num_kv_heads=32, head_dim=128))
  c.engine.update(dict(max_model_len=width + 16, page_size=16))
  c.tier2.update(dict(spawn=args.spawn, kv_dtype="bfloat16", kv_cache_gb=0.6))
  kv = np.random.default_rng(0).standard_normal((2, rows * prompt, 32, 128), np.float32).astype(ml_dtypes.bfloat16)
  servers = Tier2Servers(c, model_config(c))
  runs = []
  try:
    for chunk in range(5):
      seqs = np.arange(chunk * rows, (chunk + 1) * rows)
      servers.client.allocate(seqs, width)
      seqs = np.array(sorted(seqs, key=servers.client.shard_of))
      ids, pos = np.repeat(seqs, prompt), np.tile(np.arange(prompt), rows)
      t, busy, sent = time.perf_counter(), 0.0, []
      for layer in range(layers):
        t0 = time.perf_counter()
        sent.append(append_layer(servers.client, layer, ids, pos, kv, 30.0))
        busy += time.perf_counter() - t0
      for future in sent:
        future.result()
      seconds = time.perf_counter() - t
      runs.append({"kv_gb_s": kv.nbytes * layers / seconds / 1e9, "sender_busy": busy / seconds})
      servers.client.release(seqs)
  finally:
    servers.close()
  print(json.dumps({"spawn": args.spawn, "best_kv_gb_s": max(r["kv_gb_s"] for r in runs[1:]), "chunks": runs},
                   indent=1))


# Rough seconds for the --budget_s guard and the printed plan (GPU machine; smoke: CPU): an Engine with its
# servers (build, compile), the bulk prefill's K, V append to tier 2, decode at a guessed share of the floor.
SETUP_S = {"smoke": 8.0, "gpu": 30.0}
PREFILL_KV_GB_S = 3.0  # measured rows of the same model and shape replace this guess
DECODE_SHARE = {"local": 0.5, "callback": 0.005, "pipelined": 0.3}
FLOORS_S = 15.0  # measuring the host's attention bandwidth, per model and shape
GUESSED_BASE_ROW = {"tier1_step_ms": 3.0, "mean_rtt_ms": 5.0, "split": "spread"}  # for the delay sweep's depth in the plan


def plan(args) -> list[tuple]:
  """(model, shape, placement, delay ms, spawn, split, variant) of every run, in the order they run: per
  model its shapes' placements (pipelined at each of --splits x --variants), then (first model, first
  shape, first split and variant) the spawn sweep and the delay sweep, before the next model. Callback runs
  only the short shape (a long one would take many minutes); local not the xlong one (its KV does not fit
  one accelerator)."""
  runs, first_variant = [], (args.splits[0], args.variants[0])
  pipelined = [(x, v) for x in args.splits for v in args.variants]
  for i, model_name in enumerate(args.models):
    for shape_name in args.shapes:
      for p in args.placements:
        if not ((p == "callback" and shape_name != "short") or (p == "local" and shape_name == "xlong")):
          runs += [(model_name, shape_name, p, 0.0, None, *v) for v in (pipelined if p == "pipelined" else [first_variant])]
    if i == 0 and args.shapes and "pipelined" in args.placements:
      first = args.shapes[0]
      runs += [(model_name, first, "pipelined", 0.0, n, *first_variant) for n in args.spawn_sweep if n != args.spawn]
      runs += [(model_name, first, "pipelined", d, None, *first_variant) for d in args.delays if d > 0]
  return runs


def run_settings(args, s: dict, placement: str, delay: float, base_row: dict | None) -> tuple:
  """(timed tokens, in-flight depth or None, decode steps per call or None) of a run. Under delay the depth is
  the one auto mode would choose (sweep_depth) from the no-delay run's tier-1 step and round trip plus the delay
  (measuring it at 200 ms would take minutes), one step a call; callback runs one step a call (slow)."""
  if delay > 0:
    return args.sweep_output_len, sweep_depth(base_row, delay), 1
  if placement == "callback":
    return args.callback_output_len, None, 1
  return s["output"], None, None


def estimate_s(args, model, s: dict, config, timed_tokens: int, floors: dict, measured: list[dict]) -> float:
  """Rough wall seconds of one run (setup, prefill, warm and timed decode calls)."""
  setup = SETUP_S["smoke" if args.smoke else "gpu"]
  placement, delay = config.placement, config.tier2.inject_delay_ms
  prompt_kv = s["batch"] * s["prompt"] * kv_bytes_per_token(model, config.tier2.kv_dtype)
  same = [r for r in measured if r["batch"] == s["batch"] and r["prompt"] == s["prompt"]
          and r["placement"] == placement and r.get("prefill_kv_gb_s")]
  prefill = 0.0 if placement == "local" else prompt_kv / 1e9 / (same[-1]["prefill_kv_gb_s"] if same else PREFILL_KV_GB_S)
  floor_row = {"placement": placement, "local_fraction": config.local_attention_fraction, "output": timed_tokens,
               "decode_tok_s": 1.0}
  add_floors(floor_row, model, s, floors, config.dtype, config.tier2.kv_dtype)
  step_s = s["batch"] / floor_row["floor_tok_s"] / DECODE_SHARE[placement]
  if delay > 0:
    step_s = max(step_s, (model.num_layers + 1) * (delay / 1e3 + 0.005))  # every layer waits the delay
  return setup + prefill + total_tokens(config, timed_tokens) * step_s


def main(argv=None):
  args = parse_args(argv)
  if args.roundtrip:
    return roundtrip(args)
  if args.append:
    return append(args)
  if args.smoke:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from glinthawk_jax.config import model_config

  started = time.perf_counter()
  results = {"device": f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
             "host_cores": len(os.sched_getaffinity(0)), "date": datetime.datetime.now().isoformat(),
             "command": " ".join([sys.executable] + sys.argv), "args": vars(args), "floors": {}, "runs": [],
             "errors": [], "skipped": []}
  from benchmarks.device_ceilings import copy_bandwidth_gbs

  copy_gb_s = 3000.0 if args.plan else copy_bandwidth_gbs(64 << 20 if args.smoke else 4 << 30)
  models = {m: model_config(importlib.import_module(f"configs.{m}").get_config()) for m in args.models}
  runs = plan(args)
  guess = {"device_copy_gb_s": copy_gb_s, "host_attention_gb_s": 30.0 if args.smoke else 160.0}
  total = 0.0
  for m, sh, p, d, n, x, t in runs:
    config, timed = _config(args, m, sh, p, d, n, x, t, models[m], GUESSED_BASE_ROW)
    total += estimate_s(args, models[m], shape(args, sh, models[m]), config, timed, guess, [])
    if args.plan:
      print(f"  {m}/{sh} {p}{_label(p, x, t)} delay {d:.0f} ms: {timed} timed tokens, {total_tokens(config, timed)} in all, "
            f"depth {config.tier2.in_flight or 'auto'}; ends near {total:.0f} s")
  total += FLOORS_S * (len({(m, sh) for m, sh, *_ in runs}) + (len(runs) if args.floor_each_run else 0))
  print(f"{len(runs)} runs, about {total:.0f} s with the floors' measurement (rough estimate, floors guessed)"
        + (f"; budget {args.budget_s:.0f} s" if args.budget_s else ""), flush=True)
  if args.plan:
    return
  base_rows: dict[str, dict] = {}
  for model_name, shape_name, placement, delay, spawn, split, variant in runs:
    model, key = models[model_name], f"{model_name}/{shape_name}"
    s = shape(args, shape_name, model)
    config, timed = _config(args, model_name, shape_name, placement, delay, spawn, split, variant, model,
                            base_rows.get(key))
    label = (f"{key} {placement}{_label(placement, split, variant)} delay {delay:.0f} ms, "
             f"{config.tier2.spawn} servers, depth {config.tier2.in_flight or 'auto'}")
    estimate = estimate_s(args, model, s, config, timed, results["floors"].get(key, guess), results["runs"])
    elapsed = time.perf_counter() - started
    floors_s = (0 if key in results["floors"] else FLOORS_S) + (FLOORS_S if args.floor_each_run else 0)
    skip = ""
    pools_gib = tier2_pools_gib(config, s["batch"]) if placement != "local" else 0.0
    if pools_gib > args.host_ram_gb:
      skip = f"{label}: its tier-2 pools need {pools_gib:.0f} GiB, --host_ram_gb {args.host_ram_gb:.0f}"
    elif args.budget_s and elapsed + estimate + floors_s > args.budget_s:
      skip = f"{label}: estimated {estimate:.0f} s, {args.budget_s - elapsed:.0f} s left"
    if skip:
      results["skipped"].append(skip)
      print(f"  SKIPPED {skip}", flush=True)
      continue
    if key not in results["floors"]:
      results["floors"][key] = {"device_copy_gb_s": copy_gb_s,
                                "host_attention_gb_s": host_attention_gb_s(args, model, s, config.tier2.kv_dtype,
                                                                           config.tier2.huge_pages)}
      print(f"{key}: device copy {copy_gb_s:.0f} GB/s, host attention "
            f"{results['floors'][key]['host_attention_gb_s']:.1f} GB/s", flush=True)
    try:
      row = {"model": model_name, "shape": shape_name, **run_one(config, s, timed, variant, args.sample_stacks)}
    except Exception as e:  # noqa: BLE001 (one failed run must not lose the others' numbers)
      if args.smoke:
        raise
      results["errors"].append(f"{label}: {type(e).__name__}: {e}")
      print(f"  FAILED {results['errors'][-1]}", flush=True)
      continue
    row["estimate_s"] = estimate
    first_variant = (split, variant) == (args.splits[0], args.variants[0])
    row["sweep"] = placement == "pipelined" and spawn is None and first_variant and \
        model_name == args.models[0] and shape_name == args.shapes[0]
    if placement == "pipelined" and delay == 0 and spawn is None and first_variant:
      base_rows[key] = row
    floors = results["floors"][key]
    if args.floor_each_run:
      after = host_attention_gb_s(args, model, s, config.tier2.kv_dtype, config.tier2.huge_pages)
      before = floors.get("latest_host_attention_gb_s", floors["host_attention_gb_s"])
      row.update(floor_before_gb_s=before, floor_after_gb_s=after)
      floors = dict(floors, host_attention_gb_s=(before + after) / 2)
      results["floors"][key]["latest_host_attention_gb_s"] = after  # the next run's "before"
    add_floors(row, model, s, floors, config.dtype, config.tier2.kv_dtype)
    row["host_attention_gb_s"] = floors["host_attention_gb_s"]
    results["runs"].append(row)
    save(results, args.out, started)
    print(f"  {label}: {row['decode_tok_s']:.1f} decode tok/s, efficiency {row['efficiency']:.3f}, "
          f"{row['total_s']:.0f} s (estimated {estimate:.0f}; {time.perf_counter() - started:.0f} s so far)", flush=True)
    if "stacks" in row:
      stack_samples.print_top(row["stacks"])
  results["plot"] = plot(results["runs"], os.path.splitext(args.out)[0] + "_delay.png")
  save(results, args.out, started)
  print_table(results)
  print(f"wrote {args.out}" + (f" and {results['plot']}" if results["plot"] else ""))


def _config(args, model_name: str, shape_name: str, placement: str, delay: float, spawn, split: str,
            variant: str, model, base_row):
  """(config, timed tokens) of one planned run."""
  s = shape(args, shape_name, model)
  timed, depth, steps = run_settings(args, s, placement, delay, base_row)
  config = make_config(args, model_name, placement, s, timed, delay, depth, steps, spawn)
  config.tier2.split = split
  if placement == "pipelined":
    apply_variant(config, variant)
  return config, timed


def _label(placement: str, split: str, variant: str) -> str:
  """A pipelined run's split and variant, for the progress lines."""
  return f" ({split}{f', {variant}' if variant else ''})" if placement == "pipelined" else ""


def save(results: dict, path: str, started: float) -> None:
  """Writes the JSON (after every run, so a later failure keeps what ran)."""
  results["elapsed_s"] = time.perf_counter() - started
  write_json(path, results)


def _turnaround(row: dict) -> str:
  """"mean / max" ms of tier 1's turnarounds (last reply in to the next q, k, v sent), "" without them."""
  if "mean_turnaround_ms" not in row:
    return ""
  return f"{row['mean_turnaround_ms']:.1f} / {row['max_turnaround_ms']:.0f}"


def print_table(results: dict) -> None:
  print(f"\nTwo-tier generation on {results['device']}, {results['host_cores']} host cores, "
        f"{results['args']['spawn']} tier-2 processes (srv: this row's), {results['elapsed_s']:.0f} s")
  head = (f"{'model':>10} {'shape':>5} {'batch':>5} {'ctx':>5} {'placement':>9} {'split':>6} {'delay':>5} {'srv':>3} "
          f"{'pf s':>6} {'dec tok/s':>9} {'local':>5} {'depth':>5} {'t1 busy':>7} {'step ms':>7} {'disp ms':>7} "
          f"{'send ms':>7} {'rtt ms':>6} {'turn ms':>11} {'sprd ms':>7} {'srv sprd':>8} {'lag ms':>6} {'rep ms':>6} {'t2 busy':>7} {'t2 kern':>7} {'t2 KV GB/s':>10} {'wire B':>7} {'t1 fl ms':>8} {'t2 fl ms':>8} "
          f"{'bound':>6} {'eff':>6} {'pf GB/s':>7} {'run s':>5} variant")
  print(head)
  for r in results["runs"]:
    f = lambda k, spec: format(r[k], spec) if k in r else ""  # noqa: E731
    print(f"{r['model']:>10} {r['shape']:>5} {r['batch']:>5} {r['prompt'] + r['output']:>5} {r['placement']:>9} {r.get('split', ''):>6} "
          f"{r['delay_ms']:>5.0f} {r['spawn']:>3} {r['prefill_s']:>6.1f} {r['decode_tok_s']:>9.1f} "
          f"{r['local_share']:>5.2f} "
          f"{f('in_flight', 'd'):>5} {f('tier1_busy_fraction', '.2f'):>7} {f('tier1_step_ms', '.2f'):>7} "
          f"{f('dispatch_ms', '.2f'):>7} {f('send_ms', '.2f'):>7} {f('mean_rtt_ms', '.2f'):>6} "
          f"{_turnaround(r):>11} {f('reply_spread_ms', '.2f'):>7} {f('server_spread_ms', '.2f'):>8} {f('reply_lag_ms', '.2f'):>6} {f('reply_ms', '.2f'):>6} "
          f"{f('tier2_busy_fraction', '.2f'):>7} {f('tier2_kernel_fraction', '.2f'):>7} "
          f"{f('tier2_kv_gb_s', '.2f'):>10} "
          f"{f('wire_bytes_per_token_layer', 'd'):>7} {r['tier1_floor_ms']:>8.2f} {r['tier2_floor_ms']:>8.2f} "
          f"{r['bound']:>6} {r['efficiency']:>6.3f} {f('prefill_kv_gb_s', '.2f'):>7} {r['total_s']:>5.0f} {r.get('variant', '')}")
  for error in results["errors"]:
    print(f"FAILED: {error}")
  for skipped in results["skipped"]:
    print(f"SKIPPED (budget): {skipped}")


if __name__ == "__main__":
  main()
