"""Config validation names the bad key; every shipped config loads and gives the expected model."""

import pytest

from configs import llama2_7b, llama3_8b, tiny
from glinthawk_jax.config import ConfigError, model_config, validate


@pytest.mark.parametrize("module, params_billion", [(llama2_7b, 6.74), (llama3_8b, 8.03)])
def test_shipped_configs_have_the_real_parameter_counts(module, params_billion):
  config = module.get_config()
  validate(config)
  assert model_config(config).param_count() / 1e9 == pytest.approx(params_billion, abs=0.01)


@pytest.mark.parametrize("key, value, message", [
    ("placement", "gpu", "placement='gpu': expected one of local, callback, pipelined"),
    ("dtype", "int4", "dtype='int4'"),
    ("engine.page_size", 0, "engine.page_size=0"),
    ("engine.width_buckets_per_octave", 0, "engine.width_buckets_per_octave=0: expected a positive integer"),
    ("engine.kv_cache_memory_fraction", 1.5, "engine.kv_cache_memory_fraction=1.5"),
    ("sampling.top_p", 0.0, "sampling.top_p=0.0"),
    ("checkpoint", "/no/such/dir", "checkpoint='/no/such/dir'"),
    ("role", "router", "role='router': expected one of colocated, prefill, decode"),
    ("role", "prefill", "role='prefill' needs placement='local'"),
    ("splitwise.on_transfer_failure", "retry", "splitwise.on_transfer_failure='retry'"),
    ("splitwise.kv_timeout_s", 0.0, "splitwise.kv_timeout_s=0.0"),
    ("splitwise.send_threads", 0, "splitwise.send_threads=0"),
    ("splitwise.prefills_in_flight", 0, "splitwise.prefills_in_flight=0"),
    ("splitwise.layers_per_call", 0, "splitwise.layers_per_call=0"),
    ("splitwise.prefill_rows", 0, "splitwise.prefill_rows=0"),
    ("tier2.host_copy", "unpinned", "tier2.host_copy='unpinned': expected one of fused, pinned, pageable"),
])
def test_bad_values_name_the_key(key, value, message):
  config = tiny.get_config()
  section = config
  *parents, leaf = key.split(".")
  for p in parents:
    section = section[p]
  section[leaf] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    validate(config)


def test_decode_role_takes_local_or_pipelined_placement():
  config = tiny.get_config()
  config.role = "decode"
  validate(config)  # pipelined: the combined mode
  config.local_attention_fraction = 0.5
  with pytest.raises(ConfigError, match="a combined decode worker keeps every request's KV on tier 2"):
    validate(config)
  config.local_attention_fraction, config.placement = 0.0, "callback"
  with pytest.raises(ConfigError, match="role='decode' needs placement 'local' or 'pipelined'"):
    validate(config)


def test_bad_model_dimensions_are_a_config_error():
  config = tiny.get_config()
  config.model.num_kv_heads = 3
  with pytest.raises(ConfigError, match="num_kv_heads=3"):
    model_config(config)


def test_context_longer_than_the_model_allows_is_a_config_error():
  config = tiny.get_config()
  config.engine.max_model_len = config.model.max_position_embeddings + 1
  with pytest.raises(ConfigError, match="max_position_embeddings"):
    model_config(config)
