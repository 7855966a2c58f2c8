"""Profiler: writes a hardware profile JSON, measured on this machine or from datasheet figures.

  # Measured: times one decoder layer's dense work by batch and prefill length on the default
  # JAX device, decode attention by batch and context on the CPU device, host<->device copies, and
  # (--two_tier, default) the pipelined two-tier path's stages with real tier-2 servers
  # (glinthawk_jax/sim/measure.py): per-layer step split into dispatch / compute / copy, RPC send,
  # round trip and tier-2 service by micro-batch rows and context (spread over the shards, and all
  # on one shard with every shard busy), bulk prefill steps (dispatch / compute / copy / gather) and appends.
  python launch/profile.py --config=configs/llama2_7b.py --price_per_hour=4.0 --rows=8,16,32 \
      --contexts=128,160 --prefill=16x128 --out=out/profile.json
  python launch/profile.py --config=configs/tiny.py --tiny --out=/tmp/profile.json   # seconds, CPU
  # Datasheet (hardware we do not have): the figures as given, marked "source": "datasheet".
  python launch/profile.py --datasheet --name=t4_vm --kind=accelerator --memory_gb=16 \
      --mem_bandwidth_gbs=320 --peak_tflops=65 --network_gbps=8 --price_per_hour=0.526 \
      --notes="NVIDIA T4 datasheet; Azure NC4as_T4_v3 list price" --out=configs/hardware/t4.json

A measured profile stores every timing under `measurements` and fits `mem_bandwidth_gbs` (best
weight-streaming rate of a small-batch step) and `peak_tflops` (best FLOP rate) with efficiencies
of 1.0, since they are achieved figures. `--kind=cpu` fits the CPU's figures from the attention
table instead (tier 2). benchmarks/calibrate_sim.py runs the same measurements and checks the
simulator against real two-tier runs (docs/SIMULATOR.md).
"""

import os
import sys

# Replace (not prepend) launch/ on the path: this file would otherwise shadow the stdlib `profile`.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glinthawk_jax.sim import measure, profiles  # noqa: E402

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
_TWO_TIER = flags.DEFINE_bool("two_tier", True, "Also time the pipelined two-tier path with real tier-2 "
                              "servers (config.tier2: spawned or addresses): steps, RPCs, appends.")
_ROWS = flags.DEFINE_list("rows", ["1", "2", "4", "8"], "Micro-batch rows for the two-tier tables.")
_CONTEXTS = flags.DEFINE_list("contexts", ["16", "64"], "Tier-2 contexts (cached tokens) for the RPC table.")
_PREFILL = flags.DEFINE_list("prefill", ["8x16"], "Bulk prefill chunks ROWSxTOKENS for the two-tier tables.")


def main(argv):
  del argv
  from glinthawk_jax.config import model_config
  if _DATASHEET.value:
    profile = profiles.HardwareProfile(
        name=_NAME.value or "datasheet", kind=_KIND.value, source="datasheet", memory_gb=_MEMORY.value,
        mem_bandwidth_gbs=_BANDWIDTH.value, peak_tflops=_TFLOPS.value, network_gbps=_NETWORK.value,
        price_per_hour=_PRICE.value, devices=_DEVICES.value, notes=_NOTES.value)
  else:
    config = _CONFIG.value
    two_tier, servers = None, None
    if _TWO_TIER.value:
      from glinthawk_jax.tier2_launch import Tier2Servers
      servers = Tier2Servers(config, model_config(config))
      two_tier = dict(client=servers.client, rows=[int(r) for r in _ROWS.value], reps=5,
                      contexts=[int(c) for c in _CONTEXTS.value], queue=4 if _TINY.value else 1,
                      prefill=[tuple(int(x) for x in p.split("x")) for p in _PREFILL.value],
                      dtype=measure.wire_dtype(config.dtype))
    try:
      profile = measure.measured_profile(
          config, _KIND.value, _TINY.value, two_tier, name=_NAME.value or "", memory_gb=_MEMORY.value,
          network_gbps=_NETWORK.value, price_per_hour=_PRICE.value, devices=_DEVICES.value,
          notes=_NOTES.value, command=" ".join(sys.argv))
    finally:
      if servers is not None:
        servers.close()
    measure.print_tables(profile.measurements)
    print(f"fit: {profile.mem_bandwidth_gbs:.1f} GB/s, {profile.peak_tflops:.2f} TFLOP/s ({_KIND.value})")
  profiles.save(profile, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
