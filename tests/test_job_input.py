"""JSONL input validation: every bad-input case gets a message with its line number."""

import json

import pytest

from glinthawk_jax.job_input import InputError, parse_requests, read_jsonl
from glinthawk_jax.requests import SamplingParams

DEFAULT = SamplingParams(max_tokens=8)


def encode(text):
  return [ord(c) % 100 for c in text]


def parse(lines, max_model_len=16):
  return parse_requests(list(enumerate(lines, start=1)), encode, 100, max_model_len, DEFAULT)


def test_good_lines_become_requests_with_sampling_overrides():
  requests, problems = parse([
      json.dumps({"id": "a", "prompt": "hi"}),
      json.dumps({"id": 7, "prompt_token_ids": [1, 2, 3], "temperature": 0.5, "top_k": 4,
                  "stop": "x", "seed": 3, "max_tokens": 2, "ignore_eos": True}),
  ])
  assert problems == []
  assert [r.request_id for r in requests] == ["a", "7"]
  assert requests[0].prompt_token_ids == encode("hi") and requests[0].sampling == DEFAULT
  s = requests[1].sampling
  assert (s.temperature, s.top_k, s.stop, s.seed, s.max_tokens, s.ignore_eos) == (0.5, 4, ("x",), 3, 2, True)


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "hi"', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "hi"}', "'id'"),
    ('{"id": "a"}', "exactly one of"),
    ('{"id": "a", "prompt": "hi", "prompt_token_ids": [1]}', "exactly one of"),
    ('{"id": "a", "prompt": ""}', "empty prompt"),
    ('{"id": "a", "prompt_token_ids": [1, 100]}', "[0, 100)"),
    ('{"id": "a", "prompt": "' + "x" * 16 + '"}', "max_model_len"),
    ('{"id": "a", "prompt": "hi", "temprature": 1}', "unknown field"),
    ('{"id": "a", "prompt": "hi", "top_p": 0}', "top_p"),
    ('{"id": "a", "prompt": "hi", "max_tokens": "3"}', "max_tokens"),
    ('{"id": "a", "prompt": "hi", "stop": [""]}', "stop"),
    ('{"id": "a", "prompt": "hi", "temperature": NaN}', "finite"),
    ('{"id": "a", "prompt": "hi", "stop_token_ids": "ab"}', "stop_token_ids"),
    ('{"id": "a", "prompt": "hi", "stop_token_ids": [100]}', "stop_token_ids"),
])
def test_each_bad_line_is_reported_with_its_line_number(line, message):
  requests, problems = parse([json.dumps({"id": "ok", "prompt": "hi"}), line])
  assert [r.request_id for r in requests] == ["ok"]
  assert len(problems) == 1 and problems[0].line == 2
  assert message in str(problems[0]), str(problems[0])
  assert str(problems[0]).startswith("line 2")


def test_duplicate_id_is_a_problem_and_the_first_wins():
  requests, problems = parse([json.dumps({"id": "a", "prompt": "hi"}),
                              json.dumps({"id": "a", "prompt": "yo"})])
  assert len(requests) == 1 and requests[0].prompt_token_ids == encode("hi")
  assert "duplicate id" in str(problems[0]) and problems[0].line == 2


def test_read_jsonl_skips_blank_lines_and_keeps_numbers(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"}\n')
  assert [n for n, _ in read_jsonl(str(path))] == [1, 3]


def test_a_line_that_is_not_utf8_is_a_problem_not_a_crash(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "\xff"}\n')
  requests, problems = parse_requests(read_jsonl(str(path)), encode, 100, 16, DEFAULT)
  assert [r.request_id for r in requests] == ["1"]
  assert str(problems[0]) == "line 2: not valid UTF-8"


def test_sampling_params_take_one_stop_string_whole():
  assert SamplingParams(stop="zQQ").stop == ("zQQ",)
  with pytest.raises(ValueError, match="non-empty"):
    SamplingParams(stop=("",))
  with pytest.raises(ValueError, match="finite"):
    SamplingParams(temperature=float("nan"))


def test_input_error_is_a_value_error():
  assert issubclass(InputError, ValueError)
