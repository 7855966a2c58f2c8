"""Checkpoint load time and prefill throughput of the model, on random weights of a config's shape.

  python benchmarks/model_forward.py --config=configs/llama2_7b.py --out=out/model_forward.json
  python benchmarks/model_forward.py --config=configs/llama2_7b.py --checkpoint_dtype=float16
  python benchmarks/model_forward.py --small   # tiny shape, seconds on CPU

(a) writes a sharded random safetensors checkpoint (in --config.dtype) to a temp dir and times
`load_hf_checkpoint` (read + convert + device_put, until the arrays are ready). The file was just
written, so it is read from the page cache: this is the loader's speed, not the disk's.
(b) times the jitted full forward on [batch, seq] tokens (median of --runs after a warm-up):
tokens/s and TFLOP/s. FLOPs = 2 * matmul params * tokens + 4 * layers * batch * seq^2 * heads *
head_dim (attention as computed: the dense masked score matrix).
"""

import dataclasses
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import tiny  # noqa: E402
from glinthawk_jax.checkpoint import load_hf_checkpoint, write_random_hf_checkpoint  # noqa: E402
from glinthawk_jax.config import model_config  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama2_7b.py", "Config file for the shape.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny shape, batch 2 x 64: runs in seconds on CPU.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prefill batch size.")
_SEQ = flags.DEFINE_integer("seq", 512, "Prefill tokens per sequence.")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed forward passes (after one warm-up).")
_CKPT_DTYPE = flags.DEFINE_enum("checkpoint_dtype", None, ["float32", "bfloat16", "float16"],
                                "dtype of the written checkpoint (default: --config.dtype); another dtype "
                                "times the conversion too (Llama-2 checkpoints are float16).")
_SHARDS = flags.DEFINE_integer("shards", 3, "Safetensors shards of the written checkpoint.")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", None, "Where to write the checkpoint; default: a temp dir.")
_PEAK = flags.DEFINE_float("peak_tflops", 780.0, "Device bf16 peak for the utilization column "
                           "(H100: about 780 measured, FACTS.md).")
_OUT = flags.DEFINE_string("out", "out/model_forward.json", "JSON results path.")


def _block(model):
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))


def time_load(cfg, checkpoint_dtype, num_shards, directory):
  """Writes a random checkpoint of cfg's shape, then times loading it as cfg.dtype; returns model, numbers."""
  t0 = time.perf_counter()
  write_random_hf_checkpoint(dataclasses.replace(cfg, dtype=checkpoint_dtype), directory, num_shards=num_shards)
  write_s = time.perf_counter() - t0
  nbytes = sum(os.path.getsize(os.path.join(directory, f))
               for f in os.listdir(directory) if f.endswith(".safetensors"))
  t0 = time.perf_counter()
  model = load_hf_checkpoint(directory, cfg.dtype)
  _block(model)
  load_s = time.perf_counter() - t0
  return model, {"checkpoint_gb": nbytes / 1e9, "checkpoint_dtype": checkpoint_dtype, "shards": num_shards,
                 "write_s": write_s, "load_s": load_s, "load_gb_per_s": nbytes / 1e9 / load_s}


def time_prefill(model, batch, seq, runs, peak_tflops):
  cfg = model.config
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  t0 = time.perf_counter()
  jax.block_until_ready(forward(state, tokens))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(forward(state, tokens))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  matmul_params = cfg.param_count() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
  flops = (2 * matmul_params * batch * seq
           + 4 * cfg.num_layers * batch * seq * seq * cfg.num_heads * cfg.head_dim)
  return {"batch": batch, "seq": seq, "runs": runs, "compile_and_first_s": compile_s,
          "median_s": median, "min_s": min(times), "tokens_per_s": batch * seq / median,
          "tflops": flops / median / 1e12, "flops_per_pass": flops,
          "utilization_vs_peak": flops / median / 1e12 / peak_tflops, "peak_tflops": peak_tflops}


def main(argv):
  del argv
  config = tiny.get_config() if _SMALL.value else _CONFIG.value
  batch, seq = (2, 64) if _SMALL.value else (_BATCH.value, _SEQ.value)
  cfg = model_config(config)
  directory = _CKPT_DIR.value or tempfile.mkdtemp(prefix="glinthawk_ckpt_")
  try:
    model, load = time_load(cfg, _CKPT_DTYPE.value or cfg.dtype, _SHARDS.value, directory)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  prefill = time_prefill(model, batch, seq, 3 if _SMALL.value else _RUNS.value, _PEAK.value)
  device = jax.devices()[0]
  result = {
      "benchmark": "model_forward", "config": config.name, "dtype": cfg.dtype,
      "params": cfg.param_count(), "device": f"{device.platform}: {device.device_kind}",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv), "jax": jax.__version__, "load": load, "prefill": prefill,
  }
  rows = [
      ("checkpoint", f"{load['checkpoint_gb']:.2f} GB {load['checkpoint_dtype']} in {load['shards']} shards"),
      ("write (random values)", f"{load['write_s']:.2f} s"),
      (f"load as {cfg.dtype} (to device)", f"{load['load_s']:.2f} s = {load['load_gb_per_s']:.2f} GB/s"),
      ("prefill shape", f"{batch} x {seq} tokens"),
      ("compile + first pass", f"{prefill['compile_and_first_s']:.2f} s"),
      ("prefill median", f"{prefill['median_s'] * 1e3:.2f} ms (min {prefill['min_s'] * 1e3:.2f})"),
      ("prefill throughput", f"{prefill['tokens_per_s']:,.0f} tokens/s"),
      ("achieved", f"{prefill['tflops']:.1f} TFLOP/s = {100 * prefill['utilization_vs_peak']:.1f}% "
                   f"of {_PEAK.value:.0f}"),
  ]
  print(f"\nmodel_forward: {config.name} ({cfg.param_count() / 1e9:.2f} B params, {cfg.dtype}) "
        f"on {result['device']}")
  for name, value in rows:
    print(f"  {name:<30} {value}")
  write_json(_OUT.value, result)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
