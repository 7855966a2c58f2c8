"""Parity with transformers: logits and greedy tokens of checkpoints loaded by our loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from glinthawk_jax.checkpoint import load_hf_checkpoint
from tests.hf_models import KINDS, VOCAB_SIZE, make_hf_model

PROMPT_LENGTHS = (3, 12, 7, 1)
NEW_TOKENS = 16
LENGTH = max(PROMPT_LENGTHS) + NEW_TOKENS  # one padded shape for every forward: one compile per model


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB_SIZE, n).tolist() for n in PROMPT_LENGTHS]


def _right_padded(prompts, length):
  tokens = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens


def _jitted_forward(model):
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: np.asarray(forward(state, jnp.asarray(tokens)))


def _reference_logits(hf_model, tokens, prompts):
  mask = (np.arange(tokens.shape[1])[None] < np.array([len(p) for p in prompts])[:, None])
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


def _assert_logits_close(ours, ref, prompts, rtol):
  for i, p in enumerate(prompts):
    a, b = ours[i, :len(p)], ref[i, :len(p)]
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < rtol, f"prompt {i}"


@pytest.fixture(scope="module", params=KINDS)
def loaded(request, tmp_path_factory):
  """(torch reference model, our jitted float32 forward) for one kind."""
  path, hf_model = make_hf_model(request.param, tmp_path_factory.mktemp(request.param))
  return hf_model, _jitted_forward(load_hf_checkpoint(path, "float32"))


def test_logits_match_transformers(loaded):
  hf_model, forward = loaded
  prompts = _prompts()
  tokens = _right_padded(prompts, LENGTH)
  ours = forward(tokens)
  ref = _reference_logits(hf_model, tokens, prompts)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  _assert_logits_close(ours, ref, prompts, 1e-4)
  assert np.std(ref[0, :3], axis=-1).min() > 1.0  # well-separated logits: greedy has no near-ties


def test_greedy_tokens_match_generate(loaded):
  hf_model, forward = loaded
  prompts = _prompts(seed=1)
  tokens = _right_padded(prompts, LENGTH)
  lengths = np.array(PROMPT_LENGTHS)
  for _ in range(NEW_TOKENS):  # full forward each step: right padding never reaches earlier positions
    logits = forward(tokens)
    tokens[np.arange(len(prompts)), lengths] = logits[np.arange(len(prompts)), lengths - 1].argmax(-1)
    lengths += 1
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert tokens[i, len(p):len(p) + NEW_TOKENS].tolist() == ref[0, len(p):].tolist(), f"prompt {i}"


def test_sharded_checkpoint_matches_transformers(tmp_path):
  path, hf_model = make_hf_model("llama3_gqa", tmp_path, max_shard_size="100KB")
  prompts = _prompts()
  tokens = _right_padded(prompts, max(PROMPT_LENGTHS))
  ours = _jitted_forward(load_hf_checkpoint(path, "float32"))(tokens)
  _assert_logits_close(ours, _reference_logits(hf_model, tokens, prompts), prompts, 1e-4)


def test_bfloat16_load_converts_weights(tmp_path):
  path, hf_model = make_hf_model("qwen2_tied", tmp_path)
  model = load_hf_checkpoint(path, "bfloat16")
  assert model.config.dtype == "bfloat16"
  for leaf in jax.tree.leaves(nnx.state(model)):
    assert leaf.dtype == jnp.bfloat16
  k_ref = hf_model.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(model.layers.k_proj[1], np.float32), k_ref)
  prompts = _prompts()
  tokens = _right_padded(prompts, max(PROMPT_LENGTHS))
  ours = _jitted_forward(model)(tokens)
  _assert_logits_close(ours, _reference_logits(hf_model, tokens, prompts), prompts, 5e-2)
