"""The combined mode's K,V store against real tier-2 processes: a layer's messages arriving out of order
(or at once from several threads) are parked and appended in order, and tier 2 then attends over every
received position exactly like the float64 reference; release frees the request's pages."""

import itertools
import threading

import numpy as np
import pytest

from configs import tiny
from glinthawk_jax.config import model_config
from glinthawk_jax.splitwise.tier2_receiver import Tier2Receiver
from glinthawk_jax.tier2_client import Tier2Client
from glinthawk_jax.tier2_launch import server_args
from tests.tier2_reference import ReferenceKV
from tier2_cpu.process import start_servers, stop_servers

N = 48  # received positions; messages of 16


@pytest.fixture(scope="module")
def receiver():
  c = tiny.get_config()
  model = model_config(c)
  procs = start_servers([server_args(c, model, "")] * 2)
  client = Tier2Client.for_model([p.address for p in procs], model, transport="grpc")
  yield Tier2Receiver(client, model.num_layers, itertools.count().__next__), model
  client.close()
  stop_servers(procs)


def _kv(model, rng):
  shape = (N, model.num_kv_heads, model.head_dim)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _check_attention(receiver, model, t, kv, rng):
  """Tier 2's attention of a query at position N (appended with it) over all N + 1 keys, each layer."""
  ref = ReferenceKV()
  for layer, (k, v) in enumerate(kv):
    ref.attend(layer, [t.tier2_id] * N, range(N), np.zeros((N, model.num_heads, model.head_dim)), k, v)
    q = rng.standard_normal((1, model.num_heads, model.head_dim)).astype(np.float32)
    k1, v1 = _kv(model, rng)
    got = receiver.client.attend(layer, [t.tier2_id], [N], q, k1[:1], v1[:1])
    want = ref.attend(layer, [t.tier2_id], [N], q, k1[:1], v1[:1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _pages_in_use(receiver):
  return sum(row["pages_in_use"] for row in receiver.client.stats())


def test_messages_in_reverse_order_are_parked_then_appended(receiver):
  receiver, model = receiver
  rng = np.random.default_rng(0)
  t = receiver.begin(N + 8)
  kv = [_kv(model, rng) for _ in range(model.num_layers)]
  for layer, (k, v) in enumerate(kv):
    stored = [receiver.append(t, layer, np.arange(s, s + 16), k[s:s + 16], v[s:s + 16]) for s in (32, 16)]
    assert stored == [[], []] and t.written[layer] == 0
    stored = receiver.append(t, layer, np.arange(16), k[:16], v[:16])
    assert [p.tolist() for p in stored] == [list(range(0, 16)), list(range(16, 32)), list(range(32, 48))]
    assert t.written[layer] == N and not t.parked[layer]
  _check_attention(receiver, model, t, kv, rng)
  receiver.release(t)
  assert _pages_in_use(receiver) == 0


def test_messages_sent_at_once_from_threads_all_land(receiver):
  receiver, model = receiver
  rng = np.random.default_rng(1)
  t = receiver.begin(N + 8)
  kv = [_kv(model, rng) for _ in range(model.num_layers)]
  stored = []
  jobs = [(layer, s) for layer in range(model.num_layers) for s in range(0, N, 8)]
  rng.shuffle(jobs)

  def send(layer, s):
    k, v = kv[layer]
    stored.extend((layer, p) for p in receiver.append(t, layer, np.arange(s, s + 8), k[s:s + 8], v[s:s + 8]))

  threads = [threading.Thread(target=send, args=job) for job in jobs]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  for layer in range(model.num_layers):
    got = np.sort(np.concatenate([p for lay, p in stored if lay == layer]))
    assert got.tolist() == list(range(N)) and t.written[layer] == N
  _check_attention(receiver, model, t, kv, rng)
  receiver.release(t)
  assert _pages_in_use(receiver) == 0
