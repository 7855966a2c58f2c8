"""Tier 1 over several local devices: tensor parallelism (a "model" mesh axis) and layer slices.

The first engine.tensor_parallel * engine.layer_slices devices form a (stage, model) mesh. Slice s owns
the contiguous layers [s * L / S, (s + 1) * L / S) and the devices of mesh row s; each slice's jitted
code runs on its own 1-D ("model",) mesh, and the residual stream is moved between slices.

Parameter shardings, Megatron-style on the Hugging Face [out, in] layout (GSPMD inserts the collectives:
an all-reduce after o_proj and down_proj, a gather of the logits):
  q/k/v/gate/up (and q/k/v biases): column-parallel, the out axis split, so each device holds whole
    heads (tensor_parallel divides the heads and the KV heads, so GQA groups stay on one device);
  o/down: row-parallel, the in axis split;
  embed_tokens: the hidden axis split; lm_head: the vocabulary axis split (replicated if it does not
    divide); norms replicated. The stacked layer axis is split over the stages (the slices).
The paged KV pool [layers, pages, page_size, kv_heads, head_dim] is split on the KV-head axis.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glinthawk_jax.config import ConfigError
from models.model_config import ModelConfig

MODEL, STAGE = "model", "stage"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q_bias", "k_bias", "v_bias",
                   "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj", "embed_tokens")
KV_POOL_SPEC = P(None, None, None, MODEL)  # trailing None dropped, as jit outputs name it


def layer_bounds(num_layers: int, slices: int) -> list[tuple[int, int]]:
  """[first, end) of each of `slices` equal, contiguous layer ranges (slices divides num_layers)."""
  per = num_layers // slices
  return [(s * per, (s + 1) * per) for s in range(slices)]


class Layout:
  """Where tier 1's weights and KV live: `layer_slices` slices of `tensor_parallel` devices each."""

  def __init__(self, num_layers: int, tensor_parallel: int = 1, layer_slices: int = 1, devices=None):
    devices = list(devices if devices is not None else jax.local_devices())[:tensor_parallel * layer_slices]
    self.tensor_parallel, self.layer_slices = tensor_parallel, layer_slices
    self.devices = devices
    self.mesh = Mesh(np.array(devices, dtype=object).reshape(layer_slices, tensor_parallel), (STAGE, MODEL))
    self.slice_meshes = [Mesh(self.mesh.devices[s], (MODEL,)) for s in range(layer_slices)]
    self.layers_per_slice = num_layers // layer_slices
    self.bounds = layer_bounds(num_layers, layer_slices)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> "Layout":
    """The config's layout; ConfigError naming the key when the model or the devices do not allow it."""
    ec = config.engine
    tp, slices = ec.tensor_parallel, ec.layer_slices
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
      if getattr(model, name) % tp:
        raise ConfigError(f"engine.tensor_parallel={tp} does not divide the model's {name}="
                          f"{getattr(model, name)}")
    if model.num_layers % slices:
      raise ConfigError(f"engine.layer_slices={slices} does not divide the model's num_layers={model.num_layers}")
    available = len(jax.local_devices())
    if tp * slices > available:
      raise ConfigError(f"engine.tensor_parallel={tp} x engine.layer_slices={slices} = {tp * slices} devices; "
                        f"{available} local available ({jax.local_devices()[0].platform})")
    return cls(model.num_layers, tp, slices)

  @property
  def num_devices(self) -> int:
    return self.tensor_parallel * self.layer_slices

  def slice_of(self, layer: int) -> int:
    return layer // self.layers_per_slice

  def replicated(self, s: int) -> NamedSharding:
    return NamedSharding(self.slice_meshes[s], P())

  def kv_sharding(self, s: int) -> NamedSharding:
    """Sharding of slice s's KV pool: split on the KV-head axis (spelled as jit outputs name it, so
    donated pools keep one jit cache entry)."""
    return NamedSharding(self.slice_meshes[s], KV_POOL_SPEC if self.tensor_parallel > 1 else P())

  def to_slice(self, x: jax.Array, s: int) -> jax.Array:
    """x on slice s's devices (replicated); moved only when it lies elsewhere."""
    if isinstance(x, jax.Array) and x.sharding.device_set == set(self.slice_meshes[s].devices.flat):
      return x
    return jax.device_put(x, self.replicated(s))

  # Parameters.

  def shardings(self, state):
    """NamedShardings over the (stage, model) mesh for a model state (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
      names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
      stacked = names[0] == "layers"
      own = self._own_spec(names[-1], leaf.shape[1:] if stacked else leaf.shape)
      return NamedSharding(self.mesh, P(STAGE, *own) if stacked else P(*own))

    return jax.tree_util.tree_map_with_path(one, state)

  def _own_spec(self, name: str, shape) -> tuple:
    spec = [None] * len(shape)
    if name in COLUMN_PARALLEL and shape[0] % self.tensor_parallel == 0:
      spec[0] = MODEL
    elif name in ROW_PARALLEL and shape[-1] % self.tensor_parallel == 0:
      spec[-1] = MODEL
    return tuple(spec)

  def place(self, state):
    """The state on the mesh (a no-op for arrays already placed, e.g. loaded by checkpoint.py)."""
    return jax.device_put(state, self.shardings(state))

  def slice_params(self, state, s: int):
    """(outer, stacked layers) of a placed state on slice s's mesh, sharing its device buffers.

    outer keeps zero-size layer leaves: embed and logits never read them.
    """
    outer = {k: v for k, v in state.items() if k != "layers"}
    empty = jax.tree.map(lambda a: jax.device_put(np.zeros((0,) + a.shape[1:], a.dtype), self.replicated(s)),
                         state["layers"])
    outer = type(state)({**jax.tree.map(lambda a: self._piece(a, s), outer), "layers": empty})
    return outer, jax.tree.map(lambda a: self._piece(a, s), state["layers"])

  def _piece(self, a: jax.Array, s: int) -> jax.Array:
    spec = tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    shape = tuple(d // self.layer_slices if ax == STAGE else d for d, ax in zip(a.shape, spec))
    sharding = NamedSharding(self.slice_meshes[s], P(*(None if ax == STAGE else ax for ax in spec)))
    by_device = {shard.device: shard.data for shard in a.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        shape, sharding, [by_device[d] for d in sharding.addressable_devices_indices_map(shape)])

  def split_layers(self, stacked, s: int) -> list:
    """Slice s's stacked layer state as one state per layer, each keeping its tensor-parallel sharding."""
    shardings = jax.tree.map(lambda a: NamedSharding(self.slice_meshes[s], P(*a.sharding.spec[1:])), stacked)
    take = jax.jit(lambda st, i: jax.tree.map(lambda a: a[i], st), out_shardings=shardings)
    return [take(stacked, i) for i in range(self.layers_per_slice)]

  def per_layer_params(self, state) -> tuple[list, list]:
    """(one state per layer of the whole model, each on its slice; the outer state of every slice)."""
    state = self.place(state)
    layers, outers = [], []
    for s in range(self.layer_slices):
      outer, stacked = self.slice_params(state, s)
      outers.append(outer)
      layers += self.split_layers(stacked, s)
    return layers, outers
