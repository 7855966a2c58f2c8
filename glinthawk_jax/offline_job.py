"""The offline batch job: JSONL prompts in, JSONL outputs and a summary JSON out; resumable."""

from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from glinthawk_jax import config as config_lib
from glinthawk_jax.builtin_prompts import builtin_requests
from glinthawk_jax.job_input import InputError, parse_requests, read_jsonl
from glinthawk_jax.job_output import OutputWriter, finished_ids
from glinthawk_jax.json_file import write_json
from glinthawk_jax.metrics import summarize

ON_BAD_INPUT = ("fail", "skip")


def run_offline_job(config: ml_collections.ConfigDict, input_path: str | None, output_path: str,
                    summary_path: str | None = None, on_bad_input: str = "fail",
                    progress: bool = True) -> dict:
  """Runs every request of `input_path` (or the built-in prompts) not already in `output_path`.

  With config.distributed.num_processes = N > 1, this process runs its share: requests
  process_id, process_id + N, ... of the input (each process writes its own output file).

  Each output line is flushed as its request finishes, so a killed run loses no finished request and a
  rerun with the same output path does only what is left. Returns the summary (also written as JSON).
  """
  from glinthawk_jax.engine import Engine  # heavy (jax); imported when a job actually runs
  from glinthawk_jax.tokenizer import load_tokenizer

  if on_bad_input not in ON_BAD_INPUT:
    raise ValueError(f"on_bad_input={on_bad_input!r}: expected one of {ON_BAD_INPUT}")
  config_lib.validate(config)
  tokenizer = load_tokenizer(config)
  model_config = config_lib.model_config(config)
  lines = read_jsonl(input_path) if input_path else [(0, r) for r in builtin_requests()]
  requests, problems = parse_requests(lines, tokenizer.encode, model_config.vocab_size,
                                      config.engine.max_model_len, config_lib.default_sampling(config))
  source = input_path or "the built-in prompt set"
  if problems:
    listing = "\n".join(f"  {source}: {p}" for p in problems)
    if on_bad_input == "fail":
      raise InputError(f"{len(problems)} bad input line(s); nothing was run "
                       f"(--on_bad_input=skip runs the rest):\n{listing}")
    logging.warning("skipping %d bad input line(s):\n%s", len(problems), listing)

  share = config.distributed
  if share.num_processes > 1:  # tier 1 across hosts: each process runs every num_processes-th request
    requests = requests[share.process_id::share.num_processes]
    logging.info("process %d of %d: %d requests", share.process_id, share.num_processes, len(requests))
  done = finished_ids(output_path)
  pending = [r for r in requests if r.request_id not in done]
  if len(pending) < len(requests):
    logging.info("resuming: %d of %d requests already in %s", len(requests) - len(pending),
                 len(requests), output_path)

  start = time.perf_counter()
  with Engine(config, tokenizer=tokenizer) as engine, OutputWriter(output_path) as writer:
    outputs = engine.generate([r.prompt_token_ids for r in pending], [r.sampling for r in pending],
                              request_ids=[r.request_id for r in pending], on_output=writer.write,
                              progress=progress) if pending else []
  summary = summarize(outputs, time.perf_counter() - start)
  summary.update({
      "config": config.name, "placement": config.placement, "dtype": config.dtype,
      "checkpoint": config.checkpoint or "random weights", "input": source, "output": output_path,
      "process": f"{share.process_id} of {share.num_processes}", "num_bad_input_lines": len(problems),
      "num_resumed_requests": len(requests) - len(pending),
      "engine_stats": engine.stats_dict(),
  })
  summary_path = summary_path or os.path.splitext(output_path)[0] + ".summary.json"
  write_json(summary_path, summary)
  logging.info("wrote %d outputs to %s and the summary to %s", len(outputs), output_path, summary_path)
  return summary
