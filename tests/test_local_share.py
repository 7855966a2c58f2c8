"""local_attention_fraction against real tier-2 processes on loopback (tiny GQA model, fp32): some
sequences attend from tier 1's paged cache, the others on tier 2, and greedy tokens equal placement
local's; preempted local sequences free their pages; a killed shard loses only tier-2 sequences."""

import math
import re

import pytest

from glinthawk_jax.config import ConfigError, model_config, validate
from glinthawk_jax.engine import Engine
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.tier2_client import Tier2Client
from tests.test_two_tier import (GREEDY, _config, _pages_in_use, kill_at_first_output, local_tokens,  # noqa: F401
                                 own_servers, servers)  # noqa: F401 (fixtures)


def _tokens_served(addresses):
  with Tier2Client.for_model(addresses.split(","), model_config(_config())) as client:
    return sum(row["tokens_served"] for row in client.stats())


def _shared(placement, addresses, fraction, **engine):
  c = _config(placement, addresses, in_flight=2)
  c.local_attention_fraction = fraction
  c.engine.update(engine)
  return c


@pytest.mark.parametrize("placement,fraction,host_copy", [("pipelined", 0.5, "pageable"), ("pipelined", 0.25, "pinned"),
                                                          ("pipelined", 0.5, "fused"), ("callback", 0.5, "fused")])
def test_shared_greedy_tokens_match_local_and_use_both_sides(servers, local_tokens, placement, fraction, host_copy):
  prompts, want = local_tokens
  served_before = _tokens_served(servers)
  c = _shared(placement, servers, fraction)
  c.tier2.host_copy = host_copy  # pipelined's local attention still reads the device's q, k, v; callback ignores it
  with Engine(c) as engine:
    got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    stats = engine.stats
  assert got == want
  assert stats.num_local_admissions > 0 and stats.num_tier2_admissions > 0
  assert stats.num_local_pages > 0
  assert _tokens_served(servers) > served_before
  assert _pages_in_use(servers) == [0, 0, 0]  # tier-2 sequences released their KV


def test_fraction_one_keeps_every_sequence_local(servers, local_tokens):
  prompts, want = local_tokens
  served_before = _tokens_served(servers)
  with Engine(_shared("pipelined", servers, 1.0)) as engine:
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want
    assert (engine.stats.num_local_admissions, engine.stats.num_tier2_admissions) == (len(prompts), 0)
  assert _tokens_served(servers) == served_before  # tier 2 never attended


def test_a_small_local_pool_preempts_local_sequences_which_free_their_pages(servers, local_tokens):
  """26 local pages of 4 tokens, all 4 slots local at up to 64 tokens need 64: local sequences are
  preempted, and the run only completes if their pages come back."""
  prompts, want = local_tokens
  with Engine(_shared("pipelined", servers, 1.0, kv_cache_gb=5e-5)) as engine:
    assert engine.num_local_pages == 26
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want
    assert engine.stats.num_preemptions > 0
    assert engine.stats.num_local_admissions > len(prompts)  # preempted ones admitted again


def test_a_dead_shard_leaves_local_sequences_alone(own_servers, local_tokens):  # noqa: F811
  """Request 0 (local) stops after 2 tokens and its output kills shard 1 while requests 1-3 are mid-way:
  only shard 1's sequence is prefilled again (one more admission), the local ones go on, tokens match."""
  prompts, want = local_tokens
  sampling = [SamplingParams(max_tokens=2, ignore_eos=True)] + [GREEDY] * (len(prompts) - 1)
  with Engine(_shared("pipelined", ",".join(p.address for p in own_servers), 0.25)) as engine:
    got = engine.generate(prompts, sampling, on_output=kill_at_first_output(own_servers[1:], []))
    stats = engine.stats
  assert [o.token_ids for o in got] == [want[0][:2]] + want[1:]
  assert stats.num_tier2_failovers == 1 and stats.num_preemptions == 0
  assert stats.num_local_admissions > 0
  assert stats.num_local_admissions + stats.num_tier2_admissions == len(prompts) + 1


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_fraction_outside_zero_one_is_rejected(value):
  c = _shared("pipelined", "", value)
  with pytest.raises(ConfigError, match=re.escape(f"local_attention_fraction={value!r}: expected a number in [0, 1]")):
    validate(c)


def test_local_share_with_the_local_placement_is_rejected():
  c = _shared("local", "", 0.5)
  with pytest.raises(ConfigError, match="local_attention_fraction=0.5 with placement='local'"):
    validate(c)


def test_pipelined_local_share_rejects_the_pallas_kernel():
  c = _shared("pipelined", "", 0.5)
  c.engine.update(dict(decode_attention="pallas", layer_loop="unrolled"))
  with pytest.raises(ConfigError, match="local_attention_fraction > 0 with placement='pipelined'"):
    validate(c)
