"""Request arrivals: the Azure LLM inference traces 2023 (data/azure_llm_2023/) or a Poisson process."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os

import numpy as np

from glinthawk_jax.config import REPO_ROOT

AZURE_DIR = os.path.join(REPO_ROOT, "data", "azure_llm_2023")
AZURE_TRACES = {"code": "AzureLLMInferenceTrace_code.csv", "conv": "AzureLLMInferenceTrace_conv.csv"}


@dataclasses.dataclass(frozen=True)
class Request:
  arrival_s: float
  prompt_tokens: int
  output_tokens: int


def load_azure(name: str, limit: int | None = None) -> list[Request]:
  """The `code` or `conv` trace; arrivals in seconds from its first request."""
  if name not in AZURE_TRACES:
    raise ValueError(f"trace {name!r}: expected one of {sorted(AZURE_TRACES)}")
  return load_csv(os.path.join(AZURE_DIR, AZURE_TRACES[name]), limit)


def load_csv(path: str, limit: int | None = None) -> list[Request]:
  """Rows TIMESTAMP,ContextTokens,GeneratedTokens (timestamps with up to 7 fractional digits)."""
  requests, t0 = [], None
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    for line, row in enumerate(reader, start=2):
      try:
        stamp, frac = row["TIMESTAMP"].split(".") if "." in row["TIMESTAMP"] else (row["TIMESTAMP"], "0")
        t = datetime.datetime.fromisoformat(stamp).timestamp() + float("0." + frac)
        prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
      except (KeyError, ValueError) as e:
        raise ValueError(f"{path}:{line}: bad row {row!r}: {e}") from e
      t0 = t if t0 is None else t0
      requests.append(Request(t - t0, max(prompt, 1), max(output, 1)))
      if limit and len(requests) >= limit:
        break
  return requests


def rescale(requests: list[Request], rate: float) -> list[Request]:
  """Same requests and order, arrivals stretched or squeezed to a mean rate of `rate` per second."""
  span = requests[-1].arrival_s - requests[0].arrival_s
  if span <= 0 or rate <= 0:
    raise ValueError(f"rescale: span={span}, rate={rate}: expected both > 0")
  scale = (len(requests) - 1) / rate / span
  return [dataclasses.replace(r, arrival_s=(r.arrival_s - requests[0].arrival_s) * scale) for r in requests]


def poisson(rate: float, n: int, lengths: list[Request] | None = None, prompt_tokens: int = 512,
            output_tokens: int = 128, seed: int = 0) -> list[Request]:
  """`n` Poisson arrivals at `rate`/s; lengths cycle through `lengths` when given, else fixed."""
  rng = np.random.default_rng(seed)
  times = np.cumsum(rng.exponential(1.0 / rate, size=n))
  if lengths:
    return [Request(float(t), lengths[i % len(lengths)].prompt_tokens, lengths[i % len(lengths)].output_tokens)
            for i, t in enumerate(times)]
  return [Request(float(t), prompt_tokens, output_tokens) for t in times]
