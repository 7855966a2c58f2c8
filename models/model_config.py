"""Model dimensions for the Llama family, and their reading from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture or options are outside the Llama family we implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static shape and numerics of a decoder; hashable so jitted functions can close over it."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) or None.
  rope_scaling: tuple | None = None
  rms_norm_eps: float = 1e-5
  attention_bias: bool = False  # Qwen2 puts a bias on q, k and v.
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  sliding_window: int | None = None  # Mistral v0.1; None means full attention.
  dtype: str = "float32"  # parameter and activation dtype: float32, bfloat16 or float16.

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")

  @property
  def kv_bytes_per_token(self) -> int:
    """Bytes of K and V for one token over all layers, at the parameter dtype."""
    itemsize = 4 if self.dtype == "float32" else 2
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

  def param_count(self) -> int:
    e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
    attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.vocab_size * e + self.num_layers * per_layer + e + head

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32") -> "ModelConfig":
    """Reads a Hugging Face config.json dict; raises UnsupportedModelError for anything else."""
    archs = hf.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedModelError(
          f"architecture {archs!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}")
    if hf.get("hidden_act", "silu") != "silu":
      raise UnsupportedModelError(f"hidden_act={hf['hidden_act']!r}: only silu is supported")
    num_heads = hf["num_attention_heads"]
    rope_scaling = _parse_rope_scaling(hf)
    is_qwen2 = archs[0] == "Qwen2ForCausalLM"
    window = hf.get("sliding_window")
    if is_qwen2 and not hf.get("use_sliding_window", False):
      window = None
    rope_params = hf.get("rope_parameters") or {}
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=bool(hf.get("attention_bias", is_qwen2)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=window,
        dtype=dtype,
    )


def _parse_rope_scaling(hf: Mapping[str, Any]) -> tuple | None:
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return None
  if kind != "llama3":
    raise UnsupportedModelError(f"rope_scaling type {kind!r}: only 'llama3' is supported")
  return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
          float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
