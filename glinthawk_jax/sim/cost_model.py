"""Stage times from a hardware profile and a model's shape (roofline: max of bytes/bandwidth, FLOPs/peak).

Weights are read in fp16/bf16 (2 bytes). Per token per layer, tier 1 sends q, k, v to tier 2 and
gets back the attention output only (the minimal wire format, FACTS.md: 7B fp16 is 24 KiB out,
8 KiB back; Glinthawk's own wire format is about twice that).
"""

from __future__ import annotations

from models.model_config import ModelConfig
from glinthawk_jax.sim.profiles import HardwareProfile, Network

WEIGHT_BYTES = 2  # bytes per parameter (fp16/bf16)


def layer_params(m: ModelConfig) -> int:
  """Parameters of one decoder layer: q, k, v, o projections, the MLP and two norms."""
  e, f, d = m.hidden_size, m.intermediate_size, m.head_dim
  return e * d * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * e * f + 2 * e


def head_params(m: ModelConfig) -> int:
  """Parameters read once per step after the last layer: final norm and LM head."""
  return m.vocab_size * m.hidden_size + m.hidden_size


def embed_bytes(m: ModelConfig) -> int:
  """Bytes of the embedding table (held in memory; a step reads only its rows)."""
  return m.vocab_size * m.hidden_size * WEIGHT_BYTES


def kv_bytes_per_token_layer(m: ModelConfig, itemsize: int) -> int:
  """K and V of one token in one layer."""
  return 2 * m.num_kv_heads * m.head_dim * itemsize


def wire_bytes_per_token_layer(m: ModelConfig, itemsize: int) -> tuple[int, int]:
  """(tier 1 -> tier 2: q, k, v; tier 2 -> tier 1: attention output) bytes for one token, one layer."""
  out = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim * itemsize
  back = m.num_heads * m.head_dim * itemsize
  return out, back


def roofline(hw: HardwareProfile, nbytes: float, flops: float) -> float:
  """Seconds for work that moves `nbytes` through memory and does `flops` (whichever is slower)."""
  return max(nbytes / hw.bandwidth, flops / hw.flops)


def tier1_layer_time(hw: HardwareProfile, m: ModelConfig, batch: int) -> float:
  """One layer's dense (non-attention) work for `batch` tokens, weights streamed once."""
  p = layer_params(m)
  return roofline(hw, p * WEIGHT_BYTES, 2 * p * batch) + hw.step_overhead_s


def head_time(hw: HardwareProfile, m: ModelConfig, batch: int) -> float:
  """Final norm, LM head and sampling for `batch` sequences."""
  p = head_params(m)
  return roofline(hw, p * WEIGHT_BYTES, 2 * p * batch) + hw.step_overhead_s


def attention_flops(m: ModelConfig, pairs: float) -> float:
  """FLOPs of attention for `pairs` (query, key) pairs in one layer: q.k and p.v over all heads."""
  return 4 * m.num_heads * m.head_dim * pairs


def tier2_layer_time(hw: HardwareProfile, m: ModelConfig, batch: int, context: float, nodes: int,
                     kv_itemsize: int) -> float:
  """Decode attention of one layer for `batch` sequences of `context` tokens, sharded by
  sequence over `nodes` machines that work in parallel."""
  nbytes = batch * context * kv_bytes_per_token_layer(m, kv_itemsize)
  flops = attention_flops(m, batch * context)
  return roofline(hw, nbytes, flops) / nodes + hw.step_overhead_s


def link_bandwidth(tier1: HardwareProfile, tier2: HardwareProfile, tier2_nodes: int,
                   network: Network) -> float:
  """Bytes/s one tier-1 machine can push each way: its NIC, its tier-2 nodes' NICs, the network cap."""
  bw = min(tier1.network, tier2_nodes * tier2.network)
  if network.bandwidth_gbps > 0:
    bw = min(bw, network.bandwidth_gbps * 1e9 / 8)
  return bw


def iteration_time(hw: HardwareProfile, m: ModelConfig, new_tokens: int, attn_pairs: float,
                   kv_tokens_read: float, out_seqs: int, kv_itemsize: int = 2) -> float:
  """One engine iteration of the whole model on one machine (weights and KV on the device):
  `new_tokens` through the dense layers, `attn_pairs` (query, key) pairs of attention per layer,
  `kv_tokens_read` cached tokens read per layer, LM head for `out_seqs` sequences."""
  if new_tokens <= 0:
    return 0.0
  p = layer_params(m)
  nbytes = p * WEIGHT_BYTES + kv_tokens_read * kv_bytes_per_token_layer(m, kv_itemsize)
  flops = 2 * p * new_tokens + attention_flops(m, attn_pairs)
  per_layer = roofline(hw, nbytes, flops) + hw.step_overhead_s
  return m.num_layers * per_layer + head_time(hw, m, max(out_seqs, 1))


def prefill_time(hw: HardwareProfile, m: ModelConfig, prompt_lengths: list[int] | tuple[int, ...]) -> float:
  """Batched prefill of whole prompts (causal attention among each prompt's own tokens)."""
  tokens = sum(prompt_lengths)
  pairs = sum(p * (p + 1) / 2 for p in prompt_lengths)
  return iteration_time(hw, m, tokens, pairs, tokens, len(prompt_lengths))


def decode_time(hw: HardwareProfile, m: ModelConfig, contexts: list[int] | tuple[int, ...]) -> float:
  """One decode step for sequences holding `contexts` cached tokens each."""
  total = sum(contexts)
  return iteration_time(hw, m, len(contexts), total, total, len(contexts))
