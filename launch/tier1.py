"""Tier-1 launcher: runs the offline batch job.

  python launch/tier1.py --config=configs/tiny.py [--config.placement=local|callback|pipelined] \
      [--config.tier2.spawn=2 | --config.tier2.addresses=host:port,...] \
      [--input=prompts.jsonl] [--output=out/outputs.jsonl] [--on_bad_input=fail|skip]

Two-tier placements start config.tier2.spawn local tier-2 servers unless tier2.addresses is set, and
stop them on exit (Ctrl-C and SIGTERM included). With config.distributed.coordinator_address set, the
process first joins a multi-host JAX runtime (docs/MULTI_HOST.md). The offline job is colocated
(config.role); prefill and decode workers run as servers: launch/worker.py, driven by launch/replay.py.
"""

import json
import os
import signal
import sys

# The repo root replaces launch/ on the path, so launch/profile.py cannot shadow the stdlib's profile.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glinthawk_jax import distributed  # noqa: E402
from glinthawk_jax.config import ConfigError, validate  # noqa: E402
from glinthawk_jax.job_input import InputError  # noqa: E402
from glinthawk_jax.job_output import OutputFileError  # noqa: E402
from glinthawk_jax.offline_job import ON_BAD_INPUT, run_offline_job  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config()).")
_INPUT = flags.DEFINE_string("input", None, "JSONL of {id, prompt | prompt_token_ids, sampling fields}; "
                             "default: the built-in prompt set.")
_OUTPUT = flags.DEFINE_string("output", "out/outputs.jsonl", "JSONL of results; existing ids are skipped.")
_SUMMARY = flags.DEFINE_string("summary", None, "Summary JSON path; default: OUTPUT with .summary.json.")
_ON_BAD_INPUT = flags.DEFINE_enum("on_bad_input", "fail", ON_BAD_INPUT,
                                  "fail: stop before running anything; skip: run the good lines.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: stop tier-2 children
  if _CONFIG.value.role in ("prefill", "decode"):
    sys.exit(f"error: role={_CONFIG.value.role!r}: the offline job runs colocated; start prefill and decode "
             "workers with launch/worker.py (or launch/replay.py --workers=prefill,decode)")
  try:
    validate(_CONFIG.value)
    distributed.initialize(_CONFIG.value)
    summary = run_offline_job(_CONFIG.value, _INPUT.value, _OUTPUT.value, _SUMMARY.value,
                              _ON_BAD_INPUT.value, _PROGRESS.value)
  except (ConfigError, InputError, OutputFileError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
