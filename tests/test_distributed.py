"""config.distributed: validation names the key, the default joins nothing, and two real processes
on loopback form one JAX runtime through glinthawk_jax.distributed.initialize."""

import json
import socket
import subprocess
import sys

import pytest

from configs import tiny
from glinthawk_jax import distributed
from glinthawk_jax.config import ConfigError, REPO_ROOT, validate

# Each process joins, then prints what JAX sees; a barrier proves the two talk to each other.
_WORKER = """
import json, sys
from configs import tiny
from glinthawk_jax import distributed
c = tiny.get_config()
c.distributed.update(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                     initialization_timeout_s=60)
joined = distributed.initialize(c)
import jax
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("both joined")
tokens = None
if sys.argv[3] == "generate":  # the engine on this process's device, inside the joined runtime
  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams
  c.placement = "local"
  tokens = Engine(c).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
print(json.dumps(dict(joined=joined, index=jax.process_index(), count=jax.process_count(),
                      local=jax.local_device_count(), devices=jax.device_count(), tokens=tokens)))
"""


@pytest.mark.parametrize("changes, message", [
    (dict(coordinator_address="node0"), "distributed.coordinator_address='node0': expected host:port"),
    (dict(num_processes=0), "distributed.num_processes=0"),
    (dict(coordinator_address="node0:1234", num_processes=2, process_id=2), "distributed.process_id=2"),
    (dict(num_processes=2), "distributed.num_processes=2 needs distributed.coordinator_address"),
    (dict(local_device_ids="0,gpu1"), "distributed.local_device_ids='0,gpu1'"),
    (dict(initialization_timeout_s=0), "distributed.initialization_timeout_s=0"),
])
def test_bad_values_name_the_key(changes, message):
  config = tiny.get_config()
  config.distributed.update(changes)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    validate(config)


def test_the_default_joins_nothing():
  config = tiny.get_config()
  validate(config)
  assert distributed.initialize(config) is False
  import jax  # noqa: PLC0415
  assert jax.process_count() == 1


def _run_two_processes(mode: str) -> list[dict]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), mode], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    results = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-2000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in results]


def test_two_processes_form_one_runtime():
  seen = _run_two_processes("join")
  assert sorted(s["index"] for s in seen) == [0, 1]
  for s in seen:
    assert s["joined"] and s["count"] == 2 and s["devices"] == 2 * s["local"]


@pytest.mark.slow
def test_the_engine_runs_in_each_joined_process():
  """Today each tier-1 process runs the whole model on its own device (docs/MULTI_HOST.md)."""
  seen = _run_two_processes("generate")
  assert seen[0]["tokens"] == seen[1]["tokens"] and len(seen[0]["tokens"]) == 4
