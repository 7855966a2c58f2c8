"""launch/profile.py's measured mode on this machine: the profile it writes loads and drives the simulator;
and (slow) the calibrated simulator predicts real two-tier runs (real tier-2 processes)."""

import math
import os

import numpy as np
import pytest

from configs.tiny import get_config
from glinthawk_jax.config import model_config
from glinthawk_jax.sim import generation, measure, profiles
from glinthawk_jax.tier2_launch import Tier2Servers


@pytest.mark.slow  # about 15 s of CPU (jit compiles, a spawned server): over a minute on the shared machine
def test_measured_profile_loads_and_drives_the_simulator(tmp_path):
  config = get_config()
  config.tier2.spawn = 1
  config.tier2.kv_cache_gb = 0.02
  m = model_config(config)
  servers = Tier2Servers(config, m)
  try:
    two_tier = dict(client=servers.client, rows=[2], contexts=[8, 16], prefill=[(2, 16)], queue=4, reps=2,
                    dtype=np.float32)
    profile = measure.measured_profile(config, tiny=True, two_tier=two_tier)
  finally:
    servers.close()
  path = str(tmp_path / "profile.json")
  profiles.save(profile, path)
  loaded = profiles.load(path)
  assert loaded.source == "measured" and loaded.mem_bandwidth_gbs > 0
  meas = loaded.measurements["two_tier"]
  assert {(r["rows"], r["context"]) for r in meas["rpc"]} == {(2, 8), (2, 16)}
  for r in meas["rpc"]:
    assert 0 < r["send_s"] <= r["rtt_s"] and 0 <= r["service_s"] <= r["rtt_s"]
    assert r["bytes_out"] == r["rows"] * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * 4
  for r in meas["tier1_step"]:
    assert r["step_s"] > 0 and r["dispatch_s"] > 0
  run = generation.RunShape(batch=2, prompt_len=9, output_len=8, in_flight=1, decode_steps=4)
  base = generation.predict(meas, m.num_layers, run)
  delayed = generation.predict(meas, m.num_layers, generation.RunShape(2, 9, 8, 1, delay_ms=20, decode_steps=4))
  assert math.isfinite(base["output_tok_s"]) and base["output_tok_s"] > 0
  # Depth 1: every decode round trip (8 tokens x layers) and each layer's append pays the delay once.
  assert delayed["decode_s"] - base["decode_s"] == pytest.approx(8 * m.num_layers * 0.02, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["spread", "shards"])
def test_calibrated_simulator_predicts_real_two_tier_runs(tmp_path, split):
  """benchmarks/calibrate_sim.py on two shapes, micro-batches spread over the shards or grouped by shard.
  On the shared 2-core machine identical runs differ by up to +-30% from one minute to the next (other
  jobs' load), so the bound is 50%, not 15%."""
  from benchmarks import calibrate_sim

  out = tmp_path / "calibrate.json"
  calibrate_sim.main([f"--out={out}", f"--profile_out={tmp_path / 'profile.json'}",
                      "--shapes=8:16:16:1:0,8:16:16:2:0", "--reps=3", f"--split={split}"])
  import json
  results = json.loads(out.read_text())
  assert len(results["runs"]) == 2
  for r in results["runs"]:
    assert abs(r["error"]) <= 0.5, r
  # The host's shared cores, measured beside the runner's depth-1 runs (what bounds spread at depth 2).
  runner = profiles.load(str(tmp_path / "profile.json")).measurements["two_tier"]["runner"]
  for r in runner:
    assert r["cpu_s"] > 0 and r["server_cpu_s"] > 0 and 0 < r["cores"] <= len(os.sched_getaffinity(0)) * 1.05, r
