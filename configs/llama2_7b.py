"""Llama-2-7B: pass --config.checkpoint=/path for real weights; otherwise random weights of this shape.

Splitwise workers: launch/worker.py --config=configs/llama2_7b.py --config.role=prefill|decode.
"""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "llama2_7b"
  c.model.vocab_size = 32000
  c.model.hidden_size = 4096
  c.model.intermediate_size = 11008
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.head_dim = 128
  c.model.rms_norm_eps = 1e-5
  c.model.max_position_embeddings = 4096
  c.engine.max_num_seqs = 256
  c.engine.max_model_len = 4096
  c.engine.max_prefill_tokens = 8192
  c.engine.layer_loop = "unrolled"
  c.engine.decode_steps_per_call = 8
  return c
