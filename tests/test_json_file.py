"""write_json: the folder made, the indentation and ending asked for, bytes json.dumps would give."""

import json

from glinthawk_jax.json_file import write_json


def test_write_json_makes_the_folder_and_writes_indented_json(tmp_path):
  obj = {"a": [1, 2.5], "b": {"c": None}}
  path = tmp_path / "x" / "y" / "r.json"
  write_json(str(path), obj)
  assert path.read_text() == json.dumps(obj, indent=2)
  write_json(str(path), obj, indent=1, end="\n")  # overwrites
  assert path.read_text() == json.dumps(obj, indent=1) + "\n"
