"""Model weights: Hugging Face safetensors checkpoints in, orbax checkpoints of converted params in and out.

`load_model(config, layout)` is the one entry point the engine uses. Loading fills one stacked parameter
at a time from mmapped files and converts it on the device, so at most one parameter is held twice; with
a sharding.Layout each device receives only its shard, so a model larger than one device never lands
whole on one (random weights too: they are built sharded).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from glinthawk_jax import safetensors_io
from glinthawk_jax.config import model_config as config_model_config
from glinthawk_jax.json_file import write_json
from glinthawk_jax.sharding import Layout
from models.llama import Llama, abstract_model, init_model
from models.model_config import ModelConfig, UnsupportedModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LOAD_THREADS = min(8, os.cpu_count() or 1)  # host memcpy threads (numpy copies: 21 GB/s on 1 core, 124 on 8)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here
# Our parameter path -> Hugging Face tensor name; layer entries get the prefix model.layers.{i}.
TOP_LEVEL_NAMES = {
    ("embed_tokens",): "model.embed_tokens.weight",
    ("norm", "weight"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}
LAYER_NAMES = {
    ("input_layernorm", "weight"): "input_layernorm.weight",
    ("q_proj",): "self_attn.q_proj.weight",
    ("k_proj",): "self_attn.k_proj.weight",
    ("v_proj",): "self_attn.v_proj.weight",
    ("q_bias",): "self_attn.q_proj.bias",
    ("k_bias",): "self_attn.k_proj.bias",
    ("v_bias",): "self_attn.v_proj.bias",
    ("o_proj",): "self_attn.o_proj.weight",
    ("post_attention_layernorm", "weight"): "post_attention_layernorm.weight",
    ("gate_proj",): "mlp.gate_proj.weight",
    ("up_proj",): "mlp.up_proj.weight",
    ("down_proj",): "mlp.down_proj.weight",
}


class CheckpointError(ValueError):
  """A checkpoint is missing a file or tensor, or holds one we do not expect; the message names it."""


def read_model_config(path: str, dtype="bfloat16") -> ModelConfig:
  """ModelConfig from `path`/config.json, with parameters in `dtype`."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"checkpoint {path!r}: missing {config_path}")
  with open(config_path) as f:
    hf = json.load(f)
  try:
    return ModelConfig.from_hf(hf, dtype=jnp.dtype(dtype).name)
  except UnsupportedModelError as e:
    raise UnsupportedModelError(f"{config_path}: {e}") from e


def load_hf_checkpoint(path: str, dtype="bfloat16", layout: Layout | None = None) -> Llama:
  """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory, converting the weights to `dtype`;
  each parameter is placed as `layout` shards it (default: the default device)."""
  cfg = read_model_config(path, dtype)
  tensors = _open_checkpoint(path)
  graphdef, state = nnx.split(abstract_model(cfg))
  shardings = dict(nnx.to_flat_state(layout.shardings(state))) if layout else {}
  targets = {p: (_hf_names(p, cfg.num_layers), v.get_value()) for p, v in nnx.to_flat_state(state)}
  _check_names(path, cfg, tensors, targets)
  params = {}
  with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
    for param_path, (names, target) in targets.items():
      stacked = param_path[0] == "layers"
      sharding = shardings[param_path].get_value() if layout else None
      _set(params, param_path, _load_param(names, target, tensors, pool, stacked, sharding))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def save_params(model: Llama, directory: str) -> None:
  """Saves converted params (orbax) and the ModelConfig, so `restore_params` skips the conversion."""
  directory = os.path.abspath(directory)
  write_json(os.path.join(directory, "model_config.json"), dataclasses.asdict(model.config), indent=1)
  _, state = nnx.split(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), nnx.to_pure_dict(state), force=True)
  checkpointer.wait_until_finished()


def restore_params(model_config: ModelConfig, directory: str) -> Llama:
  """Restores what `save_params` wrote, as `model_config.dtype` (which may differ from the saved one)."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, "model_config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"params directory {directory!r}: missing {config_path}")
  with open(config_path) as f:
    saved = json.load(f)
  if saved.get("rope_scaling") is not None:
    saved["rope_scaling"] = tuple(saved["rope_scaling"])
  saved = dataclasses.replace(ModelConfig(**saved), dtype=model_config.dtype)
  if saved != model_config:
    diff = {k: (v, getattr(model_config, k)) for k, v in dataclasses.asdict(saved).items()
            if v != getattr(model_config, k)}
    raise CheckpointError(f"{config_path}: saved model differs from the requested one (saved, requested): {diff}")
  graphdef, state = nnx.split(abstract_model(model_config))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def load_model(config: ml_collections.ConfigDict, layout: Layout | None = None) -> Llama:
  """The engine's model: the checkpoint when `config.checkpoint` is set, else random weights; placed as
  `layout` shards it (default: the default device)."""
  if config.checkpoint:
    return load_hf_checkpoint(config.checkpoint, config.dtype, layout)
  cfg = config_model_config(config)
  logging.warning("No checkpoint set: config %r runs RANDOM weights (seed %d); generated text is noise.",
                  config.name, config.seed)
  return init_model(cfg, config.seed) if layout is None else _init_sharded(cfg, config.seed, layout)


def _init_sharded(cfg: ModelConfig, seed: int, layout: Layout) -> Llama:
  """init_model's weights (the same values), each created in place on its shards."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  build = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(params=seed)))[1],
                  out_shardings=layout.shardings(abstract))
  return nnx.merge(graphdef, build())


def hf_config(cfg: ModelConfig) -> dict:
  """A Hugging Face config.json dict that `ModelConfig.from_hf` reads back as `cfg` (dtype aside)."""
  if cfg.attention_bias:
    arch, model_type = "Qwen2ForCausalLM", "qwen2"
  elif cfg.sliding_window is not None:
    arch, model_type = "MistralForCausalLM", "mistral"
  else:
    arch, model_type = "LlamaForCausalLM", "llama"
  hf = {
      "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
      "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings, "sliding_window": cfg.sliding_window,
      "use_sliding_window": cfg.sliding_window is not None, "hidden_act": "silu",
      "torch_dtype": cfg.dtype,
  }
  if cfg.rope_scaling is not None:
    _, factor, low, high, original = cfg.rope_scaling
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                          "high_freq_factor": high, "original_max_position_embeddings": original}
  return hf


def write_random_hf_checkpoint(cfg: ModelConfig, path: str, num_shards: int = 1, seed: int = 0) -> None:
  """Writes a Hugging Face checkpoint of `cfg`'s shape in `cfg.dtype` with random values (benchmarks).

  Values come from one 16 MiB pool of normals (std 0.02; norms 1 + that) read at random offsets, so
  writing runs at disk speed. With num_shards > 1 the tensors are split over `model-0000i-of-0000n`
  files, layer by layer, with an index.
  """
  write_json(os.path.join(path, "config.json"), hf_config(cfg), indent=1)
  dtype = np.dtype(jnp.dtype(cfg.dtype))
  rng = np.random.default_rng(seed)
  pool = (0.02 * rng.standard_normal(1 << 22, np.float32)).astype(dtype)
  _, state = nnx.split(abstract_model(cfg))
  entries = []
  for param_path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    per_name_shape = shape[1:] if param_path[0] == "layers" else shape
    is_norm = param_path[-1] == "weight"
    for name in _hf_names(param_path, cfg.num_layers):
      entries.append((name, per_name_shape, dtype, _random_chunks(pool, per_name_shape, rng, is_norm)))
  entries.sort(key=lambda e: _layer_of(e[0]))
  shards = np.array_split(np.arange(len(entries)), num_shards)
  if num_shards == 1:
    safetensors_io.write_file(os.path.join(path, SINGLE_FILE), entries)
    return
  weight_map, total = {}, 0
  for i, indices in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    shard = [entries[j] for j in indices]
    safetensors_io.write_file(os.path.join(path, filename), shard)
    for name, shape, _, _ in shard:
      weight_map[name] = filename
      total += dtype.itemsize * int(np.prod(shape))
  write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)


def _hf_names(param_path: tuple, num_layers: int) -> list[str]:
  if param_path[0] == "layers":
    suffix = LAYER_NAMES[tuple(param_path[1:])]
    return [f"model.layers.{i}.{suffix}" for i in range(num_layers)]
  return [TOP_LEVEL_NAMES[tuple(param_path)]]


def _layer_of(name: str) -> int:
  """Sort key: embeddings first, then layers in order, then the final norm and head."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return int(parts[2]) + 1
  return 0 if "embed_tokens" in name else 1 << 30


def _open_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Name -> mmapped view over the single file or every shard the index lists."""
  index_path = os.path.join(path, INDEX_FILE)
  single_path = os.path.join(path, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.exists(shard_path):
        listed = next(n for n, s in weight_map.items() if s == shard)
        raise CheckpointError(f"{index_path} lists shard {shard} (e.g. for tensor {listed}), "
                              f"but {shard_path} does not exist")
      tensors.update(safetensors_io.open_tensors(shard_path))
    return tensors
  if os.path.exists(single_path):
    return safetensors_io.open_tensors(single_path)
  others = [f for f in sorted(os.listdir(path)) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
  hint = f"; found {', '.join(others)}, but only safetensors are supported" if others else ""
  raise CheckpointError(f"checkpoint {path!r}: no weights ({SINGLE_FILE} or {INDEX_FILE}){hint}")


def _check_names(path, cfg, tensors, targets) -> None:
  """Missing, unexpected and misshapen tensors, each error naming the tensor."""
  expected = {}
  for param_path, (names, target) in targets.items():
    per_name_shape = target.shape[1:] if param_path[0] == "layers" else target.shape
    expected.update({name: per_name_shape for name in names})
  missing = [n for n in expected if n not in tensors]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"checkpoint {path!r}: missing tensor {missing[0]}{more}")
  ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  extra = [n for n in tensors if n not in expected and n not in ignored and not n.endswith(IGNORED_SUFFIXES)]
  if extra:
    raise CheckpointError(f"checkpoint {path!r}: unexpected tensor {extra[0]}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  for name, shape in expected.items():
    if tensors[name].shape != tuple(shape):
      raise CheckpointError(f"tensor {name}: shape {tensors[name].shape}, expected {tuple(shape)}")


def _load_param(names, target, tensors, pool, stacked: bool, sharding=None) -> jax.Array:
  """One parameter (a layer axis over `names` when stacked) on the device (each device only its shard
  of `sharding` when given), as target.dtype.

  Host work is a threaded memcpy from the mmapped files in the files' dtype; the dtype conversion runs
  on the device, where it is nearly free (NumPy's float16 -> bfloat16 cast runs at about 0.4 GB/s).
  """
  sources = [tensors[n] for n in names]
  file_dtypes = {s.dtype for s in sources}
  host_dtype = file_dtypes.pop() if len(file_dtypes) == 1 else np.dtype(target.dtype)
  out = np.empty(target.shape, host_dtype)
  if stacked:
    jobs = list(zip(out, sources))
  else:  # split the rows so that large single tensors (embeddings, lm_head) copy in parallel
    bounds = np.linspace(0, out.shape[0], LOAD_THREADS + 1).astype(int)
    jobs = [(out[a:b], sources[0][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  list(pool.map(_copy, jobs))
  array = jax.device_put(out, sharding)
  return array if array.dtype == target.dtype else array.astype(target.dtype)


def _copy(job) -> None:
  destination, source = job
  destination[...] = source


def _random_chunks(pool: np.ndarray, shape, rng, is_norm: bool) -> Iterator[np.ndarray]:
  remaining = int(np.prod(shape))
  start = int(rng.integers(len(pool)))
  while remaining:
    chunk = pool[start:start + remaining]
    yield (chunk.astype(np.float32) + 1).astype(pool.dtype) if is_norm else chunk
    remaining -= len(chunk)
    start = 0


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
