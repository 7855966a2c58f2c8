"""Offline throughput of the local engine vs HF transformers generate(), and the HBM streaming floor.

Llama-2-7B shape, random weights, bf16, prompt 128 / output 128, ignore_eos, batch = engine.max_num_seqs
= number of prompts. HF runs first in a subprocess (so torch and JAX never share GPU memory); each engine
batch is run twice with the same shapes, the first run compiling. The floor is the time to stream the
weights plus the average KV read of a decode step at the device's copy bandwidth, measured in the same
run: x floor is the measured decode step (the engine waits for prefill before it times decode) over that;
x run floor is the whole run's output tokens/s against the floor of the whole run (every decode step plus
the prefill's matmul FLOPs at the measured bf16 matmul rate).

--width_buckets runs each listed engine.width_buckets_per_octave (block-table width ladder; 2 = the old
2^k and 1.5 * 2^k) as its own row at the batches of --width_batches (the first value at the others), in
one call; a persistent compilation cache lets the variants share the widths they have in common.

  python benchmarks/throughput.py --out throughput.json            # GPU, about 4 minutes
  python benchmarks/throughput.py --batches 32,128,256 --hf_batches 128 --width_buckets 4,2,8 \
      --width_batches 128 --out throughput.json                    # GPU, with the width A/B at 128
  python benchmarks/throughput.py --small --out /tmp/small.json    # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glinthawk_jax.json_file import write_json  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="throughput.json", help="JSON file of every number")
  p.add_argument("--small", action="store_true", help="tiny model, small batches, CPU (smoke test)")
  p.add_argument("--batches", default=None, help="engine batch sizes (default 32,128,256; small: 4,8)")
  p.add_argument("--hf_batches", default=None, help="HF batch sizes, '' to skip (default 32,128; small: 4)")
  p.add_argument("--prompt_len", type=int, default=None, help="default 128 (small: 16)")
  p.add_argument("--output_len", type=int, default=None, help="default 128 (small: 16)")
  p.add_argument("--decode_steps", type=int, default=8, help="engine.decode_steps_per_call")
  p.add_argument("--page_size", type=int, default=16, help="engine.page_size")
  p.add_argument("--layer_loop", default="unrolled", choices=("scan", "unrolled"),
                 help="engine.layer_loop: scan over stacked weights, or unrolled per-layer weights")
  p.add_argument("--decode_attention", default="xla", choices=("xla", "pallas"),
                 help="engine.decode_attention: the decode attention kernel")
  p.add_argument("--width_buckets", default=None,
                 help="engine.width_buckets_per_octave values, one row each (default: the config's)")
  p.add_argument("--width_batches", default=None,
                 help="batches that run every --width_buckets value (default: all; others run the first)")
  p.add_argument("--max_prefill_tokens", type=int, default=16384,
                 help="engine.max_prefill_tokens (16384: batch 128's prompts in one prefill call)")
  p.add_argument("--compile_cache", default=os.path.join(tempfile.gettempdir(), "throughput_jax_cache"),
                 help="persistent compilation cache directory shared by the variants; '' = off")
  p.add_argument("--hbm_tbps", type=float, default=0.0,
                 help="memory bandwidth for the floor; 0 = the device's copy bandwidth measured in this run")
  p.add_argument("--hf_only", action="store_true", help=argparse.SUPPRESS)  # the HF subprocess
  args = p.parse_args(argv)
  args.batches = [int(b) for b in (args.batches or ("4,8" if args.small else "32,128,256")).split(",") if b]
  hf = args.hf_batches if args.hf_batches is not None else ("4" if args.small else "32,128")
  args.hf_batches = [int(b) for b in hf.split(",") if b]
  args.prompt_len = args.prompt_len or (16 if args.small else 128)
  args.output_len = args.output_len or (16 if args.small else 128)
  from glinthawk_jax.config import base_config
  buckets = args.width_buckets or str(base_config().engine.width_buckets_per_octave)
  args.width_buckets = [int(w) for w in buckets.split(",") if w]
  if not args.width_buckets or min(args.width_buckets) < 1:
    p.error(f"--width_buckets={buckets!r}: expected positive integers")
  args.width_batches = (set(args.batches) if args.width_batches is None
                        else {int(b) for b in args.width_batches.split(",") if b})
  return args


def model_shape(small: bool):
  from configs import llama2_7b, tiny
  config = tiny.get_config() if small else llama2_7b.get_config()
  config.dtype = "float32" if small else "bfloat16"
  config.placement = "local"  # this benchmark measures the paged-attention baseline
  return config


def run_hf(args) -> list[dict]:
  """HF transformers generate(), greedy, random init, fixed output length; one dict per batch size."""
  import torch
  import transformers

  m = model_shape(args.small).model
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if device == "cuda" and not args.small else torch.float32
  hf_config = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
      head_dim=m.head_dim, max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps)
  torch.set_default_dtype(dtype)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(hf_config).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  results = []
  for b in args.hf_batches:
    ids = torch.randint(3, m.vocab_size, (b, args.prompt_len), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
      model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
      sync()
      start = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, max_new_tokens=args.output_len,
                           min_new_tokens=args.output_len, do_sample=False)
      sync()
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - args.prompt_len) * b
    results.append(dict(batch=b, elapsed_s=elapsed, output_tokens=tokens, output_tok_s=tokens / elapsed))
  return results


def streaming_floor(model_cfg, batch: int, prompt_len: int, output_len: int, hbm_tbps: float,
                    peak_tflops: float) -> dict:
  """Weights plus the average KV read per decode step, over the memory bandwidth; and the whole run's
  floor: that for every step plus the prefill's matmul FLOPs over the measured matmul rate."""
  itemsize = 4 if model_cfg.dtype == "float32" else 2
  weight_bytes = model_cfg.param_count() * itemsize
  kv_bytes = batch * (prompt_len + output_len / 2) * model_cfg.kv_bytes_per_token
  step_s = (weight_bytes + kv_bytes) / (hbm_tbps * 1e12)
  prefill_s = 2 * model_cfg.param_count() * batch * prompt_len / (peak_tflops * 1e12)
  run_s = prefill_s + output_len * step_s
  return dict(weight_gb=weight_bytes / 1e9, avg_kv_read_gb=kv_bytes / 1e9, floor_step_ms=step_s * 1e3,
              floor_output_tok_s=batch / step_s, floor_prefill_s=prefill_s,
              floor_run_output_tok_s=batch * output_len / run_s)


def run_engine(args) -> tuple[list[dict], str]:
  import jax
  import numpy as np

  from glinthawk_jax import config as config_lib
  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams
  from models.llama import init_model

  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  config = model_shape(args.small)
  config.engine.max_model_len = args.prompt_len + args.output_len
  config.engine.page_size = args.page_size
  config.engine.decode_steps_per_call = args.decode_steps
  config.engine.max_prefill_tokens = args.max_prefill_tokens
  config.engine.kv_cache_gb = 0.0  # fraction of free memory, capped at what the batch needs
  model_cfg = config_lib.model_config(config)
  config.engine.layer_loop = args.layer_loop
  config.engine.decode_attention = args.decode_attention
  # unrolled: each Engine builds its own weights, so the runner's per-layer copies are the only ones.
  model = init_model(model_cfg, config.seed) if args.layer_loop == "scan" else None
  params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
  results = []
  for b in args.batches:
    prompts = np.random.default_rng(b).integers(3, model_cfg.vocab_size, (b, args.prompt_len)).tolist()
    for buckets in args.width_buckets if b in args.width_batches else args.width_buckets[:1]:
      config.engine.max_num_seqs = b
      config.engine.width_buckets_per_octave = buckets
      results.append(_engine_row(Engine(config, model=model), prompts, params, args, model_cfg))
      results[-1]["width_buckets_per_octave"] = buckets
      gc.collect()  # the runner's jitted methods form a cycle; free its KV pool before the next engine
  results_device = jax.devices()[0].device_kind
  return results, results_device


def _engine_row(engine, prompts, params, args, model_cfg) -> dict:
  """One engine's timed run (the second of two; the first compiles every shape it uses)."""
  b = len(prompts)
  start = time.perf_counter()
  engine.generate(prompts, params)
  first_s = time.perf_counter() - start
  before = dict(engine.stats_dict())
  start = time.perf_counter()
  outs = engine.generate(prompts, params)
  elapsed = time.perf_counter() - start
  after = engine.stats_dict()
  tokens = sum(len(o.token_ids) for o in outs)
  calls = after["num_decode_calls"] - before["num_decode_calls"]
  decode_s = after["decode_time_s"] - before["decode_time_s"]
  step_ms = decode_s / max(calls * args.decode_steps, 1) * 1e3
  floor = streaming_floor(model_cfg, b, args.prompt_len, args.output_len, args.hbm_tbps, args.peak_tflops)
  shapes = engine.runner.compiled_shapes
  return dict(
      batch=b, elapsed_s=elapsed, output_tokens=tokens, output_tok_s=tokens / elapsed,
      first_run_s=first_s, prefill_s=after["prefill_time_s"] - before["prefill_time_s"],
      prefill_calls=after["num_prefill_calls"] - before["num_prefill_calls"],
      decode_s=decode_s, decode_calls=calls, decode_step_ms=step_ms, decode_tok_s=b / step_ms * 1e3,
      num_compilations=after["num_compilations"], num_pages=after["num_pages"],
      decode_widths=sorted({s[2][1] for s in shapes if s[0] == "decode"}),
      kv_pool_gib=after["kv_pool_gib"], num_preemptions=after["num_preemptions"],
      x_floor=step_ms / floor["floor_step_ms"],
      x_run_floor=floor["floor_run_output_tok_s"] / (tokens / elapsed), **floor)


def table(engine_rows, hf_rows) -> str:
  hf = {r["batch"]: r["output_tok_s"] for r in hf_rows}
  lines = [f"{'batch':>6} {'widths/oct':>10} {'engine tok/s':>13} {'HF tok/s':>9} {'vs HF':>6} {'step ms':>8} "
           f"{'floor ms':>9} {'floor tok/s':>12} {'x floor':>8} {'x run floor':>12} {'prefill s':>9} "
           f"{'compiles':>9}  decode widths (pages)"]
  for r in engine_rows:
    h = hf.get(r["batch"])
    lines.append(f"{r['batch']:>6} {r['width_buckets_per_octave']:>10} {r['output_tok_s']:>13,.0f} "
                 f"{h or float('nan'):>9,.0f} "
                 f"{(r['output_tok_s'] / h if h else float('nan')):>6.2f} {r['decode_step_ms']:>8.2f} "
                 f"{r['floor_step_ms']:>9.2f} {r['floor_output_tok_s']:>12,.0f} {r['x_floor']:>8.2f} "
                 f"{r['x_run_floor']:>12.2f} {r['prefill_s']:>9.3f} "
                 f"{r['num_compilations']:>9}  {','.join(map(str, r['decode_widths']))}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.hf_only:
    print(json.dumps(run_hf(args)))
    return
  hf_rows = []
  if args.hf_batches:
    cmd = [sys.executable, os.path.abspath(__file__), "--hf_only", "--hf_batches",
           ",".join(map(str, args.hf_batches)), "--prompt_len", str(args.prompt_len),
           "--output_len", str(args.output_len)] + (["--small"] if args.small else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    hf_rows = json.loads(done.stdout.strip().splitlines()[-1])
  from benchmarks.device_ceilings import copy_bandwidth_gbs, matmul_tflops
  if not args.hbm_tbps:
    args.hbm_tbps = copy_bandwidth_gbs(64 << 20 if args.small else 4 << 30) / 1e3
  args.peak_tflops = matmul_tflops(256 if args.small else 8192)
  engine_rows, device = run_engine(args)
  report = dict(
      device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command=" ".join([os.path.basename(sys.executable)] + sys.argv), prompt_len=args.prompt_len,
      output_len=args.output_len, decode_steps_per_call=args.decode_steps, page_size=args.page_size,
      layer_loop=args.layer_loop, decode_attention=args.decode_attention,
      max_prefill_tokens=args.max_prefill_tokens, hbm_tbps=args.hbm_tbps, peak_tflops=args.peak_tflops,
      engine=engine_rows, hf=hf_rows)
  write_json(args.out, report)
  print(f"{device}: copy {args.hbm_tbps:.2f} TB/s, bf16 matmul {args.peak_tflops:.0f} TFLOP/s; "
        f"prompt {args.prompt_len} / output {args.output_len}, "
        f"decode_steps_per_call={args.decode_steps}, layer_loop={args.layer_loop}, "
        f"decode_attention={args.decode_attention}")
  print(table(engine_rows, hf_rows))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
