"""The offline job's JSONL output: one line per finished request, flushed at once, resumable."""

from __future__ import annotations

import json
import os

from absl import logging

from glinthawk_jax.requests import RequestOutput


def output_record(output: RequestOutput) -> dict:
  """The JSON object written for one finished request."""
  return {
      "id": output.request_id,
      "text": output.text,
      "token_ids": output.token_ids,
      "finish_reason": output.finish_reason,
      "num_prompt_tokens": len(output.prompt_token_ids),
      "num_output_tokens": len(output.token_ids),
      "ttft_s": output.ttft_s,
      "decode_time_s": output.decode_time_s,
  }


class OutputFileError(ValueError):
  """An existing output file has a bad line before its end: resuming would lose or repeat work."""


def finished_ids(path: str) -> set[str]:
  """Ids already in an existing output file.

  Blank lines are skipped. A torn last line (a killed run) is cut off, so its request runs again; a bad
  line anywhere else is an OutputFileError naming it, and the file is left untouched.
  """
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    lines = f.readlines()
  ids, good_bytes = set(), 0
  for number, raw in enumerate(lines, start=1):
    if raw.strip():
      try:
        if not raw.endswith(b"\n"):
          raise ValueError("no newline")
        ids.add(str(json.loads(raw)["id"]))
      except (ValueError, KeyError, TypeError) as e:
        if number < len(lines):
          raise OutputFileError(f"{path}: line {number} is not a finished request ({e}); fix or "
                                "remove it before resuming") from e
        logging.warning("%s: dropping the incomplete last line %d (its request will rerun)", path, number)
        break
    good_bytes += len(raw)
  if good_bytes != os.path.getsize(path):
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
  return ids


class OutputWriter:
  """Appends one line per request and flushes it, so a killed run loses no finished request."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write(self, output: RequestOutput) -> None:
    self._file.write(json.dumps(output_record(output), ensure_ascii=False) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
