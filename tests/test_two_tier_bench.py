"""benchmarks/two_tier.py end to end (smoke: tiny model on the CPU, real tier-2 servers), stacks sampled."""

import json
import os
import subprocess
import sys

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
  main = row["stacks"]["MainThread"]
  assert main and all(0 < fraction <= 1 and frames for fraction, frames in main)
  assert any("pipelined.py" in frames for _, frames in main)
