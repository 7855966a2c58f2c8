"""Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2), one code path driven by ModelConfig.

Each decoder layer is split at attention: `pre_attention` returns RoPE'd q, k, v and `post_attention`
takes the attention output, so placements (paged on the accelerator, tier 2 on CPUs) plug in from
outside. Layers are stored stacked (leading axis = layer) and run under `jax.lax.scan`.
Weights keep the Hugging Face [out, in] layout so checkpoints load without transposes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import causal_mask, grouped_attention
from models.model_config import ModelConfig
from models.rope import apply_rope, inverse_frequencies

# attend(layer_index, q, k, v, state) -> (attention_out, state); q: [B, T, H, D], k/v: [B, T, KV, D].
AttendFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, Any], tuple[jnp.ndarray, Any]]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> nnx.Param:
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _dense(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
  """x: [..., in] times weight: [out, in] (the Hugging Face layout)."""
  y = jnp.einsum("...i,oi->...o", x, weight)
  return y if bias is None else y + bias


class RMSNorm(nnx.Module):
  """RMSNorm with the statistics in float32, as transformers computes it."""

  def __init__(self, size: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((size,), dtype))
    self.eps = eps

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x32.astype(x.dtype)


class DecoderLayer(nnx.Module):
  """One transformer block, split into the stages before and after attention."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(config.dtype)
    e, d = config.hidden_size, config.head_dim
    self.config = config
    self.input_layernorm = RMSNorm(e, config.rms_norm_eps, dt)
    self.q_proj = _param(rngs, (config.num_heads * d, e), dt)
    self.k_proj = _param(rngs, (config.num_kv_heads * d, e), dt)
    self.v_proj = _param(rngs, (config.num_kv_heads * d, e), dt)
    if config.attention_bias:
      self.q_bias = _param(rngs, (config.num_heads * d,), dt)
      self.k_bias = _param(rngs, (config.num_kv_heads * d,), dt)
      self.v_bias = _param(rngs, (config.num_kv_heads * d,), dt)
    self.o_proj = _param(rngs, (e, config.num_heads * d), dt)
    self.post_attention_layernorm = RMSNorm(e, config.rms_norm_eps, dt)
    self.gate_proj = _param(rngs, (config.intermediate_size, e), dt)
    self.up_proj = _param(rngs, (config.intermediate_size, e), dt)
    self.down_proj = _param(rngs, (e, config.intermediate_size), dt)

  def pre_attention(self, x: jnp.ndarray, positions: jnp.ndarray):
    """x: [B, T, E], positions: [B, T] -> q: [B, T, H, D], k, v: [B, T, KV, D] (RoPE applied)."""
    c = self.config
    b, t, _ = x.shape
    h = self.input_layernorm(x)
    bias = c.attention_bias
    q = _dense(h, self.q_proj[...], self.q_bias[...] if bias else None)
    k = _dense(h, self.k_proj[...], self.k_bias[...] if bias else None)
    v = _dense(h, self.v_proj[...], self.v_bias[...] if bias else None)
    inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions, inv_freq)
    return q, k, v.reshape(b, t, c.num_kv_heads, c.head_dim)

  def post_attention(self, x: jnp.ndarray, attn_out: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, E] residual stream, attn_out: [B, T, H, D] -> the layer's output [B, T, E]."""
    b, t, _ = x.shape
    x = x + _dense(attn_out.reshape(b, t, -1).astype(x.dtype), self.o_proj[...])
    h = self.post_attention_layernorm(x)
    gated = jax.nn.silu(_dense(h, self.gate_proj[...])) * _dense(h, self.up_proj[...])
    return x + _dense(gated, self.down_proj[...])


class Llama(nnx.Module):
  """Embeddings, stacked decoder layers, final norm and LM head."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(config.dtype)
    self.config = config
    self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), dt)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(layer_rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(config, rngs=layer_rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.vocab_size, config.hidden_size), dt)

  def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens: [B, T] int -> residual stream [B, T, E]."""
    return jnp.take(self.embed_tokens[...], tokens, axis=0)

  def logits(self, x: jnp.ndarray) -> jnp.ndarray:
    """Final norm and LM head: x: [..., E] -> float32 logits [..., vocab]."""
    head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
    return _dense(self.norm(x), head[...]).astype(jnp.float32)

  def layer(self, index) -> DecoderLayer:
    """The decoder layer at `index` (an int or a traced scalar), as a standalone module."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

  def run_layers(self, x: jnp.ndarray, positions: jnp.ndarray, attend: AttendFn, state: Any = None):
    """Runs every layer under scan; `attend` computes attention and threads `state` (e.g. a KV cache).

    Returns (x after the last layer, final state).
    """
    graphdef, stacked = nnx.split(self.layers)
    return scan_layers(graphdef, stacked, x, positions, attend, state)

  def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None) -> jnp.ndarray:
    """Full causal forward (prefill, scoring): tokens [B, T] -> float32 logits [B, T, vocab].

    Prompts of different lengths are right-padded; padding never affects earlier positions.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    mask = causal_mask(positions, positions, self.config.sliding_window)

    def attend(index, q, k, v, state):
      return grouped_attention(q, k, v, mask), state

    x, _ = self.run_layers(self.embed(tokens), positions, attend)
    return self.logits(x)


def init_model(config: ModelConfig, seed: int = 0) -> Llama:
  """Random-init model, built inside jit so real-size weights never pass through host memory."""

  @nnx.jit
  def build():
    return Llama(config, rngs=nnx.Rngs(params=seed))

  return build()


def abstract_model(config: ModelConfig) -> Llama:
  """The model's structure with ShapeDtypeStruct leaves (no memory), for checkpoint loading."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(params=0)))


def scan_layers(graphdef, stacked, x: jnp.ndarray, positions: jnp.ndarray, attend: AttendFn, state: Any = None,
                first_layer: int = 0, keep_kv: bool = False):
  """Scans the decoder layers of `stacked` (nnx state, layers on the leading axis; `graphdef` of one
  DecoderLayer stack); attend gets layer indices first_layer, first_layer + 1, ...

  Returns (x after the last layer, final state), and with keep_kv also every layer's K,V:
  [layers, 2, B, T, KV, D].
  """
  num_layers = jax.tree.leaves(stacked)[0].shape[0]

  def body(carry, xs):
    h, st = carry
    layer_state, index = xs
    layer = nnx.merge(graphdef, layer_state)
    q, k, v = layer.pre_attention(h, positions)
    out, st = attend(index, q, k, v, st)
    return (layer.post_attention(h, out), st), (jnp.stack([k, v]) if keep_kv else None)

  indices = first_layer + jnp.arange(num_layers, dtype=jnp.int32)
  (x, state), kvs = jax.lax.scan(body, (x, state), (stacked, indices))
  return (x, state, kvs) if keep_kv else (x, state)
