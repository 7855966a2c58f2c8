"""A Splitwise worker's KV receipt in-process: validation of each K,V message, commit, abort and
timeouts freeing the pages, and a prefill worker whose decode worker is unreachable freeing its own."""

import time

import numpy as np
import pytest

from configs import tiny
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.splitwise.kv_sender import KVSender, ShippedRow
from glinthawk_jax.splitwise.server import build_server
from glinthawk_jax.splitwise.wire import encode_kv, kv_message_tokens, params_to_json
from glinthawk_jax.splitwise.worker import Worker, WorkerError

PROMPT = list(range(1, 40))  # 38 tokens of KV


def _config(role):
  c = tiny.get_config()
  c.placement, c.role = "local", role
  c.engine.max_num_seqs = 2
  c.splitwise.kv_timeout_s = 0.5
  return c


@pytest.fixture(scope="module")
def decode():
  return Worker(_config("decode"))


def _msg(uid, prompt=PROMPT, **extra):
  return {"uid": uid, "request_id": f"r{uid}", "prompt_ids": prompt,
          "params": params_to_json(SamplingParams(max_tokens=4)), **extra}


def _kv(worker, uid, layer, n=len(PROMPT) - 1, kv_heads=None, dtype=np.float32):
  m = worker.model
  shape = (n, kv_heads or m.num_kv_heads, m.head_dim)
  return encode_kv(uid, layer, np.arange(n), np.ones(shape, dtype), np.ones(shape, dtype), m.num_heads)


def _used(worker):
  worker.step()
  return worker.poll()["stats"]["kv_used_pages"]


def _error(fn, *args):
  with pytest.raises(WorkerError) as e:
    fn(*args)
  return e.value


def test_kv_messages_are_validated_and_commit_needs_every_layer(decode):
  decode.begin(_msg(1, num_kv_tokens=len(PROMPT) - 1))
  assert _used(decode) == 3  # 38 tokens in pages of 16
  e = _error(decode.receive_kv, _kv(decode, 1, 0, kv_heads=3))
  assert e.code == "INVALID_ARGUMENT" and "k, v shape (38, 3, 16)" in str(e)
  e = _error(decode.receive_kv, _kv(decode, 1, 0, dtype=np.float16))
  assert e.code == "INVALID_ARGUMENT" and "dtype float16" in str(e)
  e = _error(decode.receive_kv, _kv(decode, 1, 7))
  assert e.code == "INVALID_ARGUMENT" and "layer 7" in str(e)
  e = _error(decode.receive_kv, _kv(decode, 1, 0, n=50))
  assert e.code == "INVALID_ARGUMENT" and "positions 0..49" in str(e)
  e = _error(decode.receive_kv, b"junk" * 20)
  assert e.code == "INVALID_ARGUMENT" and "magic" in str(e)
  assert _error(decode.receive_kv, _kv(decode, 99, 0)).code == "NOT_FOUND"
  decode.receive_kv(_kv(decode, 1, 0))
  e = _error(decode.commit, {"uid": 1})
  assert e.code == "FAILED_PRECONDITION" and "layer 1 is missing 38 of 38" in str(e)
  decode.abort({"uid": 1})
  assert _used(decode) == 0
  assert _error(decode.receive_kv, _kv(decode, 1, 1)).code == "NOT_FOUND"


def test_uncommitted_transfer_times_out_and_frees_its_pages(decode):
  decode.begin(_msg(2, num_kv_tokens=len(PROMPT) - 1))
  decode.receive_kv(_kv(decode, 2, 0))
  assert _used(decode) == 3
  time.sleep(0.6)
  decode.step()
  reply = decode.poll()
  assert reply["stats"]["kv_used_pages"] == 0
  assert {"uid": 2, "event": "kv_timeout"} in reply["events"]
  assert _error(decode.commit, {"uid": 2}).code == "NOT_FOUND"


def test_begin_refuses_when_slots_are_taken_and_checks_its_message(decode):
  e = _error(decode.begin, _msg(3, num_kv_tokens=5))
  assert e.code == "INVALID_ARGUMENT" and "num_kv_tokens=5" in str(e)
  e = _error(decode.begin, {"uid": 3, "prompt_ids": PROMPT, "num_kv_tokens": 38})
  assert e.code == "INVALID_ARGUMENT" and "missing field 'params'" in str(e)
  e = _error(decode.begin, _msg(3, prompt=[1, 9999], num_kv_tokens=1))
  assert e.code == "INVALID_ARGUMENT" and "token ids must lie in [0, 512)" in str(e)
  decode.begin(_msg(4, num_kv_tokens=len(PROMPT) - 1))
  decode.begin(_msg(5, num_kv_tokens=len(PROMPT) - 1))
  assert _error(decode.begin, _msg(6, num_kv_tokens=len(PROMPT) - 1)).code == "RESOURCE_EXHAUSTED"
  decode.abort({"uid": 4})
  decode.abort({"uid": 5})
  assert _used(decode) == 0


@pytest.fixture(scope="module")
def prefill():
  worker = Worker(_config("prefill"))
  worker.sender.timeout_s = 2.0
  yield worker
  worker.sender.close()


def test_cancelled_request_strands_no_kv_on_either_side(decode, prefill):
  """Prefill worker -> decode worker served over gRPC; the request is cancelled on both (as the cluster
  does) right after its prefill: neither keeps pages, and nothing reaches the decode batch."""
  server, port = build_server(decode, "127.0.0.1", 0)
  try:
    prefill.submit(_msg(8, decode_address=f"127.0.0.1:{port}"))
    prefill.step()  # Begin at the decode worker, prefill dispatched layer by layer, its sends queued
    deadline = time.monotonic() + 30
    events = []
    while not any(e["event"] == "prefilled" for e in events) and time.monotonic() < deadline:
      time.sleep(0.01)  # the sender reports the last layer on the host
      events += prefill.poll()["events"]
    # The timeline's begun and dispatched first; its commit may have landed too: the aborts come after it.
    assert [e["event"] for e in events][:3] == ["begun", "dispatched", "prefilled"]
    prefill.abort({"uid": 8})
    decode.abort({"uid": 8})
    time.sleep(0.5)  # the sender's commit (or abort) lands
    for _ in range(3):
      decode.step()
      prefill.step()
    assert prefill.poll()["stats"]["kv_used_pages"] == 0
    stats = decode.poll()["stats"]
    assert stats["kv_used_pages"] == 0 and stats["num_incoming"] == 0 and stats["num_seqs"] == 0
    assert decode.poll()["outputs"] == []
  finally:
    server.stop(0)


def test_prefill_worker_with_unreachable_decode_worker_frees_its_kv(prefill):
  prefill.submit(_msg(7, decode_address="127.0.0.1:1"))
  deadline = time.monotonic() + 30
  events = []
  while not events and time.monotonic() < deadline:
    prefill.step()
    events = [e for e in prefill.poll()["events"] if e["event"] == "transfer_failed"]
  assert events and events[0]["uid"] == 7 and "UNAVAILABLE" in events[0]["error"]
  stats = prefill.poll()["stats"]
  assert stats["kv_used_pages"] == 0 and stats["num_shipping"] == 0 and stats["pending_prompt_tokens"] == 0


def test_transfers_are_begun_just_before_their_prefill_not_while_queued():
  """Three queued requests at a prefill worker with 32-token prefill batches: only the one being prefilled
  holds a reservation at the decode worker (a queued one cannot expire there), and all three arrive."""
  decode_config, config = _config("decode"), _config("prefill")
  decode_config.splitwise.kv_timeout_s = 60.0  # first prefills compile
  decode_config.engine.max_num_seqs = 8
  config.engine.max_prefill_tokens = 32  # 38-token prompts: two chunks each
  decode_worker, prefill_worker = Worker(decode_config), Worker(config)
  server, port = build_server(decode_worker, "127.0.0.1", 0)
  try:
    for uid in (21, 22, 23):
      prefill_worker.submit(_msg(uid, decode_address=f"127.0.0.1:{port}"))
    prefill_worker.step()  # Begin for 21 only, then its first chunk dispatched
    assert decode_worker.poll()["stats"]["num_incoming"] == 1
    assert prefill_worker.poll()["stats"]["num_shipping"] == 3
    deadline = time.monotonic() + 60
    events, outputs = [], []
    while len(outputs) < 3 and time.monotonic() < deadline:
      prefill_worker.step()
      decode_worker.step()
      events += prefill_worker.poll()["events"]
      outputs += decode_worker.poll()["outputs"]
    assert {e["uid"] for e in events if e["event"] == "transferred"} == {21, 22, 23}, events
    assert sorted((o["uid"], len(o["token_ids"])) for o in outputs) == [(21, 4), (22, 4), (23, 4)]
  finally:
    server.stop(0)
    prefill_worker.sender.close()


def test_prefill_worker_at_its_shipped_batch_limit_still_runs_its_own_requests(decode, prefill):
  """Shipped batches whose sends cannot land (the decode worker's lock is held) fill the throttle
  (splitwise.prefills_in_flight); a request the prefill worker runs end to end (mixed pool) is still
  prefilled and decoded meanwhile, and the shipped batches still count until their sends return."""
  server, port = build_server(decode, "127.0.0.1", 0)
  uid, n, m = 50, len(PROMPT) - 1, decode.model
  sender, timeout_s = prefill.sender, prefill.sender.timeout_s
  sender.timeout_s = 60.0  # the held sends must not time out during the test
  done = []
  try:
    sender.begin(uid, f"127.0.0.1:{port}", _msg(uid, num_kv_tokens=n))
    kv = np.zeros((m.num_layers, 2, n, m.num_kv_heads, m.head_dim), np.float32)
    with decode.lock:  # receive_kv waits for it: the batches' sends stay in flight
      for _ in range(prefill.prefills_in_flight):
        sender.ship([kv], [ShippedRow(uid, 0, np.arange(n, dtype=np.int32))], [], lambda *_: None, lambda *_: None)
      prefill.submit(_msg(51))  # no decode address: prefilled and decoded here
      deadline = time.monotonic() + 30
      outputs = []
      while not outputs and time.monotonic() < deadline:
        prefill.step()
        outputs += prefill.poll()["outputs"]
      assert [(o["uid"], len(o["token_ids"])) for o in outputs] == [(51, 4)]
      assert sender.batches_in_flight == prefill.prefills_in_flight == 2
    deadline = time.monotonic() + 30
    while sender.batches_in_flight and time.monotonic() < deadline:
      time.sleep(0.01)
    assert sender.batches_in_flight == 0
    sender.abort(uid, lambda *a: done.append(a))
    while not done and time.monotonic() < deadline:
      time.sleep(0.01)
    assert done and "cancelled" in str(done[0][1])
  finally:
    sender.timeout_s = timeout_s
    server.stop(0)
  assert _used(decode) == 0 and prefill.poll()["stats"]["kv_used_pages"] == 0


@pytest.mark.parametrize("split", [16, 10])  # at a page boundary (whole-page writes), inside a page (per token)
def test_kv_split_over_messages_lands_at_its_positions(decode, split):
  uid, n, m = 20 + split, len(PROMPT) - 1, decode.model
  decode.begin(_msg(uid, num_kv_tokens=n))
  pages = list(decode.incoming[uid].seq.pages)
  rng = np.random.default_rng(split)
  kv = rng.standard_normal((m.num_layers, 2, n, m.num_kv_heads, m.head_dim)).astype(np.float32)
  pos = np.arange(n)
  for layer in range(m.num_layers):
    for part in (slice(split, n), slice(0, split)):  # the later tokens first
      decode.receive_kv(encode_kv(uid, layer, pos[part], kv[layer, 0, part], kv[layer, 1, part], m.num_heads))
  decode.commit({"uid": uid})
  decode.step()
  k_pool, v_pool = (np.asarray(p) for p in decode.engine.runner.slices[0].state)
  for pool, which in ((k_pool, 0), (v_pool, 1)):
    got = pool[:, pages].reshape(m.num_layers, -1, m.num_kv_heads, m.head_dim)[:, :n]
    np.testing.assert_array_equal(got, kv[:, which])
  decode.abort({"uid": uid})
  decode.step()
  assert _used(decode) == 0


def test_sender_splits_each_layer_into_messages_that_commit_whole(decode):
  assert kv_message_tokens(4 * 2**20, 32, 128, 2) == 256  # Llama-2-7B bf16: 16 KiB of K,V a token
  assert kv_message_tokens(1, 32, 128, 2) == 16  # never under 16 tokens
  uid, n, m = 40, len(PROMPT) - 1, decode.model
  server, port = build_server(decode, "127.0.0.1", 0)
  sender = KVSender(m.num_heads, 5.0, 2, message_bytes=1)  # 16 tokens a message: 3 per layer
  try:
    sender.begin(uid, f"127.0.0.1:{port}", _msg(uid, num_kv_tokens=n))
    pages = list(decode.incoming[uid].seq.pages)
    kv = np.random.default_rng(1).standard_normal((m.num_layers, 2, n, m.num_kv_heads, m.head_dim))
    done = []
    sender.ship([kv.astype(np.float32)], [ShippedRow(uid, 0, np.arange(n, dtype=np.int32))], [uid],
                lambda *_: None, lambda *a: done.append(a))
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
      time.sleep(0.01)
    assert done and done[0][1] is None, done
    assert decode.poll()["stats"]["kv_stages"]["messages"] >= 3 * m.num_layers
    decode.step()
    k_pool = np.asarray(decode.engine.runner.slices[0].state[0])
    got = k_pool[:, pages].reshape(m.num_layers, -1, m.num_kv_heads, m.head_dim)[:, :n]
    np.testing.assert_array_equal(got, kv[:, 0].astype(np.float32))
  finally:
    sender.close()
    server.stop(0)
  decode.abort({"uid": uid})
  decode.step()
  assert _used(decode) == 0
