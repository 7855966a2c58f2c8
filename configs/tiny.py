"""The built-in tiny model: random weights built in seconds, no download (README, tests, CI)."""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "tiny"
  c.dtype = "float32"
  c.engine.max_num_seqs = 8
  c.engine.kv_cache_gb = 0.01
  c.engine.max_model_len = 256
  c.engine.max_prefill_tokens = 256
  c.sampling.max_tokens = 16
  c.tier2.kv_dtype = "float32"
  c.tier2.kv_cache_gb = 0.01
  return c
