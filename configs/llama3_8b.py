"""Llama-3-8B (GQA, llama3 rope): --config.checkpoint=/path for real weights; else random of this shape."""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "llama3_8b"
  c.model.vocab_size = 128256
  c.model.hidden_size = 4096
  c.model.intermediate_size = 14336
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.rope_theta = 500000.0
  c.model.rope_scaling = ("llama3", 8.0, 1.0, 4.0, 8192)
  c.model.rms_norm_eps = 1e-5
  c.model.max_position_embeddings = 8192
  c.engine.max_num_seqs = 256
  c.engine.max_model_len = 8192
  c.engine.max_prefill_tokens = 8192
  c.engine.layer_loop = "unrolled"
  c.engine.decode_steps_per_call = 8
  return c
