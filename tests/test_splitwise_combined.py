"""The combined mode (Splitwise x Glinthawk) with real processes on loopback: a prefill worker (paged cache)
ships each layer's K,V to a decode worker with placement pipelined, which appends it to its two tier-2
server processes and decodes there; greedy tokens equal the colocated local engine's, and the tier-2
servers hold no KV afterwards and stop with the worker. Without a prefill worker the decode worker also
prefills (colocated, with the pipelined placement), and a transfer aborted halfway frees its tier-2 KV."""

import socket
import time

import numpy as np

from configs import tiny
from glinthawk_jax.config import model_config
from glinthawk_jax.engine import Engine
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.splitwise.cluster import Cluster, ClusterRequest
from glinthawk_jax.splitwise.wire import encode_kv, params_to_json
from glinthawk_jax.tier2_client import Tier2Client

# Tiny GQA model in float32 (4 heads, 2 KV heads), 3 layers; 4 decode slots for 7 prompts, prompts over
# max_prefill_tokens prefilled in chunks; K,V messages of 16 tokens (several a layer, several connections).
MODEL = {"num_layers": 3}
ENGINE = {"max_num_seqs": 4, "page_size": 4, "max_model_len": 128, "max_prefill_tokens": 32}
OVERRIDES = ([f"--config.model.{k}={v}" for k, v in MODEL.items()] +
             [f"--config.engine.{k}={v}" for k, v in ENGINE.items()] +
             ["--config.splitwise.kv_message_mb=0.001", "--config.tier2.spawn=2", "--config.tier2.cpus=auto"])
LENGTHS = (5, 40, 1, 23, 60, 2, 17)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def _config():
  c = tiny.get_config()
  c.placement = "local"
  c.model.update(MODEL)
  c.engine.update(ENGINE)
  return c


def _refused(address: str) -> bool:
  host, port = address.rsplit(":", 1)
  try:
    socket.create_connection((host, int(port)), timeout=1).close()
  except OSError:
    return True
  return False


def _shards(addresses: list[str]) -> list[dict]:
  with Tier2Client.for_model(addresses, model_config(_config()), transport="grpc") as client:
    return client.stats()


def test_combined_decode_worker_gives_colocated_greedy_tokens_with_kv_on_tier2():
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, n).tolist() for n in LENGTHS]
  want = [o.token_ids for o in Engine(_config()).generate(prompts, GREEDY)]
  with Cluster("configs/tiny.py", ["prefill", "decode:pipelined"], OVERRIDES, mixed_pool=False) as cluster:
    outs = cluster.run([ClusterRequest(str(i), p, GREEDY) for i, p in enumerate(prompts)], timeout_s=240)
    assert [o.token_ids for o in outs] == want
    assert all(o.route == ("prefill0", "decode1") and o.attempts == 1 for o in outs)
    stats = cluster.stubs["decode1"].call("Poll", {}, 10)["stats"]
    assert stats["kv_used_pages"] == 0 and stats["num_seqs"] == 0 and stats["num_incoming"] == 0
    addresses = stats["tier2_addresses"]
    assert len(addresses) == 2
    shards = _shards(addresses)
    assert [s["pages_in_use"] for s in shards] == [0, 0]  # every request's KV released
    # Each prompt's K,V (all but its last token) went to tier 2, every layer, plus the decode steps'.
    assert sum(s["tokens_served"] for s in shards) >= sum(n - 1 for n in LENGTHS) * MODEL["num_layers"]
    # With the prefill worker gone the decode worker runs requests end to end: the pipelined placement's
    # own prefill, on the same tier-2 servers.
    cluster.kill("prefill0")
    outs = cluster.run([ClusterRequest(str(i), p, GREEDY) for i, p in enumerate(prompts[:3])], timeout_s=240)
    assert [o.token_ids for o in outs] == want[:3]
    assert all(o.route == ("decode1", "decode1") for o in outs)
    assert [s["pages_in_use"] for s in _shards(addresses)] == [0, 0]
    # A transfer aborted halfway (Begin, one K,V message, Abort) leaves no KV on tier 2.
    stub, uid, prompt = cluster.stubs["decode1"], 10**6, prompts[1]
    stub.call("Begin", {"uid": uid, "request_id": "aborted", "prompt_ids": prompt,
                        "params": params_to_json(GREEDY), "num_kv_tokens": len(prompt) - 1}, 10)
    m = model_config(_config())
    k = np.ones((16, m.num_kv_heads, m.head_dim), np.float32)
    stub.send_kv(encode_kv(uid, 0, np.arange(16), k, k, m.num_heads), 10)
    assert sum(s["pages_in_use"] for s in _shards(addresses)) > 0
    stub.call("Abort", {"uid": uid}, 10)
    deadline = time.monotonic() + 10
    while sum(s["pages_in_use"] for s in _shards(addresses)) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert [s["pages_in_use"] for s in _shards(addresses)] == [0, 0]
  deadline = time.monotonic() + 30
  while not all(_refused(a) for a in addresses) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert all(_refused(a) for a in addresses)  # the worker stopped the tier-2 servers it spawned
