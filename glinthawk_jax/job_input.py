"""Reading and validating the offline job's JSONL input: one request per line, errors by line number."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Iterable

from glinthawk_jax.requests import SamplingParams

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
KNOWN_FIELDS = {"id", "prompt", "prompt_token_ids"} | SAMPLING_FIELDS


class InputError(ValueError):
  """The job's input has bad lines; the message lists each with its line number."""


@dataclasses.dataclass(frozen=True)
class JobRequest:
  """One validated request of the offline job."""

  request_id: str
  prompt_token_ids: list[int]
  sampling: SamplingParams
  line: int  # 1-based line of the input file (0 for the built-in set)


@dataclasses.dataclass(frozen=True)
class InputProblem:
  line: int
  request_id: str | None
  message: str

  def __str__(self):
    where = f"line {self.line}" + (f" (id {self.request_id!r})" if self.request_id is not None else "")
    return f"{where}: {self.message}"


def read_jsonl(path: str) -> list[tuple[int, str | bytes]]:
  """(line number, text) for each non-blank line; a line that is not UTF-8 stays bytes (a bad line)."""
  lines = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        lines.append((n, raw))
        continue
      if text.strip():
        lines.append((n, text))
  return lines


def parse_requests(
    lines: Iterable[tuple[int, str | dict]],
    encode: Callable[[str], list[int]],
    vocab_size: int,
    max_model_len: int,
    default_sampling: SamplingParams,
) -> tuple[list[JobRequest], list[InputProblem]]:
  """Validates every line; returns the good requests and one problem per bad line.

  A line is bad when it is not a JSON object, lacks an id or a prompt, repeats an id, has an unknown
  field or a bad sampling value, or its prompt leaves no room for one new token in max_model_len.
  """
  requests, problems, seen = [], [], set()
  for line, raw in lines:
    if isinstance(raw, bytes):
      problems.append(InputProblem(line, None, "not valid UTF-8"))
      continue
    try:
      record = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
      problems.append(InputProblem(line, None, f"malformed JSON: {e.msg} at column {e.colno}"))
      continue
    try:
      request = _parse_record(record, line, encode, vocab_size, max_model_len, default_sampling)
    except ValueError as e:
      rid = record.get("id") if isinstance(record, dict) else None
      problems.append(InputProblem(line, None if rid is None else str(rid), str(e)))
      continue
    if request.request_id in seen:
      problems.append(InputProblem(line, request.request_id, "duplicate id"))
      continue
    seen.add(request.request_id)
    requests.append(request)
  return requests, problems


def _parse_record(record, line, encode, vocab_size, max_model_len, default_sampling) -> JobRequest:
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  unknown = sorted(set(record) - KNOWN_FIELDS)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(KNOWN_FIELDS)}")
  if "id" not in record or not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
    raise ValueError("missing or non-string/int 'id'")
  has_text, has_ids = "prompt" in record, "prompt_token_ids" in record
  if has_text == has_ids:
    raise ValueError("needs exactly one of 'prompt' or 'prompt_token_ids'")
  if has_text:
    if not isinstance(record["prompt"], str):
      raise ValueError("'prompt' must be a string")
    token_ids = encode(record["prompt"])
  else:
    token_ids = record["prompt_token_ids"]
    if not isinstance(token_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in token_ids):
      raise ValueError(f"'prompt_token_ids' must be a list of ints in [0, {vocab_size})")
  if not token_ids:
    raise ValueError("empty prompt")
  if len(token_ids) >= max_model_len:
    raise ValueError(f"prompt has {len(token_ids)} tokens; the context (engine.max_model_len) is "
                     f"{max_model_len}, leaving no room for a new token")
  sampling = _sampling(record, default_sampling, vocab_size)
  return JobRequest(str(record["id"]), list(token_ids), sampling, line)


def _sampling(record: dict, default: SamplingParams, vocab_size: int) -> SamplingParams:
  overrides = {k: record[k] for k in SAMPLING_FIELDS if k in record}
  if "stop" in overrides:
    stop = overrides["stop"]
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
      raise ValueError("'stop' must be a non-empty string or a list of them")
    overrides["stop"] = tuple(stop)
  for key in ("max_tokens", "top_k", "seed"):
    if key in overrides and overrides[key] is not None and (
        not isinstance(overrides[key], int) or isinstance(overrides[key], bool)):
      raise ValueError(f"'{key}' must be an integer")
  for key in ("temperature", "top_p"):
    value = overrides.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"'{key}' must be a finite number")
  if "stop_token_ids" in overrides:
    ids = overrides["stop_token_ids"]
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
      raise ValueError(f"'stop_token_ids' must be a list of ints in [0, {vocab_size})")
    overrides["stop_token_ids"] = tuple(ids)
  if "ignore_eos" in overrides and not isinstance(overrides["ignore_eos"], bool):
    raise ValueError("'ignore_eos' must be true or false")
  return dataclasses.replace(default, **overrides)
