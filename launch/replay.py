"""Replays Azure LLM trace lengths with Poisson arrivals against a local cluster of worker processes.

  python launch/replay.py --config=configs/tiny.py --workers=prefill,decode --trace=conv \
      --rates=1,2,4 --num_requests=50 --slo_ttft_s=2 --slo_tbt_s=0.2 --out=out/replay.json

--workers lists one role per worker process (prefill, decode, colocated), optionally with its placement
(decode:pipelined: a combined-mode decode worker, its received K,V on tier-2 servers it spawns); --devices
gives each its CUDA_VISIBLE_DEVICES ("0;1"); --mem_fraction sets XLA_PYTHON_CLIENT_MEM_FRACTION for
workers sharing a GPU. Any --config.X=Y flag is also passed to every worker. Prints a table and writes JSON.
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root replaces launch/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glinthawk_jax.json_file import write_json  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config()).")
_WORKERS = flags.DEFINE_string("workers", "prefill,decode",
                               "Comma-separated role or role:placement, one worker each.")
_DEVICES = flags.DEFINE_string("devices", "", "';'-separated CUDA_VISIBLE_DEVICES per worker; empty = inherit.")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.0, "XLA_PYTHON_CLIENT_MEM_FRACTION per worker; 0 = default.")
_TRACE = flags.DEFINE_enum("trace", "conv", ["code", "conv"], "Azure LLM trace 2023 to draw lengths from.")
_RATES = flags.DEFINE_list("rates", ["1", "2", "4"], "Arrival rates, requests per second.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 50, "Requests per rate.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 1 << 30, "Cap on prompt lengths (also the context).")
_MAX_OUTPUT = flags.DEFINE_integer("max_output_tokens", 1 << 30, "Cap on output lengths.")
_SLO_TTFT = flags.DEFINE_float("slo_ttft_s", 2.0, "TTFT SLO, seconds.")
_SLO_TBT = flags.DEFINE_float("slo_tbt_s", 0.2, "Mean time-between-tokens SLO, seconds.")
_SLO_TARGET = flags.DEFINE_float("slo_target", 0.9, "Share of requests meeting both SLOs for goodput.")
_OUT = flags.DEFINE_string("out", "out/replay.json", "JSON results path.")


def worker_envs(count: int, devices: str, mem_fraction: float) -> list[dict[str, str]]:
  lists = devices.split(";") if devices else [None] * count
  if len(lists) != count:
    raise ValueError(f"--devices={devices!r}: {len(lists)} entries for {count} workers")
  envs = []
  for d in lists:
    env = {} if d is None else {"CUDA_VISIBLE_DEVICES": d.strip()}
    if mem_fraction:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(mem_fraction)
    envs.append(env)
  return envs


def main(argv):
  del argv
  from glinthawk_jax.config import model_config, validate  # noqa: PLC0415
  from glinthawk_jax.splitwise.cluster import Cluster  # noqa: PLC0415
  from glinthawk_jax.splitwise.replay import ReplaySpec, replay, stage_table, table, warm_up  # noqa: PLC0415

  config = _CONFIG.value
  validate(config)
  roles = [r.strip() for r in _WORKERS.value.split(",")]
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  spec = ReplaySpec(_TRACE.value, _NUM_REQUESTS.value, _MAX_PROMPT.value, _MAX_OUTPUT.value,
                    config.engine.max_model_len, model_config(config).vocab_size, config.seed)
  print(f"starting {len(roles)} workers: {', '.join(roles)}", file=sys.stderr, flush=True)
  envs = worker_envs(len(roles), _DEVICES.value, _MEM_FRACTION.value)
  with Cluster(config_flags.get_config_filename(flags.FLAGS["config"]), roles, overrides, envs,
               on_transfer_failure=config.splitwise.on_transfer_failure, max_attempts=config.splitwise.max_attempts,
               mixed_pool=config.splitwise.mixed_pool, poll_interval_s=config.splitwise.poll_interval_s) as cluster:
    warm_up(cluster, spec, max(float(r) for r in _RATES.value))
    result = replay(cluster, spec, [float(r) for r in _RATES.value], _SLO_TTFT.value, _SLO_TBT.value,
                    _SLO_TARGET.value)
  result["mode"] = "+".join(roles)
  result["command"] = " ".join(sys.argv)
  print(stage_table([result]))
  print(table([result]))
  write_json(_OUT.value, result)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
