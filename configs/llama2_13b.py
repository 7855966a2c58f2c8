"""Llama-2-13B: pass --config.checkpoint=/path for real weights; otherwise random weights of this shape."""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "llama2_13b"
  c.model.vocab_size = 32000
  c.model.hidden_size = 5120
  c.model.intermediate_size = 13824
  c.model.num_layers = 40
  c.model.num_heads = 40
  c.model.num_kv_heads = 40
  c.model.head_dim = 128
  c.model.rms_norm_eps = 1e-5
  c.model.max_position_embeddings = 4096
  c.engine.max_num_seqs = 256
  c.engine.max_model_len = 4096
  c.engine.max_prefill_tokens = 8192
  c.engine.layer_loop = "unrolled"
  c.engine.decode_steps_per_call = 8
  return c
