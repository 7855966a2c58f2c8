"""benchmarks/calibrate_sim.py --replay: saved measured runs predicted again from a saved profile."""

import json

import pytest

from benchmarks import calibrate_sim
from glinthawk_jax.sim import generation, profiles


def _profile(path):
  rpc = [dict(rows=r, context=c, send_s=1e-3, rtt_s=4e-3, service_s=2e-3, queued_s=2e-3)
         for r in (4, 8) for c in (16, 32)]
  tables = {"tier1_step": [dict(rows=r, step_s=1e-3, first_s=1e-3, last_s=1e-3) for r in (4, 8)],
            "bulk_step": [dict(rows=8, tokens=16, step_s=5e-3)], "rpc": rpc,
            "append": [dict(tokens=t, send_s=1e-3, rtt_s=3e-3, service_s=1e-3) for t in (64, 256)],
            "control_rtt_s": 1e-3,
            "runner": [dict(rows=r, context=24, step_s=1e-3, host_s=1e-3, remote_s=3e-3 + 1e-4 * r) for r in (4, 8)]}
  profiles.save(profiles.HardwareProfile(name="test", kind="accelerator", source="measured", memory_gb=1,
                                         mem_bandwidth_gbs=1, peak_tflops=1, network_gbps=1, price_per_hour=0,
                                         measurements={"two_tier": tables}), path)
  return tables


def test_replay_predicts_the_saved_runs_from_the_saved_profile(tmp_path):
  meas = _profile(tmp_path / "profile.json")
  shapes = [(8, 16, 8, 1, 0.0), (16, 16, 8, 2, 5.0)]
  runs = [{"shape": dict(zip(("batch", "prompt_len", "output_len", "in_flight", "delay_ms"), s)),
           "measured": {"output_tok_s": 100.0 * (i + 1), "prefill_s": 0.1, "decode_s": 0.2}}
          for i, s in enumerate(shapes)]
  saved = {"device": "cpu", "date": "2026-11-29", "command": "x", "num_layers": 3, "profile": "elsewhere.json",
           "args": {"decode_steps": 4, "spawn": 2, "tolerance": 0.15, "model": "tiny"}, "runs": runs}
  (tmp_path / "runs.json").write_text(json.dumps(saved))
  out = tmp_path / "replay.json"
  calibrate_sim.main([f"--replay={tmp_path / 'runs.json'}", f"--profile={tmp_path / 'profile.json'}", f"--out={out}"])
  result = json.loads(out.read_text())
  assert result["replay_of"]["results"] == str(tmp_path / "runs.json") and result["device"] == "cpu"
  for i, (r, s) in enumerate(zip(result["runs"], shapes)):
    run = generation.RunShape(*s, decode_steps=4, max_prefill_tokens=16 * min(s[0], 16), shards=2)
    want = generation.predict(meas, 3, run)["output_tok_s"]
    assert r["simulated"]["output_tok_s"] == pytest.approx(want, rel=1e-12)
    assert r["error"] == pytest.approx(want / (100.0 * (i + 1)) - 1, rel=1e-12)


def test_profile_flag_needs_replay(capsys):
  with pytest.raises(SystemExit):
    calibrate_sim.main(["--profile=p.json"])
  assert "--profile: only with --replay" in capsys.readouterr().err


def test_base_config_builds_the_measured_runs_config():
  args = calibrate_sim.parse_args(["--split=shards"])
  c = calibrate_sim.base_config(args)
  assert c.placement == "pipelined" and c.tier2.split == "shards"
  assert c.engine.max_model_len >= max(s[1] + s[2] for s in args.shapes)
