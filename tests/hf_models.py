"""Tiny random Hugging Face models saved to disk: the independent reference the loader and engine match.

`make_hf_model(kind, tmp_path)` returns (checkpoint dir, torch model in eval mode, float32); the dir
also holds the built-in tiny tokenizer as tokenizer.json (eos `</s>` = 2). Weights are
drawn with a large std (norms and biases too), so logits are well separated and greedy decoding has
no near-ties.
"""

from __future__ import annotations

import os
import shutil

import torch
import transformers

from glinthawk_jax.config import TINY_TOKENIZER

KINDS = ("llama_mha", "llama3_gqa", "mistral", "qwen2_tied")
VOCAB_SIZE = 512  # the built-in tiny tokenizer's, which is saved beside the weights

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
               pad_token_id=None)

_CONFIGS = {
    "llama_mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama3_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
                       rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
}


def make_hf_model(kind: str, tmp_path, *, std: float = 0.15, seed: int = 0,
                  max_shard_size: str | None = None, **overrides):
  """Builds, randomizes and saves (safetensors) a tiny model of `kind`; overrides go to its config.

  Returns (path, model). `max_shard_size` (e.g. "20KB") saves a sharded checkpoint with an index.
  """
  config_cls, model_cls, specific = _CONFIGS[kind]
  config = config_cls(**{**_COMMON, **specific, **overrides})
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn_like(p)
      p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
  model.generation_config.eos_token_id = None  # greedy runs always produce max_new_tokens
  path = os.path.join(str(tmp_path), kind)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  shutil.copy(TINY_TOKENIZER, os.path.join(path, "tokenizer.json"))
  return path, model
