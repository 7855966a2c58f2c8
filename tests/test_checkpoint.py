"""Checkpoint loading: the random writer, orbax round trip, load_model, and errors that name the thing."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from configs import tiny
from glinthawk_jax.checkpoint import (CheckpointError, hf_config, load_hf_checkpoint, load_model,
                                      restore_params, save_params, write_random_hf_checkpoint)
from glinthawk_jax.safetensors_io import SafetensorsError
from models.model_config import ModelConfig, UnsupportedModelError

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, dtype="bfloat16")
TOKENS = np.array([[5, 9, 2, 33, 17], [1, 2, 3, 4, 5]], np.int32)


def _files_by_name(path):
  """Every tensor of a checkpoint dir, read with the safetensors library (the independent reader)."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(path, f), "pt") as st:
        out.update({k: st.get_tensor(k).float().numpy() for k in st.keys()})
  return out


def _rewrite(path, edit):
  """Rewrites the single-file checkpoint at `path` after `edit(dict of float32 arrays)`."""
  tensors = _files_by_name(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.fixture
def random_checkpoint(tmp_path):
  write_random_hf_checkpoint(CFG, str(tmp_path), num_shards=1)
  return str(tmp_path)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_random_checkpoint_loads_as_written(tmp_path, num_shards):
  write_random_hf_checkpoint(CFG, str(tmp_path), num_shards=num_shards)
  files = sorted(os.listdir(tmp_path))
  assert ("model.safetensors.index.json" in files) == (num_shards > 1)
  assert len([f for f in files if f.endswith(".safetensors")]) == num_shards
  reference = _files_by_name(str(tmp_path))
  assert len(reference) == 2 + 9 * CFG.num_layers + 1
  model = load_hf_checkpoint(str(tmp_path), "float32")
  assert model.config == dataclasses.replace(CFG, dtype="float32")
  np.testing.assert_array_equal(model.layers.down_proj[2], reference["model.layers.2.mlp.down_proj.weight"])
  np.testing.assert_array_equal(model.layers.input_layernorm.weight[0],
                                reference["model.layers.0.input_layernorm.weight"])
  np.testing.assert_array_equal(model.lm_head[...], reference["lm_head.weight"])
  assert 0.015 < reference["model.layers.1.self_attn.q_proj.weight"].std() < 0.025


def test_random_checkpoint_is_readable_by_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  cfg = dataclasses.replace(CFG, dtype="float32", attention_bias=True)
  write_random_hf_checkpoint(cfg, str(tmp_path), num_shards=2)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf_model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  ours = np.asarray(load_hf_checkpoint(str(tmp_path), "float32")(TOKENS))
  assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, attention_bias=True, tie_word_embeddings=True),
    dataclasses.replace(CFG, sliding_window=16, rope_scaling=("llama3", 8.0, 1.0, 4.0, 64)),
])
def test_hf_config_reads_back(cfg):
  assert ModelConfig.from_hf(hf_config(cfg), dtype=cfg.dtype) == cfg


def test_orbax_round_trip_restores_identical_params(random_checkpoint, tmp_path):
  model = load_hf_checkpoint(random_checkpoint, "bfloat16")
  save_params(model, str(tmp_path / "params"))
  restored = restore_params(model.config, str(tmp_path / "params"))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(restored(TOKENS)))
  as_float32 = restore_params(dataclasses.replace(CFG, dtype="float32"), str(tmp_path / "params"))
  assert as_float32.layers.up_proj.dtype == np.float32
  np.testing.assert_array_equal(as_float32.layers.up_proj[...], np.asarray(model.layers.up_proj, np.float32))


def test_restore_params_rejects_another_shape(random_checkpoint, tmp_path):
  save_params(load_hf_checkpoint(random_checkpoint, "float32"), str(tmp_path / "params"))
  other = dataclasses.replace(CFG, num_layers=4, dtype="float32")
  with pytest.raises(CheckpointError, match=r"'num_layers': \(3, 4\)"):
    restore_params(other, str(tmp_path / "params"))


def test_load_model_random_weights_say_so(caplog):
  model = load_model(tiny.get_config())
  assert model.config.vocab_size == 512
  assert "RANDOM weights" in caplog.text


def test_load_model_reads_the_checkpoint(random_checkpoint):
  config = tiny.get_config()
  config.checkpoint = random_checkpoint
  config.dtype = "bfloat16"
  model = load_model(config)
  reference = _files_by_name(random_checkpoint)
  np.testing.assert_array_equal(np.asarray(model.embed_tokens[...], np.float32),
                                reference["model.embed_tokens.weight"])


def test_tied_checkpoint_ignores_a_saved_lm_head_and_inv_freq(tmp_path):
  cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
  write_random_hf_checkpoint(cfg, str(tmp_path))
  _rewrite(str(tmp_path), lambda t: t.update({
      "lm_head.weight": t["model.embed_tokens.weight"],
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  model = load_hf_checkpoint(str(tmp_path), "float32")
  assert not hasattr(model, "lm_head")


def _drop(name):
  return lambda t: t.pop(name)


@pytest.mark.parametrize("edit, error, message", [
    (_drop("model.layers.1.mlp.up_proj.weight"), CheckpointError,
     "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}), CheckpointError,
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}),
     CheckpointError, "tensor model.layers.2.self_attn.k_proj.weight: shape (32, 32), expected (16, 32)"),
    (lambda t: t.update({"model.norm.weight": np.zeros(32, np.int8)}), SafetensorsError,
     "tensor model.norm.weight in .*: dtype I8 is not supported"),
])
def test_bad_tensors_are_named(random_checkpoint, edit, error, message):
  _rewrite(random_checkpoint, edit)
  pattern = message if error is SafetensorsError else re.escape(message)
  with pytest.raises(error, match=pattern):
    load_hf_checkpoint(random_checkpoint, "float32")


def test_missing_files_are_named(tmp_path):
  write_random_hf_checkpoint(CFG, str(tmp_path), num_shards=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors"):
    load_hf_checkpoint(str(tmp_path))
  os.remove(tmp_path / "model.safetensors.index.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="no weights .* found pytorch_model.bin, but only safetensors"):
    load_hf_checkpoint(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match=re.escape(f"missing {tmp_path / 'config.json'}")):
    load_hf_checkpoint(str(tmp_path))


def test_unknown_architecture_is_named(random_checkpoint):
  config_path = os.path.join(random_checkpoint, "config.json")
  with open(config_path) as f:
    hf = json.load(f)
  hf["architectures"] = ["GPT2LMHeadModel"]
  with open(config_path, "w") as f:
    json.dump(hf, f)
  with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
    load_hf_checkpoint(random_checkpoint)


def test_truncated_file_is_named(random_checkpoint):
  file = os.path.join(random_checkpoint, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 10)
  with pytest.raises(SafetensorsError, match="lm_head.weight|model.norm.weight"):
    load_hf_checkpoint(random_checkpoint)
