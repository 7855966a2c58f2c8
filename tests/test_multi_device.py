"""Tier 1 over several devices (glinthawk_jax/sharding.py).

Token equality runs in a subprocess whose JAX sees 4 forced host devices (tests/multi_device_run.py):
JAX reads XLA_FLAGS once, and the default run has started it before this module. Tensor-parallel (2, 4)
and layer-sliced (2, and 2 x tensor-parallel 2) runs must give one device's greedy tokens (fp32, GQA),
for the local and the pipelined placements (slow: with local_attention_fraction too). The in-process tests check validation.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from glinthawk_jax.config import ConfigError, model_config, validate
from glinthawk_jax.sharding import Layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "local tp=1 slices=1"
# The default run keeps to a few compilations (about 40 s of CPU); the slow set covers each feature alone.
CASES = ["local tp=2 slices=1", "local tp=4 slices=1", "local tp=2 slices=2", "pipelined tp=2 slices=2"]
SLOW_CASES = ["local tp=1 slices=2", "pipelined tp=2 slices=1", "pipelined tp=1 slices=2", "callback tp=2 slices=2",
              "pipelined@0.5 tp=2 slices=2", "callback@0.5 tp=1 slices=2"]


def _run(cases: list[str]) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "tests.multi_device_run", *cases], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.splitlines()[-1])


CHECKPOINT = "checkpoint tp=2 slices=2"


@pytest.fixture(scope="module")
def tokens():
  return _run([REFERENCE] + CASES + [CHECKPOINT])


@pytest.mark.parametrize("case", CASES)
def test_multi_device_greedy_tokens_match_one_device(tokens, case):
  assert len(tokens[REFERENCE]) == 3 and all(len(t) == 4 for t in tokens[REFERENCE])
  assert tokens[case] == tokens[REFERENCE]


def test_checkpoint_loads_each_device_its_shard(tokens):
  got = tokens[CHECKPOINT]
  assert got["equal"]  # the same values as loaded onto one device
  assert got["q_proj_spec"] == "P('stage', 'model', None)" and got["q_proj_devices"] == 4
  assert got["q_proj_shard_shape"] == [2, 32, 64]  # [layers 4 / 2 slices, 8 heads x 8 / 2 devices, hidden]


@pytest.mark.slow
def test_each_feature_alone_and_callback_match_one_device():
  got = _run([REFERENCE] + SLOW_CASES)
  for case in SLOW_CASES:
    assert got[case] == got[REFERENCE], case


@pytest.mark.parametrize("key,value,message", [
    ("tensor_parallel", 3, "engine.tensor_parallel=3 does not divide the model's num_heads=4"),
    ("layer_slices", 3, "engine.layer_slices=3 does not divide the model's num_layers=2"),
    ("tensor_parallel", 64, "engine.tensor_parallel=64 x engine.layer_slices=1 = 64 devices; 1 local available"),
])
def test_layout_errors_name_the_key(key, value, message):
  c = tiny.get_config()
  c.engine[key] = value
  if key == "tensor_parallel" and value == 64:
    c.model.update(dict(num_heads=64, num_kv_heads=64, intermediate_size=128))
  with pytest.raises(ConfigError, match=message):
    Layout.from_config(c, model_config(c))


@pytest.mark.parametrize("key,value,message", [
    ("engine.tensor_parallel", 0, "engine.tensor_parallel=0: expected a positive integer"),
    ("tier2.addresses", "127.0.0.1:1,127.0.0.1:2", "tier2.addresses: 1 \";\"-separated groups for "
                                                   "engine.layer_slices=2"),
    ("engine.tensor_parallel", 2, "engine.decode_attention='pallas' runs on one device"),
])
def test_config_validation(key, value, message):
  c = tiny.get_config()
  c.engine.update(dict(layer_slices=2, decode_attention="pallas", layer_loop="unrolled"))
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)
