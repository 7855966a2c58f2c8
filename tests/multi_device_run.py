"""Runs the multi-device cases of tests/test_multi_device.py in a process whose JAX sees 4 host devices.

python -m tests.multi_device_run CASE... prints one JSON line {case: greedy token ids per prompt};
a case is "placement tp=N slices=M" (placement "pipelined@F": local_attention_fraction F), or "checkpoint tp=N slices=M" (a Hugging Face checkpoint loaded
sharded vs whole: equal values, and the q_proj sharding). XLA_FLAGS must hold --xla_force_host_platform_device_count=4
before this starts (JAX reads it once); the test sets it in the subprocess's environment.
"""

import json
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from configs import tiny
from glinthawk_jax.checkpoint import load_hf_checkpoint, write_random_hf_checkpoint
from glinthawk_jax.config import model_config
from glinthawk_jax.engine import Engine
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.sharding import Layout
from glinthawk_jax.tier2_launch import server_args
from tier2_cpu.process import start_servers, stop_servers

PROMPT_LENGTHS = (5, 11, 2)
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def config(placement: str, tp: int, slices: int, addresses: str = ""):
  """tiny with 8 heads / 4 KV heads (GQA; tensor_parallel 4 divides both), 4 layers, fp32."""
  c = tiny.get_config()
  c.placement, _, fraction = placement.partition("@")
  c.local_attention_fraction = float(fraction or 0)
  c.model.update(dict(num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8))
  c.engine.update(dict(max_num_seqs=4, page_size=4, kv_cache_gb=0.0, max_model_len=32, max_prefill_tokens=32,
                       decode_steps_per_call=2, tensor_parallel=tp, layer_slices=slices))
  c.tier2.update(dict(addresses=addresses, in_flight=1))
  return c


def checkpoint_case(tp: int, slices: int) -> dict:
  c = config("local", tp, slices)
  with tempfile.TemporaryDirectory() as path:
    write_random_hf_checkpoint(model_config(c), path)
    sharded = load_hf_checkpoint(path, "float32", Layout.from_config(c, model_config(c)))
    whole = load_hf_checkpoint(path, "float32")
  pairs = zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(whole)))
  q = sharded.layers.q_proj[...]
  return {"equal": all(np.array_equal(a, b) for a, b in pairs), "q_proj_spec": str(q.sharding.spec),
          "q_proj_devices": len(q.sharding.device_set),
          "q_proj_shard_shape": list(q.addressable_shards[0].data.shape)}


def main(cases: list[str]) -> None:
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, n).tolist() for n in PROMPT_LENGTHS]
  parsed = [(p, int(tp[3:]), int(s[7:])) for p, tp, s in (case.split() for case in cases)]
  remote = [slices for placement, _, slices in parsed if placement.split("@")[0] in ("callback", "pipelined")]
  c = config("pipelined", 1, 1)
  ranges = ([None] if 1 in remote else []) + ([(0, 2), (2, 4)] if 2 in remote else [])
  servers = dict(zip(ranges, start_servers([server_args(c, model_config(c), "", r) for r in ranges])))
  try:
    out = {}
    for case, (placement, tp, slices) in zip(cases, parsed):
      if placement == "checkpoint":
        out[case] = checkpoint_case(tp, slices)
        continue
      addresses = ("" if placement == "local" else servers[None].address if slices == 1 else
                   f"{servers[0, 2].address};{servers[2, 4].address}")
      with Engine(config(placement, tp, slices, addresses)) as engine:
        out[case] = [o.token_ids for o in engine.generate(prompts, GREEDY)]
  finally:
    stop_servers(list(servers.values()))
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
