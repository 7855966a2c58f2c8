"""Where a decode step's time goes: the engine's decode call, timed and traced, per kernel and layer loop.

Variants are kernel/layer_loop: xla or pallas decode attention (engine.decode_attention), unrolled or scan
layers (engine.layer_loop; Pallas needs unrolled). Each variant builds the ModelRunner at throughput.py's shape (Llama-2-7B, bf16, random weights, page 16,
decode_steps fused steps a call) with every row at context prompt_len + output_len / 2 (the average step of
a prompt 128 / output 128 run), compiles the decode call once (compile seconds, temp bytes and large
copies read from the compiled HLO), times --iters calls the way the engine runs them (one host sync per
call), then traces --trace_calls calls with jax.profiler (Perfetto JSON, no TensorBoard needed) and groups
the device kernel time of a decode step (benchmarks/kernel_trace.py); gaps = ms/step - kernel ms/step is
time the device sat idle between kernels (launches, host syncs). The floor is throughput.py's:
weights plus the KV read of a step at the copy bandwidth measured in this run. Rows hold their live pages
then the scratch page up to the block-table width, as the scheduler builds them; --widths gives one row per
width (default: engine.width_buckets_per_octave's bucket), to see what the padding columns cost.

  python benchmarks/profile_decode.py --out profile_decode.json     # GPU, about 5 minutes
  python benchmarks/profile_decode.py --variants xla/unrolled --widths 13,14,16 --out pd_widths.json
  python benchmarks/profile_decode.py --small --out /tmp/pd.json    # CPU smoke test (Pallas interpreted)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import kernel_trace  # noqa: E402
from benchmarks.device_ceilings import copy_bandwidth_gbs  # noqa: E402
from benchmarks.throughput import model_shape, streaming_floor  # noqa: E402
from glinthawk_jax import config as config_lib  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.model_runner import LocalPagedAttention, ModelRunner  # noqa: E402
from glinthawk_jax.paged_cache import SCRATCH_PAGE, pages_per_sequence  # noqa: E402
from glinthawk_jax.scheduler import width_bucket  # noqa: E402
from models.llama import init_model  # noqa: E402

VARIANTS = "xla/unrolled,pallas/unrolled,xla/scan"
LARGE_COPY_BYTES = 64 << 20  # a copy this big in the compiled decode is reported (a pool or weight copy)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="profile_decode.json", help="JSON file of every number")
  p.add_argument("--small", action="store_true", help="tiny model on the CPU (smoke test)")
  p.add_argument("--variants", default=VARIANTS, help="comma-separated kernel/layer_loop")
  p.add_argument("--batch", type=int, default=None, help="rows (default 128; small: 4)")
  p.add_argument("--prompt_len", type=int, default=None, help="default 128 (small: 16)")
  p.add_argument("--output_len", type=int, default=None, help="default 128 (small: 16)")
  p.add_argument("--decode_steps", type=int, default=8, help="engine.decode_steps_per_call")
  p.add_argument("--page_size", type=int, default=16, help="engine.page_size")
  p.add_argument("--widths", default=None,
                 help="block-table widths in pages, one row each per variant: the live pages, then the scratch "
                      "page (default: the config's width bucket of the live pages)")
  p.add_argument("--iters", type=int, default=None, help="timed decode calls (default 10; small: 2)")
  p.add_argument("--trace_calls", type=int, default=3, help="decode calls under the profiler")
  p.add_argument("--trace_dir", default="/tmp/profile_decode", help="where the traces go (kept)")
  p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
  args = p.parse_args(argv)
  args.batch = args.batch or (4 if args.small else 128)
  args.prompt_len = args.prompt_len or (16 if args.small else 128)
  args.output_len = args.output_len or (16 if args.small else 128)
  args.iters = args.iters or (2 if args.small else 10)
  args.variants = [_variant(v) for v in args.variants.split(",") if v]
  args.widths = [int(w) for w in args.widths.split(",") if w] if args.widths else None
  return args


def _variant(text: str) -> tuple[str, str]:
  parts = tuple(text.split("/"))
  if parts not in (("xla", "unrolled"), ("pallas", "unrolled"), ("xla", "scan")):
    raise SystemExit(f"--variants: {text!r} is not one of xla/unrolled, pallas/unrolled, xla/scan")
  return parts


def live_pages(args) -> int:
  """Pages a row holds at the run's average context after a call's steps (what the scheduler reserves)."""
  per_seq = pages_per_sequence(args.prompt_len + args.output_len, args.page_size)
  return min(math.ceil((args.prompt_len + args.output_len // 2 + args.decode_steps) / args.page_size), per_seq)


def decode_inputs(args, model_cfg, width: int) -> tuple[dict, int]:
  """The decode call's arrays with every row at the run's average context, its live pages then the scratch
  page up to `width` (as the scheduler builds them); and the pool's pages."""
  b, page = args.batch, args.page_size
  per_seq = max(pages_per_sequence(args.prompt_len + args.output_len, page), width)
  context = args.prompt_len + args.output_len // 2
  tables = 1 + np.arange(b, dtype=np.int32)[:, None] * per_seq + np.arange(width, dtype=np.int32)[None]
  tables[:, live_pages(args):] = SCRATCH_PAGE
  rng = np.random.default_rng(0)
  inputs = dict(
      tokens=rng.integers(3, model_cfg.vocab_size, b).astype(np.int32),
      positions=np.full(b, context, np.int32), block_tables=tables, token_index=np.zeros(b, np.int32),
      temperature=np.zeros(b, np.float32), top_k=np.zeros(b, np.int32), top_p=np.ones(b, np.float32),
      seeds=np.arange(b, dtype=np.uint32), seq_ids=np.full(b, -1, np.int32))
  return inputs, b * per_seq + 1


def run_variant(args, model, model_cfg, variant, widths) -> list[dict]:
  """One row per block-table width, all on one runner (one pool sized for the widest)."""
  kernel, loop = variant
  num_pages = decode_inputs(args, model_cfg, max(widths))[1]
  runner = ModelRunner(model, LocalPagedAttention(model_cfg, num_pages, args.page_size, kernel), args.decode_steps,
                       loop)
  rows = []
  for width in widths:
    rows.append(_run_width(args, runner, variant, decode_inputs(args, model_cfg, width)[0]))
    print(f"{_label(rows[-1])}: {rows[-1]['step_ms']:.2f} ms/step", flush=True)
  return rows


def _run_width(args, runner, variant, inputs) -> dict:
  kernel, loop = variant
  width = inputs["block_tables"].shape[1]
  sl = runner.slices[0]
  arrays = [jax.device_put(inputs[k]) for k in ("tokens", "positions", "block_tables", "token_index", "temperature",
                                                "top_k", "top_p", "seeds", "seq_ids")]
  start = time.perf_counter()
  # The runner's jitted decode of its one slice, lowered and compiled here so its HLO can be read.
  compiled = runner._decode.lower(sl.params, sl.state, *arrays, slice_index=0, steps=args.decode_steps,
                                  greedy_only=True).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()

  def calls(n):
    for _ in range(n):
      sl.state, out = compiled(sl.params, sl.state, *arrays)
      np.asarray(out)  # the engine reads each call's tokens on the host

  calls(1)
  start = time.perf_counter()
  calls(args.iters)
  step_ms = (time.perf_counter() - start) / (args.iters * args.decode_steps) * 1e3
  trace_dir = os.path.join(args.trace_dir, f"{'_'.join(variant)}_w{width}")
  shutil.rmtree(trace_dir, ignore_errors=True)
  try:  # a profiler that cannot trace (no CUPTI, ...) leaves the timings standing
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      calls(args.trace_calls)
    events = kernel_trace.kernel_events(kernel_trace.latest_trace(trace_dir))
    summary = kernel_trace.summarize(events, hlo, args.trace_calls * args.decode_steps, args.top)
  except Exception as e:  # noqa: BLE001
    summary = dict(trace_error=f"{type(e).__name__}: {e}", group_ms_per_step=dict.fromkeys(kernel_trace.GROUPS, 0.0),
                   kernel_ms_per_step=0.0, launches_per_step=0.0, top_kernels=[], num_kernels=0)
  memory = compiled.memory_analysis()
  return dict(variant="/".join(variant), kernel=kernel, layer_loop=loop, block_table_width=width,
              compile_s=compile_s,
              step_ms=step_ms, temp_mib=memory.temp_size_in_bytes / 2**20 if memory else None,
              large_copies=kernel_trace.large_copies(hlo, LARGE_COPY_BYTES), trace_dir=trace_dir, **summary)


def _label(row) -> str:
  return f"{row['variant']} w{row['block_table_width']}"


def table(rows, floor_ms) -> str:
  groups = kernel_trace.GROUPS
  lines = [f"{'variant, width':<20} {'compile s':>9} {'ms/step':>8} {'x floor':>8} "
           + " ".join(f"{g:>11}" for g in groups)
           + f" {'kernels':>8} {'gaps':>6} {'launches':>8} {'big copies':>10}"]
  for r in rows:
    lines.append(f"{_label(r):<20} {r['compile_s']:>9.1f} {r['step_ms']:>8.2f} {r['step_ms'] / floor_ms:>8.2f} "
                 + " ".join(f"{r['group_ms_per_step'][g]:>11.3f}" for g in groups)
                 + f" {r['kernel_ms_per_step']:>8.2f} {r['step_ms'] - r['kernel_ms_per_step']:>6.2f} "
                 f"{r['launches_per_step']:>8.0f} {len(r['large_copies']):>10}")
  for r in rows:
    if "trace_error" in r:
      lines.append(f"\n{_label(r)}: no trace ({r['trace_error']})")
    lines.append(f"\n{_label(r)}: top kernels, ms per decode step (launches per step)")
    for k in r["top_kernels"]:
      lines.append(f"  {k['ms_per_step']:>8.3f}  {k['launches_per_step']:>6.1f}  {k['group']:<11} {k['kernel'][:60]:<60} "
                   f"{k['op_name'][-50:]}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  config = model_shape(args.small)
  model_cfg = config_lib.model_config(config)
  hbm_tbps = copy_bandwidth_gbs(64 << 20 if args.small else 4 << 30) / 1e3
  floor = streaming_floor(model_cfg, args.batch, args.prompt_len, args.output_len, hbm_tbps, 1.0)
  model = init_model(model_cfg, config.seed)
  live = live_pages(args)
  per_seq = pages_per_sequence(args.prompt_len + args.output_len, args.page_size)
  widths = args.widths or [width_bucket(live, per_seq, config.engine.width_buckets_per_octave)]
  if min(widths) < live:
    raise SystemExit(f"--widths: {min(widths)} pages is fewer than the {live} live pages a row holds")
  rows = []
  for v in args.variants:
    rows += run_variant(args, model, model_cfg, v, widths)
    gc.collect()  # the runner's jitted methods form a cycle: free its pool and weight copies before the next
  device = jax.devices()[0].device_kind
  report = dict(
      device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command=" ".join([os.path.basename(sys.executable)] + sys.argv), batch=args.batch,
      prompt_len=args.prompt_len, output_len=args.output_len, context=args.prompt_len + args.output_len // 2,
      block_table_widths=widths, live_pages=live,
      decode_steps_per_call=args.decode_steps, page_size=args.page_size, hbm_tbps=hbm_tbps,
      floor_step_ms=floor["floor_step_ms"], weight_gb=floor["weight_gb"], avg_kv_read_gb=floor["avg_kv_read_gb"],
      variants=rows)
  write_json(args.out, report)
  print(f"{device}: copy {hbm_tbps:.2f} TB/s; batch {args.batch}, context {report['context']}, "
        f"block-table widths {widths} pages ({live} live, then the scratch page), "
        f"{args.decode_steps} steps a call; "
        f"floor {floor['floor_step_ms']:.2f} ms/step (weights {floor['weight_gb']:.1f} GB + "
        f"KV {floor['avg_kv_read_gb']:.1f} GB)")
  print(table(rows, floor["floor_step_ms"]))
  print(f"wrote {args.out}; traces under {args.trace_dir}")


if __name__ == "__main__":
  main()
