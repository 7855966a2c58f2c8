"""Tier 2 for a tier 1 in layer slices: one Tier2Client per slice, to servers holding that slice's layers.

As in Glinthawk, each slice has its own tier-2 shards: a sequence is allocated on every slice's fleet
(its KV is split by layer across them) and a tensor call goes to the fleet of its layer. The interface
is Tier2Client's, so the engine and the placements use either.
"""

from __future__ import annotations

import logging
from concurrent import futures

from glinthawk_jax.reply_timings import Durations
from glinthawk_jax.tier2_client import Tier2Client, Tier2Error


class SlicedTier2Client:
  """Routes layer L to clients[L // layers_per_slice]; control calls go to every slice."""

  def __init__(self, clients: list[Tier2Client], layers_per_slice: int):
    self.clients = clients
    self.layers_per_slice = layers_per_slice

  def _client(self, layer: int) -> Tier2Client:
    return self.clients[layer // self.layers_per_slice]

  @property
  def addresses(self) -> list[str]:
    return [a for c in self.clients for a in c.addresses]

  @property
  def transports(self) -> list[str]:
    return [t for c in self.clients for t in c.transports]

  @property
  def num_alive(self) -> int:
    """Live shards of the slice with the fewest: with none left in one slice nothing can run."""
    return min(c.num_alive for c in self.clients)

  def allocate(self, seq_ids, expected_tokens: int = 1) -> list[list[int]]:
    """Places each new sequence on a shard of every slice; the shard of each, per slice."""
    return [c.allocate(seq_ids, expected_tokens) for c in self.clients]

  def release(self, seq_ids) -> None:
    for c in self.clients:
      c.release(seq_ids)

  def mark_dead(self, address: str) -> list[int]:
    """Stops using the shard at `address` and returns the sequences it held; their KV in the other
    slices is released too (best effort), since they will be prefilled again under new ids."""
    owner = next(c for c in self.clients if address in c.addresses)
    lost = owner.mark_dead(address)
    for c in self.clients:
      if c is not owner and lost:
        try:
          c.release(lost)
        except Tier2Error as e:
          logging.warning("releasing %d lost sequences on slice fleet %s failed: %s", len(lost), c.addresses, e)
    return lost

  def plan(self, seq_ids, positions) -> list:
    """Each slice fleet's Tier2Client.plan of the tokens (attend_async picks the layer's)."""
    return [c.plan(seq_ids, positions) for c in self.clients]

  def attend_async(self, layer: int, seq_ids, positions, q, k, v, timeout_s: float | None = None,
                   plan: list | None = None, out=None) -> futures.Future:
    return self._client(layer).attend_async(layer, seq_ids, positions, q, k, v, timeout_s,
                                            None if plan is None else plan[layer // self.layers_per_slice], out)

  def append_async(self, layer: int, seq_ids, positions, k, v, timeout_s: float | None = None) -> futures.Future:
    return self._client(layer).append_async(layer, seq_ids, positions, k, v, timeout_s)

  def attend(self, layer: int, seq_ids, positions, q, k, v, timeout_s: float | None = None):
    return self._client(layer).attend(layer, seq_ids, positions, q, k, v, timeout_s)

  def stats(self) -> list[dict]:
    return [row for c in self.clients for row in c.stats()]

  def timings(self) -> dict[str, Durations]:
    """Tier2Client.timings summed over the slices' fleets."""
    per_client = [c.timings() for c in self.clients]
    return {name: sum((t[name] for t in per_client), Durations()) for name in per_client[0]}

  def server_lateness(self) -> list[Durations]:
    """Tier2Client.server_lateness of every slice's shards, in address order."""
    return [d for c in self.clients for d in c.server_lateness()]

  def close(self) -> None:
    for c in self.clients:
      c.close()
