"""Hardware profiles: the shipped datasheet files, validation that names the key, JSON round trip."""

import glob
import json
import os
import subprocess
import sys

import pytest

from glinthawk_jax.sim import profiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "hardware", "*.json"))))
def test_shipped_profiles_load_and_say_where_figures_come_from(path):
  p = profiles.load(path)
  assert p.source == "datasheet" and len(p.notes) > 50


def test_t4_profile_is_the_datasheet():
  p = profiles.load(os.path.join(ROOT, "configs", "hardware", "t4.json"))
  assert (p.memory_gb, p.mem_bandwidth_gbs, p.peak_tflops) == (16.0, 320.0, 65.0)
  assert p.bandwidth == pytest.approx(320e9 * p.bandwidth_efficiency)


def test_bad_values_name_the_key(tmp_path):
  good = json.loads(open(os.path.join(ROOT, "configs", "hardware", "t4.json")).read())
  for key, value, match in (("source", "guess", "source='guess'"), ("memory_gb", 0, "memory_gb=0"),
                            ("bandwidth_efficiency", 1.5, "bandwidth_efficiency=1.5"),
                            ("bogus", 1, "unknown keys \\['bogus'\\]")):
    path = tmp_path / f"{key}.json"
    path.write_text(json.dumps(dict(good, **{key: value})))
    with pytest.raises(profiles.ProfileError, match=match):
      profiles.load(str(path))


def test_save_load_round_trip(tmp_path):
  p = profiles.HardwareProfile("x", "cpu", "measured", 64, 20, 1, 10, 0.5, measurements={"a": [1, 2]})
  profiles.save(p, str(tmp_path / "x.json"))
  assert profiles.load(str(tmp_path / "x.json")) == p


def test_profile_cli_writes_a_datasheet_profile(tmp_path):
  out = tmp_path / "ds.json"
  proc = subprocess.run(
      [sys.executable, "launch/profile.py", "--datasheet", "--name=l4", "--memory_gb=24",
       "--mem_bandwidth_gbs=300", "--peak_tflops=121", "--price_per_hour=0.8", "--notes=L4 datasheet",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  p = profiles.load(str(out))
  assert (p.source, p.name, p.memory_gb, p.peak_tflops) == ("datasheet", "l4", 24.0, 121.0)
