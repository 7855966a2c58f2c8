"""Output JSONL: lines flushed per request; a torn last line from a killed run is dropped on resume."""

import json

import pytest

from glinthawk_jax.job_output import OutputFileError, OutputWriter, finished_ids
from glinthawk_jax.requests import RequestOutput


def make_output(rid):
  return RequestOutput(rid, [1, 2], [3, 4], "text", "length", 0.1, 0.2, [0.1, 0.3])


def test_each_line_is_on_disk_before_close(tmp_path):
  path = tmp_path / "out.jsonl"
  writer = OutputWriter(str(path))
  writer.write(make_output("a"))
  record = json.loads(path.read_text())  # readable while the writer is still open
  assert record["id"] == "a" and record["token_ids"] == [3, 4] and record["finish_reason"] == "length"
  assert record["num_output_tokens"] == 2 and record["ttft_s"] == 0.1
  writer.close()


def test_finished_ids_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "out.jsonl"
  with OutputWriter(str(path)) as w:
    w.write(make_output("a"))
    w.write(make_output("b"))
  whole = path.read_bytes()
  path.write_bytes(whole + b'{"id": "c", "text": "hal')
  assert finished_ids(str(path)) == {"a", "b"}
  assert path.read_bytes() == whole  # the torn line is gone, so appending stays valid JSONL


def test_finished_ids_of_a_missing_file_is_empty(tmp_path):
  assert finished_ids(str(tmp_path / "none.jsonl")) == set()


def test_blank_lines_are_kept_and_a_bad_middle_line_is_an_error(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_text('{"id": "a"}\n\n{"id": "b"}\n')
  assert finished_ids(str(path)) == {"a", "b"}
  assert path.read_text() == '{"id": "a"}\n\n{"id": "b"}\n'
  path.write_text('{"id": "a"}\nedited by hand\n{"id": "b"}\n')
  with pytest.raises(OutputFileError, match="line 2"):
    finished_ids(str(path))
  assert path.read_text() == '{"id": "a"}\nedited by hand\n{"id": "b"}\n'  # nothing cut
