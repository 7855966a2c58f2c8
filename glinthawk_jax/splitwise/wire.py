"""The worker service on the wire: raw-bytes gRPC methods, JSON control messages, K,V tensor messages.

Control calls (Submit, Begin, Commit, Abort, Poll) carry small JSON objects (never pickle). A layer's
K,V (KV) is an append-only request of the tier-2 tensor wire (protos/tensor_wire.py): its header, the
transfer id repeated per token, the tokens' positions and k, v: [N, KV, D] in the model dtype.
"""

from __future__ import annotations

import json

import grpc
import numpy as np

from glinthawk_jax.protos import tensor_wire
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.scheduler import MIN_PREFILL_TOKENS, pow2_at_most

SERVICE = "glinthawk.splitwise.Worker"
METHODS = ("Submit", "Begin", "KV", "Commit", "Abort", "Poll")
MAX_MESSAGE_BYTES = 2**31 - 1
# The largest HTTP/2 frame: fewer frames per K,V message (1.2 GB/s vs 0.8 on loopback, docs/SPLITWISE.md).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.http2.max_frame_size", 2**24 - 1)]


def params_to_json(p: SamplingParams) -> dict:
  return {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
          "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
          "ignore_eos": p.ignore_eos}


def params_from_json(d: dict) -> SamplingParams:
  return SamplingParams(**d)


def kv_message_tokens(message_bytes: float, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
  """Tokens per K,V message: the largest power of two (at least MIN_PREFILL_TOKENS) whose K and V fit in
  message_bytes; a power of two so the receiver pads nothing to its transfer buckets (worker.kv_bucket)."""
  per_token = 2 * num_kv_heads * head_dim * itemsize
  return max(pow2_at_most(message_bytes // per_token), MIN_PREFILL_TOKENS)


def encode_kv(uid: int, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int) -> bytes:
  """One layer's K,V of request `uid` at `positions`: [N]; k, v: [N, KV, D]."""
  parts = tensor_wire.request_parts(uid, layer, np.full(len(positions), uid, np.int64), positions, None, k, v,
                                    num_heads)
  return b"".join(p.reshape(-1).view(np.uint8) for p in parts)  # one copy (tobytes() would add another)


class WorkerStub:
  """Calls one worker; JSON methods take and return dicts, KV takes encoded bytes."""

  def __init__(self, address: str, own_connection: bool = False):
    """own_connection: a TCP connection of its own, not shared with this process's other stubs to the same
    address (gRPC shares one by default; one Python connection moves about 1-2 GB/s, FACTS.md)."""
    self.address = address
    options = CHANNEL_OPTIONS + ([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])
    self.channel = grpc.insecure_channel(address, options=options)
    self._calls = {m: self.channel.unary_unary(f"/{SERVICE}/{m}") for m in METHODS}

  def call(self, method: str, message: dict, timeout_s: float) -> dict:
    reply = self._calls[method](json.dumps(message).encode(), timeout=timeout_s)
    return json.loads(reply) if reply else {}

  def send_kv(self, payload: bytes, timeout_s: float) -> None:
    self._calls["KV"](payload, timeout=timeout_s)

  def close(self) -> None:
    self.channel.close()
