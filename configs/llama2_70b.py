"""Llama-2-70B (GQA, 8 KV heads): --config.checkpoint=/path for real weights; else random of this shape."""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "llama2_70b"
  c.model.vocab_size = 32000
  c.model.hidden_size = 8192
  c.model.intermediate_size = 28672
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.rms_norm_eps = 1e-5
  c.model.max_position_embeddings = 4096
  c.engine.max_num_seqs = 256
  c.engine.max_model_len = 4096
  c.engine.max_prefill_tokens = 8192
  return c
