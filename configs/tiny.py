"""The built-in tiny model: random weights built in seconds, no download (README, tests, CI).

Its default placement is pipelined: the job starts two local tier-2 processes and stops them at exit.
`--config.placement=local` keeps attention on tier 1. Splitwise workers (launch/worker.py) take
`--config.placement=local --config.role=prefill|decode|colocated`; a decode worker with the pipelined
placement is the combined mode (received K,V on tier-2 servers, docs/SPLITWISE.md).
"""

from glinthawk_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "tiny"
  c.dtype = "float32"
  c.placement = "pipelined"  # two tiers: tier 1 starts tier2.spawn local tier-2 servers itself
  c.engine.max_num_seqs = 8
  c.engine.kv_cache_gb = 0.01
  c.engine.max_model_len = 256
  c.engine.max_prefill_tokens = 256
  c.sampling.max_tokens = 16
  c.tier2.kv_dtype = "float32"
  c.tier2.kv_cache_gb = 0.01
  return c
