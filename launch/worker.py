"""Starts one Splitwise worker: python launch/worker.py --config=configs/tiny.py \
      --config.placement=local --config.role=prefill|decode|colocated --port=0

With --config.role=decode --config.placement=pipelined (the combined mode) the worker keeps received K,V
on tier-2 servers: it spawns config.tier2.spawn of them (or connects to config.tier2.addresses) like
launch/tier1.py, and stops the ones it spawned on exit.

The worker serves the raw-bytes worker service (glinthawk_jax/splitwise/wire.py) on --host:--port and
prints "worker ready on HOST:PORT". Devices are the process's own (set CUDA_VISIBLE_DEVICES per worker).
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root replaces launch/

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config()).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; loopback unless set.")
_PORT = flags.DEFINE_integer("port", 0, "Port; 0 picks a free one (printed on the ready line).")
_EXIT_WITH_PARENT_PID = flags.DEFINE_integer(
    "exit_with_parent_pid", 0, "Exit when this process (the cluster that spawned us) dies; 0 = never.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _EXIT_WITH_PARENT_PID.value:
    from tier2_cpu.lifetime import exit_with_parent  # noqa: PLC0415
    exit_with_parent(_EXIT_WITH_PARENT_PID.value)
  from glinthawk_jax.config import ConfigError, validate  # noqa: PLC0415
  from glinthawk_jax.splitwise.server import serve  # noqa: PLC0415 (imports jax)
  from glinthawk_jax.splitwise.worker import Worker  # noqa: PLC0415

  try:
    validate(_CONFIG.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  worker = Worker(_CONFIG.value)  # placement pipelined: spawns (or connects to) its tier-2 servers
  try:
    serve(worker, _HOST.value, _PORT.value)
  finally:
    worker.close()  # stops spawned tier-2 servers


if __name__ == "__main__":
  app.run(main)
