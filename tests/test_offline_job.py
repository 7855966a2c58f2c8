"""The offline job end to end: the launcher in a real process, resume after a kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import tiny
from glinthawk_jax.job_input import InputError
from glinthawk_jax.offline_job import run_offline_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_input(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_output(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def launch(tmp_path, input_path, output_path, *extra):
  cmd = [sys.executable, os.path.join(REPO, "launch", "tier1.py"), "--config=configs/tiny.py",
         f"--input={input_path}", f"--output={output_path}", "--progress=false", *extra]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_run_resumes_and_loses_nothing(tmp_path):
  # One short request finishes early; the long ones keep the run busy, so the kill lands mid-run.
  records = [{"id": "short", "prompt": "hi", "max_tokens": 1, "ignore_eos": True}]
  records += [{"id": f"long-{i}", "prompt": "x" * (i + 1), "max_tokens": 200, "ignore_eos": True}
              for i in range(6)]
  input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  write_input(input_path, records)

  process = launch(tmp_path, input_path, output_path)
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if output_path.exists() and output_path.read_text().count("\n") >= 1:
      break
    time.sleep(0.02)
  assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()
  process.send_signal(signal.SIGKILL)
  process.wait()
  finished_before = {r["id"] for r in read_output(output_path)}
  assert "short" in finished_before and len(finished_before) < len(records)

  rerun = launch(tmp_path, input_path, output_path)
  log, _ = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, log
  outputs = read_output(output_path)
  ids = [r["id"] for r in outputs]
  assert sorted(ids) == sorted(r["id"] for r in records)  # every request exactly once
  assert all(len(r["token_ids"]) == 200 for r in outputs if r["id"] != "short")
  summary = json.loads((tmp_path / "out.summary.json").read_text())
  assert summary["num_resumed_requests"] == len(finished_before)
  assert summary["num_requests"] == len(records) - len(finished_before)
  for key in ("elapsed_time", "total_num_tokens", "requests_per_second", "tokens_per_second",
              "output_tokens_per_second", "ttft_s_p50", "tbt_s_p99"):
    assert key in summary


def test_bad_input_fails_before_running_and_names_the_lines(tmp_path):
  input_path = tmp_path / "in.jsonl"
  input_path.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "yo"}\nnot json\n')
  with pytest.raises(InputError) as error:
    run_offline_job(tiny.get_config(), str(input_path), str(tmp_path / "out.jsonl"), progress=False)
  message = str(error.value)
  assert "line 2 (id 'a'): duplicate id" in message and "line 3: malformed JSON" in message
  assert not (tmp_path / "out.jsonl").exists()


def test_skip_runs_the_good_lines_and_the_launcher_reports_errors(tmp_path):
  input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  too_long = {"id": "long", "prompt_token_ids": [5] * 300}
  write_input(input_path, [{"id": "a", "prompt": "hi", "max_tokens": 3}, too_long])
  failing = launch(tmp_path, input_path, output_path)
  log, _ = failing.communicate(timeout=300)
  assert failing.returncode != 0 and "line 2 (id 'long')" in log and "max_model_len" in log

  summary = run_offline_job(tiny.get_config(), str(input_path), str(output_path),
                            on_bad_input="skip", progress=False)
  assert [r["id"] for r in read_output(output_path)] == ["a"]
  assert summary["num_bad_input_lines"] == 1 and summary["num_requests"] == 1


def test_processes_of_a_multi_host_job_split_the_requests(tmp_path):
  """distributed.num_processes = 2: each process runs every other request; together, each exactly once."""
  records = [{"id": f"r{i}", "prompt_token_ids": [5 + i, 7], "max_tokens": 2} for i in range(5)]
  input_path = tmp_path / "in.jsonl"
  write_input(input_path, records)
  ran = []
  for process in (0, 1):
    c = tiny.get_config()
    c.placement = "local"
    c.distributed.update(coordinator_address="127.0.0.1:1", num_processes=2, process_id=process)
    output_path = tmp_path / f"out-{process}.jsonl"
    summary = run_offline_job(c, str(input_path), str(output_path), progress=False)
    assert summary["process"] == f"{process} of 2"
    ran.append([r["id"] for r in read_output(output_path)])
  assert sorted(ran[0]) == ["r0", "r2", "r4"] and sorted(ran[1]) == ["r1", "r3"]
