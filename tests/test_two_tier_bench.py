"""benchmarks/two_tier.py end to end (smoke: tiny model on the CPU, real tier-2 servers), stacks sampled."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_tier_smoke_samples_tier1_stacks(tmp_path):
  out = tmp_path / "two_tier.json"
  subprocess.run([sys.executable, "benchmarks/two_tier.py", "--smoke", "--shapes", "short", "--placements",
                  "pipelined", "--splits", "spread", "--delays", "", "--sample_stacks", "--out", str(out)],
                 cwd=REPO, check=True, timeout=300, capture_output=True)
  (row,) = json.loads(out.read_text())["runs"]
  assert row["placement"] == "pipelined" and row["decode_tok_s"] > 0 and 0 < row["efficiency"] <= 1.5
  # 2 servers, every micro-batch spans both: its replies arrive apart, and each is readied for the next step
  assert 0 < row["reply_spread_ms"] < row["mean_rtt_ms"] and 0 < row["reply_ms"] < row["mean_rtt_ms"]
  # shared memory with loopback servers: their send times
  assert 0 < row["reply_lag_ms"] < row["mean_rtt_ms"] and 0 < row["server_spread_ms"] < row["mean_rtt_ms"]
  assert len(row["server_lateness_ms"]) == 2 and sum(row["server_lateness_ms"]) == \
      pytest.approx(row["server_spread_ms"], rel=0.01, abs=0.002)  # 2 servers: one is first, the other late by the spread
  assert 0 < row["reply_spread_p50_ms"] <= row["reply_spread_p90_ms"] <= row["reply_spread_p99_ms"]
  assert 0 < row["server_spread_p50_ms"] <= row["server_spread_p99_ms"]
  main = row["stacks"]["MainThread"]
  assert main and all(0 < fraction <= 1 and frames for fraction, frames in main)
  assert any("pipelined.py" in frames for _, frames in main)


def test_tier1_dispatch_times_every_host_copy_mode(tmp_path):
  out = tmp_path / "t1.json"
  subprocess.run([sys.executable, "benchmarks/tier1_dispatch.py", "--model", "tiny", "--dtype", "float32",
                  "--rows", "4", "--iters", "3", "--out", str(out)],
                 cwd=REPO, check=True, timeout=300, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  results = json.loads(out.read_text())
  assert [m["host_copy"] for m in results["modes"]] == ["fused", "pinned", "pageable"]
  assert all(m["launch_us"] > 0 and m["step_us"] > 0 and m["device_pace_us"] > 0 for m in results["modes"])
  assert results["reply_device_put_us"] > 0 and results["modes"][0]["qkv_bytes"] == 4 * (4 + 2 * 2) * 16 * 4


def test_the_long_shapes_read_64_and_128_gib_of_kv_a_step_on_both_models():
  import importlib

  from benchmarks import two_tier
  from glinthawk_jax.config import model_config

  args = two_tier.parse_args(["--plan", "--spawn", "8"])
  for name, contexts in (("llama2_7b", {"long": 512, "xlong": 1024}), ("llama3_8b", {"long": 2048, "xlong": 4096})):
    model = model_config(importlib.import_module(f"configs.{name}").get_config())
    for shape_name, context in contexts.items():
      s = two_tier.shape(args, shape_name, model)
      assert s["prompt"] + 32 == context and s["batch"] == 256
      assert s["batch"] * context * two_tier.kv_bytes_per_token(model, "bfloat16") == \
          two_tier.LONG_KV_GIB[shape_name] * 2**30
  assert two_tier.shape(two_tier.parse_args(["--plan", "--spawn", "7"]), "long", model)["batch"] == 252
  long_only = two_tier.parse_args(["--long_context", "1024"])
  assert two_tier.shape(long_only, "long", model)["prompt"] == 1024 - 32
  assert two_tier.shape(long_only, "xlong", model)["prompt"] == 4096 - 32


def test_the_plan_keeps_callback_to_short_and_local_off_xlong():
  from benchmarks import two_tier

  runs = two_tier.plan(two_tier.parse_args(["--plan", "--models", "llama2_7b", "--delays", ""]))
  placements = {(shape_name, p) for _, shape_name, p, *_ in runs}
  assert placements == {("short", "local"), ("short", "callback"), ("short", "pipelined"), ("long", "local"),
                        ("long", "pipelined"), ("xlong", "pipelined")}


def test_a_run_whose_tier2_pools_exceed_the_host_ram_cap_is_skipped(tmp_path):
  out = tmp_path / "two_tier.json"
  subprocess.run([sys.executable, "benchmarks/two_tier.py", "--smoke", "--shapes", "xlong", "--placements",
                  "local,pipelined", "--splits", "spread", "--delays", "", "--host_ram_gb", "0.001", "--out", str(out)],
                 cwd=REPO, check=True, timeout=300, capture_output=True)
  results = json.loads(out.read_text())
  assert results["runs"] == [] and len(results["skipped"]) == 1  # local is not planned on xlong
  assert "tier-2 pools need" in results["skipped"][0] and "--host_ram_gb 0" in results["skipped"][0]


@pytest.mark.parametrize("flags", [["--long_context", "1000"], ["--long_context", "32"], ["--host_ram_gb", "-1"]])
def test_bad_shape_flags_are_refused_by_name(flags, capsys):
  from benchmarks import two_tier

  with pytest.raises(SystemExit):
    two_tier.parse_args(["--plan"] + flags)
  assert flags[0] in capsys.readouterr().err
