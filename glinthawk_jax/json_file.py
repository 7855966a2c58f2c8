"""Writing a JSON file: a benchmark's or launcher's report, a hardware profile, a checkpoint's config."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, indent: int = 2, end: str = "") -> None:
  """Writes `obj` to `path` as JSON indented by `indent`, then `end`; makes the file's folder first."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=indent)
    f.write(end)
