"""A combined decode worker's K,V store (Splitwise x Glinthawk): received layers go to tier-2 shards.

Begin allocates the request on tier 2 (the shard with the most free KV, Tier2Client.allocate) under a
tier-2 id of the worker's engine; each K,V message is appended there with the append-only request the
pipelined placement's bulk prefill uses, and once committed the request decodes with that placement.
Tier 2 refuses a position past a layer's keys written so far, while one layer's messages may arrive out
of order (the prefill worker sends on several connections): a message starting past the layer's written
prefix is parked here and appended, right after the message before it, by that message's handler. Appends
of one request and layer are serialized. A parked message's RPC returns at once; the handler that appends
the message before it appends the parked ones before it returns, so once every send of a layer has
returned, all of that layer's K,V is stored.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from glinthawk_jax.tier2_client import Tier2Client


@dataclasses.dataclass
class Tier2Transfer:
  """One request's K,V on its way to tier 2."""
  tier2_id: int
  locks: list  # per layer: serializes its appends
  written: list  # per layer: positions 0..written - 1 are stored on tier 2
  parked: list  # per layer: first position -> (positions, k, v) waiting for the positions before it


class Tier2Receiver:
  """Allocates, appends and releases received requests' K,V on tier 2 (thread-safe: gRPC handlers)."""

  def __init__(self, client: Tier2Client, num_layers: int, new_id):
    """new_id(): a fresh tier-2 sequence id (the engine's, so locally prefilled requests never collide)."""
    self.client = client
    self.num_layers = num_layers
    self.new_id = new_id

  def begin(self, expected_tokens: int) -> Tier2Transfer:
    """Places a request of up to `expected_tokens` tokens on a shard (Tier2Error if none can take it)."""
    tier2_id = self.new_id()
    self.client.allocate([tier2_id], expected_tokens=expected_tokens)
    n = self.num_layers
    return Tier2Transfer(tier2_id, [threading.Lock() for _ in range(n)], [0] * n, [{} for _ in range(n)])

  def append(self, t: Tier2Transfer, layer: int, positions: np.ndarray, k: np.ndarray,
             v: np.ndarray) -> list[np.ndarray]:
    """Stores k, v: [N, KV, D] at consecutive positions: [N] of `layer`, now or once the positions before
    them are stored; returns the positions stored by this call (this message's and any it unparked)."""
    stored = []
    with t.locks[layer]:
      parked = t.parked[layer]
      run = (positions, k, v)
      if int(positions[0]) > t.written[layer]:
        parked[int(positions[0])] = run
        return stored
      while run is not None:
        pos = run[0]
        self.client.append_async(layer, np.full(len(pos), t.tier2_id), pos, run[1], run[2]).result()
        stored.append(pos)
        t.written[layer] = max(t.written[layer], int(pos[-1]) + 1)
        start = next((s for s in sorted(parked) if s <= t.written[layer]), None)
        run = None if start is None else parked.pop(start)
    return stored

  def release(self, t: Tier2Transfer) -> None:
    self.client.release([t.tier2_id])
