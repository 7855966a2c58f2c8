"""Placement "callback": the whole model is one jitted program; each layer's attention is an ordered
`io_callback` that sends the tokens' q, k, v to tier 2 (which appends K, V and attends) and waits.

The callback body is plain NumPy and the tier-2 client, never JAX (a JAX call inside a host callback
can deadlock). Tier 2 owns the KV pages: the backend's state is empty, and the scheduler's pages are
only bookkeeping (the engine sizes them so they never limit admission).

With local_attention_fraction > 0 the backend is a `SharedAttention`: every layer also runs tier 1's
paged attention, whose result the rows of local sequences keep (their tier-2 id is LOCAL_ROW, so the
callback skips them), while the other rows keep tier 2's.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from glinthawk_jax.model_runner import LocalPagedAttention
from glinthawk_jax.tier2_client import Tier2Client
from glinthawk_jax.placements.tokens import valid_tokens


class CallbackAttention:
  """An attention backend for ModelRunner whose attend() is a tier-2 round trip per layer.

  A tier-2 failure inside the callback is kept in `error` (and the callback returns zeros), so the
  caller can raise the typed Tier2Error after the jitted call instead of an opaque runtime error.
  """

  def __init__(self, client: Tier2Client, page_size: int, num_pages: int, timeout_s: float):
    self.client = client
    self.page_size = page_size
    self.num_pages = num_pages
    self.timeout_s = timeout_s
    self.error: Exception | None = None

  def init_state(self):
    return None

  def raise_error(self) -> None:
    """Raises (and clears) the first tier-2 error of the last jitted call."""
    error, self.error = self.error, None
    if error is not None:
      raise error

  def _host_attend(self, layer, seq_ids, positions, context_lens, q, k, v):
    out = np.zeros(q.shape, q.dtype)
    if self.error is not None:
      return out
    rows, cols = valid_tokens(seq_ids, positions, context_lens)
    if rows.size:
      try:
        out[rows, cols] = self.client.attend(int(layer), seq_ids[rows], positions[rows, cols], q[rows, cols],
                                             k[rows, cols], v[rows, cols], timeout_s=self.timeout_s)
      except Exception as e:  # noqa: BLE001 (re-raised by raise_error after the jitted call)
        self.error = e
    return out

  def _attend_fn(self, seq_ids, positions, context_lens):
    def attend(layer, q, k, v, state):
      out = io_callback(self._host_attend, jax.ShapeDtypeStruct(q.shape, q.dtype), layer, seq_ids,
                        positions, context_lens, q, k, v, ordered=True)
      return out, state

    return attend

  def prefill_attend(self, page_ids, offsets, block_tables, q_positions, context_lens, seq_ids):
    del page_ids, offsets, block_tables
    return self._attend_fn(seq_ids, q_positions, context_lens)

  def decode_attend(self, page_ids, offsets, block_tables, context_lens, seq_ids):
    del page_ids, offsets, block_tables
    return self._attend_fn(seq_ids, (context_lens - 1)[:, None], context_lens)


class SharedAttention:
  """Tier 1's paged cache (`local`) for the rows whose seq_ids are not tier-2 ids, `remote` for the others.

  The local kernel runs over the whole batch (tier-2 rows write and read the scratch page, as padding
  rows do) and a select keeps each row's side: simple, at the cost of local attention work on tier-2
  rows. State: the local pools.
  """

  def __init__(self, local: LocalPagedAttention, remote: CallbackAttention):
    self.local = local
    self.remote = remote
    self.page_size = local.page_size

  def for_slice(self, first_layer: int, num_layers: int, sharding) -> "SharedAttention":
    clone = copy.copy(self)
    clone.local = self.local.for_slice(first_layer, num_layers, sharding)
    return clone

  def init_state(self):
    return self.local.init_state()

  def raise_error(self) -> None:
    self.remote.raise_error()

  def prefill_attend(self, page_ids, offsets, block_tables, q_positions, context_lens, seq_ids):
    return _shared(self.local.prefill_attend(page_ids, offsets, block_tables, q_positions, context_lens),
                   self.remote.prefill_attend(page_ids, offsets, block_tables, q_positions, context_lens, seq_ids),
                   seq_ids)

  def decode_attend(self, page_ids, offsets, block_tables, context_lens, seq_ids):
    return _shared(self.local.decode_attend(page_ids, offsets, block_tables, context_lens),
                   self.remote.decode_attend(page_ids, offsets, block_tables, context_lens, seq_ids), seq_ids)


def _shared(local, remote, seq_ids):
  def attend(layer, q, k, v, state):
    out_local, state = local(layer, q, k, v, state)
    out_remote, _ = remote(layer, q, k, v, None)
    return jnp.where((seq_ids >= 0)[:, None, None, None], out_remote, out_local), state

  return attend
