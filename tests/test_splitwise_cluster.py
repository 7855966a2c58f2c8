"""Splitwise with real worker processes on loopback: split prefill/decode gives the colocated engine's
greedy tokens, each layer's KV reaches the decode worker while the prefill still runs, a burst is never
dropped, a wrong-shaped K,V is refused over the wire, failed transfers are recomputed a bounded number
of times, and a killed decode worker's requests are recomputed on the other one."""

import grpc
import numpy as np
import pytest

from configs import tiny
from glinthawk_jax.engine import Engine
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.splitwise.cluster import STAGES, Cluster, ClusterRequest
from glinthawk_jax.splitwise.replay import ReplaySpec, compiles_between, trace_requests, warm_up
from glinthawk_jax.splitwise.wire import WorkerStub, encode_kv, params_to_json

# Wide enough that a layer's prefill takes several ms on a CPU (the overlap test), chunked prefill.
MODEL = {"num_layers": 6, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 64}
ENGINE = {"max_model_len": 512, "max_prefill_tokens": 128}
# One layer per prefill call: layer 0's K,V races five more layers to the decode worker (the widest
# margin for the overlap test on a loaded machine).
OVERRIDES = ([f"--config.model.{k}={v}" for k, v in MODEL.items()] +
             [f"--config.engine.{k}={v}" for k, v in ENGINE.items()] + ["--config.splitwise.layers_per_call=1"])
LENGTHS = (5, 127, 1, 200, 17, 2)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, 512, n)] for n in lengths]


def _requests(prompts, max_tokens=8, arrivals=None):
  arrivals = arrivals or [0.0] * len(prompts)
  return [ClusterRequest(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), a)
          for i, (p, a) in enumerate(zip(prompts, arrivals))]


def _reference(prompts, max_tokens=8):
  c = tiny.get_config()
  c.placement = "local"
  c.model.update(MODEL)
  c.engine.update(ENGINE)
  outs = Engine(c).generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
  return [o.token_ids for o in outs]


def _cluster(roles):
  return Cluster("configs/tiny.py", roles, OVERRIDES, ready_timeout_s=300, mixed_pool=False)


@pytest.fixture(scope="module")
def cluster():
  with _cluster(["prefill", "decode"]) as c:
    c.run(_requests(_prompts([127]), max_tokens=2))  # connects the workers: steadier transfer timings
    yield c


def test_split_gives_colocated_greedy_tokens_and_layers_arrive_during_prefill(cluster):
  prompts = _prompts(LENGTHS)
  outs = cluster.run(_requests(prompts), timeout_s=240)
  assert [o.token_ids for o in outs] == _reference(prompts)
  assert all(o.route == ("prefill0", "decode1") for o in outs)
  # A single-chunk prompt (127 tokens: 126 of KV): layer 0's K,V reached the decode worker before the
  # last layer's K,V of that same prefill was on the prefill worker's host, let alone the prefill ended.
  t = outs[1].transfer
  received, computed = t["kv_layer_received_s"], t["layer_computed_s"]
  assert len(received) == len(computed) == MODEL["num_layers"]
  assert received[0] < computed[-1] < t["prefill_end_s"] <= t["commit_s"]
  assert outs[1].kv_visible_s is not None and outs[1].kv_visible_s >= 0
  # Its timeline has every stage of a split route, in order of time, ending at its first token.
  stages = outs[1].timeline
  assert list(stages) == list(STAGES) and list(stages.values()) == sorted(stages.values())
  assert stages["first_token"] - stages["arrival"] == pytest.approx(outs[1].ttft_s)


def test_warm_up_leaves_the_prefill_worker_nothing_to_compile(cluster):
  """After replay's warm-up, the measured requests (the trace's lengths, Poisson arrivals) compile
  nothing on the prefill worker: each prompt is prefilled alone (splitwise.prefill_rows=1) in a shape
  the warm-up ran."""
  # Prompts of at most 70 tokens: one chunk each, and a (tokens, width) shape no other test here prefills.
  spec = ReplaySpec("conv", num_requests=8, max_prompt_tokens=70, max_output_tokens=4,
                    max_model_len=ENGINE["max_model_len"], vocab_size=512, seed=3)
  warm_up(cluster, spec, rate=20.0, timeout_s=240)
  before = cluster.compiles()
  outs = cluster.run(trace_requests(spec, rate=10.0), timeout_s=240)
  assert all(o.route == ("prefill0", "decode1") for o in outs)
  assert compiles_between(before, cluster.compiles())["prefill0"]["count"] == 0


def test_burst_is_never_dropped(cluster):
  prompts = _prompts([int(n) for n in np.random.default_rng(1).integers(1, 127, 40)], seed=2)
  outs = cluster.run(_requests(prompts, max_tokens=4), timeout_s=240)
  assert all(o is not None and len(o.token_ids) == 4 for o in outs)
  stats = [cluster.stubs[n].call("Poll", {}, 10)["stats"] for n in cluster.stubs]
  assert all(s["kv_used_pages"] == 0 and s["num_seqs"] == 0 for s in stats)


def test_wrong_shaped_kv_is_refused_with_invalid_argument(cluster):
  stub = WorkerStub(cluster.addresses["decode1"])
  prompt = list(range(1, 20))
  stub.call("Begin", {"uid": 10**6, "request_id": "x", "prompt_ids": prompt, "num_kv_tokens": 18,
                      "params": params_to_json(SamplingParams())}, 10)
  bad = np.zeros((18, 3, MODEL["head_dim"]), np.float32)
  with pytest.raises(grpc.RpcError) as e:
    stub.send_kv(encode_kv(10**6, 0, np.arange(18), bad, bad, MODEL["num_heads"]), 10)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "(18, 3, 64)" in e.value.details()
  stub.call("Abort", {"uid": 10**6}, 10)
  stub.close()


def test_failed_transfers_are_recomputed_up_to_max_attempts_then_reported():
  """Every transfer expires at the decode worker (kv_timeout_s = 1 ms): recompute gives up after
  max_attempts routes, fail after one; both end the request with an error and strand no KV."""
  expiring = OVERRIDES + ["--config.splitwise.kv_timeout_s=0.001"]
  with Cluster("configs/tiny.py", ["prefill", "decode"], expiring, ready_timeout_s=300, mixed_pool=False,
               max_attempts=2) as cluster:
    [out] = cluster.run(_requests(_prompts([100])), timeout_s=120)
    assert out.finish_reason == "error" and out.attempts == 2 and "gave up after 2 attempts" in out.error
    cluster.on_transfer_failure = "fail"
    [out] = cluster.run(_requests(_prompts([100])), timeout_s=120)
    assert out.finish_reason == "error" and out.attempts == 1 and out.token_ids == []
    for name in cluster.stubs:
      stats = cluster.stubs[name].call("Poll", {}, 10)["stats"]
      assert stats["kv_used_pages"] == 0 and stats["num_incoming"] == 0 and stats["num_shipping"] == 0


def test_killed_decode_worker_requests_are_recomputed():
  with _cluster(["prefill", "decode", "decode"]) as cluster:
    _kill_and_check(cluster)


def _kill_and_check(cluster):
  prompts = _prompts((30, 60, 90, 10, 45, 120, 75, 20), seed=3)
  requests = _requests(prompts, max_tokens=48)
  requests[0].params = SamplingParams(max_tokens=2, ignore_eos=True)
  killed = []

  def kill_on_first_output(out):
    if not killed:
      cluster.kill("decode1")
      killed.append(out.request_id)

  outs = cluster.run(requests, timeout_s=240, on_output=kill_on_first_output)
  ref = _reference(prompts, max_tokens=48)
  ref[0] = ref[0][:2]
  assert [o.token_ids for o in outs] == ref
  assert any(o.attempts > 1 for o in outs)  # some were on decode1 when it died
  assert all(o.route[1] != "decode1" for o in outs if o.attempts > 1)
  for name in ("prefill0", "decode2"):  # no KV stranded on the survivors
    stats = cluster.stubs[name].call("Poll", {}, 10)["stats"]
    assert stats["kv_used_pages"] == 0 and stats["num_incoming"] == 0 and stats["num_shipping"] == 0
