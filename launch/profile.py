"""Profiler: writes a hardware profile JSON, measured on this machine or from datasheet figures.

  # Measured: times one decoder layer's dense work by batch and prefill length on the default
  # JAX device, decode attention by batch and context on the CPU device, and host<->device copies.
  python launch/profile.py --config=configs/llama2_70b.py --price_per_hour=4.0 --out=out/profile.json
  python launch/profile.py --config=configs/tiny.py --tiny --out=/tmp/profile.json   # seconds, CPU
  # Datasheet (hardware we do not have): the figures as given, marked "source": "datasheet".
  python launch/profile.py --datasheet --name=t4_vm --kind=accelerator --memory_gb=16 \
      --mem_bandwidth_gbs=320 --peak_tflops=65 --network_gbps=8 --price_per_hour=0.526 \
      --notes="NVIDIA T4 datasheet; Azure NC4as_T4_v3 list price" --out=configs/hardware/t4.json

A measured profile stores every timing under `measurements` and fits `mem_bandwidth_gbs` (best
weight-streaming rate of a small-batch step) and `peak_tflops` (best FLOP rate) with efficiencies
of 1.0, since they are achieved figures. `--kind=cpu` fits the CPU's figures from the attention
table instead (tier 2). Not yet used to calibrate the simulator: see docs/SIMULATOR.md.
"""

import datetime
import os
import sys
import time

# Replace (not prepend) launch/ on the path: this file would otherwise shadow the stdlib `profile`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glinthawk_jax.sim import cost_model, profiles  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model config (get_config()).")
_OUT = flags.DEFINE_string("out", "out/profile.json", "Profile JSON to write.")
_DATASHEET = flags.DEFINE_bool("datasheet", False, "Write the figures given as flags; time nothing.")
_TINY = flags.DEFINE_bool("tiny", False, "Small sweeps (CPU smoke test).")
_NAME = flags.DEFINE_string("name", None, "Profile name; default: the device's kind.")
_KIND = flags.DEFINE_enum("kind", "accelerator", profiles.KINDS, "What the profile describes.")
_MEMORY = flags.DEFINE_float("memory_gb", 0.0, "Memory per device, GB; measured: 0 = ask the device.")
_BANDWIDTH = flags.DEFINE_float("mem_bandwidth_gbs", 0.0, "Datasheet memory bandwidth, GB/s.")
_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Datasheet peak TFLOP/s.")
_NETWORK = flags.DEFINE_float("network_gbps", 10.0, "NIC, Gbit/s.")
_PRICE = flags.DEFINE_float("price_per_hour", 0.0, "USD per hour for the machine.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices per machine.")
_NOTES = flags.DEFINE_string("notes", "", "Sources and assumptions, in words.")


def _timed(fn, *args, reps=5):
  """Median seconds of fn(*args) after a compile-and-warm call."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def measure(m, tiny):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from models.llama import DecoderLayer

  layer = nnx.jit(lambda: DecoderLayer(m, rngs=nnx.Rngs(params=0)))()
  graphdef, state = nnx.split(layer)

  @jax.jit
  def dense(state, x, positions):
    lay = nnx.merge(graphdef, state)
    q, _, _ = lay.pre_attention(x, positions)
    return lay.post_attention(x, q)  # q stands in for the attention output: same shape

  def step(batch, tokens):
    x = jnp.ones((batch, tokens, m.hidden_size), jnp.dtype(m.dtype))
    pos = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    return _timed(dense, state, x, pos)

  batches = (1, 4, 16) if tiny else (1, 8, 32, 64, 128, 256, 512)
  prompts = (16, 64) if tiny else (128, 512, 2048, 8192)
  tier1 = [dict(batch=b, seconds=step(b, 1)) for b in batches]
  prefill = [dict(tokens=t, seconds=step(1, t)) for t in prompts]

  cpu = jax.devices("cpu")[0]
  group = m.num_heads // m.num_kv_heads

  @jax.jit
  def decode_attention(q, k, v):  # q: [B, KV, G, D]; k, v: [B, C, KV, D], float32
    s = jnp.einsum("bkgd,bckd->bkgc", q, k) / jnp.sqrt(jnp.float32(m.head_dim))
    return jnp.einsum("bkgc,bckd->bkgd", jax.nn.softmax(s, axis=-1), v)

  tier2 = []
  for b, c in ((1, 256), (4, 1024)) if tiny else ((1, 1024), (8, 1024), (8, 4096), (32, 4096)):
    q = jax.device_put(np.ones((b, m.num_kv_heads, group, m.head_dim), np.float32), cpu)
    k = jax.device_put(np.ones((b, c, m.num_kv_heads, m.head_dim), np.float32), cpu)
    tier2.append(dict(batch=b, context=c, kv_bytes=2 * k.nbytes, seconds=_timed(decode_attention, q, k, k)))

  transfer = []
  for nbytes in (1 << 16, 1 << 20) if tiny else (1 << 16, 1 << 20, 1 << 24, 1 << 28):
    host = np.ones(nbytes, np.uint8)
    transfer.append(dict(bytes=nbytes, seconds=_timed(lambda a: np.asarray(jax.device_put(a)), host)))
  return dict(device=str(jax.devices()[0].device_kind), tier1_step=tier1, prefill=prefill,
              tier2_attention=tier2, transfer=transfer)


def fit(m, table, kind):
  """Achieved bandwidth and FLOP rate from the timing tables."""
  if kind == "cpu":
    bw = max(r["kv_bytes"] / r["seconds"] for r in table["tier2_attention"])
    flops = max(cost_model.attention_flops(m, r["batch"] * r["context"]) / r["seconds"]
                for r in table["tier2_attention"])
    return bw, flops
  weights = cost_model.layer_params(m) * cost_model.WEIGHT_BYTES
  bw = weights / min(r["seconds"] for r in table["tier1_step"])
  flops = max([2 * cost_model.layer_params(m) * r["batch"] / r["seconds"] for r in table["tier1_step"]]
              + [2 * cost_model.layer_params(m) * r["tokens"] / r["seconds"] for r in table["prefill"]])
  return bw, flops


def main(argv):
  del argv
  from glinthawk_jax.config import model_config
  if _DATASHEET.value:
    profile = profiles.HardwareProfile(
        name=_NAME.value or "datasheet", kind=_KIND.value, source="datasheet", memory_gb=_MEMORY.value,
        mem_bandwidth_gbs=_BANDWIDTH.value, peak_tflops=_TFLOPS.value, network_gbps=_NETWORK.value,
        price_per_hour=_PRICE.value, devices=_DEVICES.value, notes=_NOTES.value)
  else:
    import jax
    m = model_config(_CONFIG.value)
    table = measure(m, _TINY.value)
    bw, flops = fit(m, table, _KIND.value)
    memory = _MEMORY.value
    if not memory:
      stats = jax.devices()[0].memory_stats() or {}
      memory = stats.get("bytes_limit", 0) / 1e9 or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    table.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=" ".join(sys.argv),
                 model=_CONFIG.value.name)
    profile = profiles.HardwareProfile(
        name=_NAME.value or table["device"], kind=_KIND.value, source="measured", memory_gb=memory,
        mem_bandwidth_gbs=bw / 1e9, peak_tflops=flops / 1e12, network_gbps=_NETWORK.value,
        price_per_hour=_PRICE.value, devices=_DEVICES.value,
        notes=_NOTES.value or f"measured by launch/profile.py with {_CONFIG.value.name} shapes",
        measurements=table)
    print(f"{'stage':16} {'size':>14} {'ms':>10}")
    for r in table["tier1_step"]:
      print(f"{'tier1 step':16} {'B=' + str(r['batch']):>14} {r['seconds'] * 1e3:10.3f}")
    for r in table["prefill"]:
      print(f"{'prefill':16} {'T=' + str(r['tokens']):>14} {r['seconds'] * 1e3:10.3f}")
    for r in table["tier2_attention"]:
      print(f"{'tier2 attention':16} {'B=%d C=%d' % (r['batch'], r['context']):>14} {r['seconds'] * 1e3:10.3f}")
    for r in table["transfer"]:
      print(f"{'transfer':16} {str(r['bytes']) + ' B':>14} {r['seconds'] * 1e3:10.3f}")
    print(f"fit: {bw / 1e9:.1f} GB/s, {flops / 1e12:.2f} TFLOP/s ({_KIND.value})")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  profiles.save(profile, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
