"""Splitwise on real worker processes: split (prefill on one GPU, decode on another) vs colocated.

Llama-2-7B shape, bf16, random weights; request lengths from the Azure LLM traces 2023 (code and
conversation), Poisson arrivals at three rates, each after a warm-up. Split runs a prefill worker and a
decode worker; colocated runs two colocated workers on the same devices (two GPUs: one each; one GPU:
two processes sharing it with XLA_PYTHON_CLIENT_MEM_FRACTION=0.45). Reports TTFT and TBT p50/p99,
throughput, SLO attainment, goodput and the visible KV-transfer time (prefill end to KV committed at
the decode worker) as a share of TTFT; prints the median time of each stage of a request's timeline and
the XLA compiles during the measured requests (docs/SPLITWISE.md, Measuring), then the results table;
writes JSON and a PNG plot.

  python benchmarks/splitwise.py --out splitwise.json      # GPU machine: --budget_s (300) + start-up
  python benchmarks/splitwise.py --smoke --out /tmp/sw.json  # CPU, tiny model, under a minute
  python benchmarks/splitwise.py --cpu --out /tmp/sw.json    # CPU, the GPU run's shapes on a small model

Rates not started within a mode's share of --budget_s are skipped and recorded as such; the parent
process never imports JAX, so the workers have the GPUs to themselves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.splitwise.cluster import Cluster  # noqa: E402 (no jax in this process: GPUs stay free)
from glinthawk_jax.splitwise.replay import ReplaySpec, measured, replay, stage_table, table, warm_up  # noqa: E402

MODES = {"split": ["prefill", "decode"], "colocated": ["colocated", "colocated"]}
# Scan compiles one layer: the traces' many shapes would otherwise cost minutes of compiles per worker.
GPU_OVERRIDES = ["--config.dtype=bfloat16", "--config.engine.layer_loop=scan", "--config.engine.max_num_seqs=64",
                 "--config.engine.max_model_len=2048", "--config.engine.max_prefill_tokens=4096",
                 "--config.engine.decode_steps_per_call=4"]
SMOKE_OVERRIDES = ["--config.engine.max_model_len=256", "--config.engine.max_num_seqs=8"]
# --cpu: the GPU run's engine shapes, lengths and rates on a small model (its compiles and stages).
CPU_OVERRIDES = [o for o in GPU_OVERRIDES if "dtype" not in o] + ["--config.model.num_layers=8",
                                                                    "--config.engine.kv_cache_gb=0.5"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="splitwise.json", help="JSON of every number (the plot goes beside it)")
  p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (a bug check, not a result)")
  p.add_argument("--cpu", action="store_true",
                 help="small model on the CPU with the GPU run's shapes, lengths and rates (compiles, stages)")
  p.add_argument("--traces", default="code,conv")
  p.add_argument("--rates", default=None, help="requests/s (default 1,2,4; smoke: 4,8,16)")
  p.add_argument("--num_requests", type=int, default=None, help="per rate (default 20; smoke: 6)")
  p.add_argument("--max_prompt_tokens", type=int, default=None, help="default 1536; smoke: 160")
  p.add_argument("--max_output_tokens", type=int, default=None, help="default 256; smoke: 16")
  p.add_argument("--slo_ttft_s", type=float, default=None, help="default 1.0; smoke: 5")
  p.add_argument("--slo_tbt_s", type=float, default=None, help="default 0.1; smoke: 1")
  p.add_argument("--modes", default="split,colocated")
  p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: nvidia-smi -L's count)")
  p.add_argument("--budget_s", type=float, default=300.0,
                 help="wall budget, split evenly over the modes; rates past it are skipped (recorded)")
  p.add_argument("--cache_dir", default="/tmp/glinthawk_jax_compile_cache",
                 help="workers' persistent XLA compilation cache (shared shapes compile once)")
  return p.parse_args(argv)


def num_gpus() -> int:
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.TimeoutExpired):
    return 0
  return sum(line.startswith("GPU ") for line in out.splitlines())


def worker_envs(gpus: int, cache_dir: str) -> list[dict[str, str]]:
  common = {"JAX_COMPILATION_CACHE_DIR": cache_dir} if cache_dir else {}
  if gpus >= 2:
    return [{**common, "CUDA_VISIBLE_DEVICES": "0"}, {**common, "CUDA_VISIBLE_DEVICES": "1"}]
  if gpus == 1:
    return [{**common, "CUDA_VISIBLE_DEVICES": "0", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}] * 2
  return [{**common, "JAX_PLATFORMS": "cpu"}] * 2


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  traces = sorted({r["trace"] for r in results})
  fig, axes = plt.subplots(len(traces), 3, figsize=(14, 3.6 * len(traces)), squeeze=False)
  for row, trace in zip(axes, traces):
    for res in (r for r in results if r["trace"] == trace):
      rows = measured(res["rates"])
      rates = [x["rate"] for x in rows]
      for ax, key in zip(row[:2], ("ttft_s", "tbt_s")):
        for p, style in (("p50", "-o"), ("p99", "--x")):
          ax.plot(rates, [1e3 * (x[f"{key}_{p}"] or 0) for x in rows], style, label=f"{res['mode']} {p}")
      row[2].plot(rates, [x["output_tokens_per_s"] for x in rows], "-o", label=res["mode"])
    for ax, title in zip(row, ("TTFT (ms)", "TBT (ms)", "output tokens/s")):
      ax.set_title(f"{trace}: {title}")
      ax.set_xlabel("arrival rate (req/s)")
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def save(path: str, results: list[dict], devices: set, gpus: int, config: str, overrides: list[str],
         started: float) -> None:
  """Writes every result so far as JSON to `path`."""
  out = {"benchmark": "splitwise", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "command": " ".join([sys.executable, *sys.argv]), "devices": sorted(devices), "gpus": gpus,
         "config": config, "overrides": overrides, "wall_s": time.time() - started, "results": results}
  write_json(path, out)


def main(argv=None):
  a = parse_args(argv)
  smoke = a.smoke
  gpus = 0 if smoke or a.cpu else (a.gpus if a.gpus is not None else num_gpus())
  if not (smoke or a.cpu) and gpus == 0:
    sys.exit("no GPU found (nvidia-smi -L); pass --gpus=N, or --smoke / --cpu for the CPU checks")
  config = "configs/tiny.py" if smoke or a.cpu else "configs/llama2_7b.py"
  overrides = SMOKE_OVERRIDES if smoke else CPU_OVERRIDES if a.cpu else GPU_OVERRIDES
  rates = [float(r) for r in (a.rates or ("4,8,16" if smoke else "1,2,4")).split(",")]
  n = a.num_requests or (6 if smoke else 20)
  max_len = 256 if smoke else 2048
  vocab = 512 if smoke or a.cpu else 32000
  slo_ttft, slo_tbt = a.slo_ttft_s or (5.0 if smoke else 1.0), a.slo_tbt_s or (1.0 if smoke else 0.1)
  results, devices = [], set()
  started = time.time()
  modes = a.modes.split(",")
  for m, mode in enumerate(modes):
    deadline = started + a.budget_s * (m + 1) / len(modes)
    print(f"== {mode}: starting workers {MODES[mode]} ({gpus} GPUs)", file=sys.stderr, flush=True)
    with Cluster(config, MODES[mode], overrides, worker_envs(gpus, a.cache_dir), ready_timeout_s=600,
                 mixed_pool=False) as cluster:
      devices.update(cluster.stubs[name].call("Poll", {}, 60)["stats"]["device"] for name in cluster.stubs)
      for trace in a.traces.split(","):
        spec = ReplaySpec(trace, n, a.max_prompt_tokens or (160 if smoke else 1536),
                          a.max_output_tokens or (16 if smoke else 256), max_len, vocab)
        t = time.time()
        if t >= deadline:
          results.append({"mode": mode, "trace": trace, "goodput_rps": None,
                          "rates": [{"rate": r, "skipped": True} for r in rates]})
          continue
        try:  # at least a minute for the compiles, past the mode's share if need be
          warm_up(cluster, spec, max(rates), timeout_s=max(60.0, deadline - t))
        except TimeoutError as e:
          results.append({"mode": mode, "trace": trace, "goodput_rps": None,
                          "rates": [{"rate": r, "error": f"warm-up: {e}"} for r in rates]})
          break  # the workers are still busy: on to the next mode's fresh cluster
        warm_s, compiled = time.time() - t, cluster.compiles()  # all 0: jax reported no compile events
        so_far = ", ".join(f"{name} {c['count']} ({c['seconds']:.1f} s)" for name, c in compiled.items())
        print(f"== {mode} {trace}: warm-up {warm_s:.1f} s; compiles so far: {so_far}", file=sys.stderr, flush=True)
        res = replay(cluster, spec, rates, slo_ttft, slo_tbt, deadline=deadline)
        res.update(mode=mode, warm_up_s=warm_s, compiles_after_warm_up=compiled)
        results.append(res)
        save(a.out, results, devices, gpus, config, overrides, started)  # a run cut short keeps what finished
        if any("error" in r for r in res["rates"]):
          break  # a timed-out run leaves the workers busy: on to the next mode's fresh cluster
  print(stage_table(results))
  print(table(results))
  save(a.out, results, devices, gpus, config, overrides, started)
  png = os.path.splitext(a.out)[0] + ".png"
  plot(results, png)
  print(f"wrote {a.out} and {png} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
  main()
