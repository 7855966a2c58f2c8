"""What a user asks for and what they get back: the engine's public data types (vLLM-shaped)."""

from __future__ import annotations

import dataclasses
import math

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length reached


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling; temperature 0 is greedy. top_k 0 and top_p 1.0 switch those filters off."""

  max_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None  # None: derived from the engine seed and the request's index
  stop: tuple[str, ...] = ()  # stop strings; the returned text ends before the first one
  stop_token_ids: tuple[int, ...] = ()  # extra ids that end the request like EOS (kept in token_ids)
  ignore_eos: bool = False

  def __post_init__(self):
    if isinstance(self.stop, str):  # a single stop string, not its characters
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens}: expected >= 1")
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: expected a finite value >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: expected >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")


@dataclasses.dataclass
class RequestOutput:
  """One finished request. Times are seconds, measured from the request's admission to the engine."""

  request_id: str
  prompt_token_ids: list[int]
  token_ids: list[int]
  text: str
  finish_reason: str  # FINISH_STOP or FINISH_LENGTH
  ttft_s: float  # time to first token
  decode_time_s: float  # first token to last token
  token_times_s: list[float] = dataclasses.field(default_factory=list)  # when each token was produced

  @property
  def time_between_tokens_s(self) -> list[float]:
    return token_gaps(self.token_times_s)

  @property
  def e2e_s(self) -> float:
    """Arrival (the run's start) to the last token."""
    return self.ttft_s + self.decode_time_s


def token_gaps(token_times_s: list[float]) -> list[float]:
  """Time between consecutive tokens."""
  return [b - a for a, b in zip(token_times_s, token_times_s[1:])]
