"""Tier 2's paged KV pool: K,V for many sequences over a range of layers, stored on JAX's CPU device
as float32, bfloat16 or int8, with attention computed by a C++ kernel through the XLA FFI.

Layout per layer: K [num_pages, kv_heads, head_dim, page_size] (pages transposed: the kernel scores
a page's keys in vector lanes), V [num_pages, kv_heads, page_size, head_dim] (int8 adds float32
scales [num_pages, kv_heads, page_size], one per token and KV head). A slot is
page * page_size + offset_in_page. Appends are a C++ kernel too (kv_append.cc) that writes the donated
pool buffers in place and reads k, v where the caller holds them; attention never runs XLA's
half-precision CPU dot (50x slower than fp32, FACTS.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tier2_cpu import native_build

STORAGES = ("bfloat16", "float32", "int8")
OUTPUTS = ("float32", "bfloat16")  # attention output dtypes (bf16 is rounded by the kernel as it stores)
# Attention targets by (storage, output dtype), and their symbols.
_TARGETS = {(storage, out): f"tier2_paged_attention_{code}" + ("_to_bf16" if out == "bfloat16" else "")
            for storage, code in (("float32", "f32"), ("bfloat16", "bf16"), ("int8", "int8")) for out in OUTPUTS}
_SYMBOLS = {"float32": "PagedAttentionF32", "bfloat16": "PagedAttentionBF16", "int8": "PagedAttentionInt8"}
# bf16 is held as its uint16 bits (the kernels read and write bits; XLA's CPU scatter into a bf16
# buffer converted the whole buffer: 0.4 s for 256 MiB, measured).
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.uint16, "int8": jnp.int8}
BF16 = np.dtype(ml_dtypes.bfloat16)  # compared, not named: dtype.name takes 3 us, a few times a call


# Append targets by (storage, dtype of the k, v sent): a bf16 pool takes bf16 bits or float32.
_APPEND_TARGETS = {("float32", "float32"): "tier2_kv_append_f32", ("bfloat16", "uint16"): "tier2_kv_append_bf16",
                   ("bfloat16", "float32"): "tier2_kv_append_bf16_from_f32", ("int8", "float32"): "tier2_kv_append_int8"}
_APPEND_SYMBOLS = {"tier2_kv_append_f32": "KvAppendF32", "tier2_kv_append_bf16": "KvAppendBF16",
                   "tier2_kv_append_bf16_from_f32": "KvAppendBF16FromF32", "tier2_kv_append_int8": "KvAppendInt8"}


@functools.cache
def _register_kernels() -> None:
  lib = native_build.load_library("paged_attention.cc")
  for (storage, out), target in _TARGETS.items():
    symbol = _SYMBOLS[storage] + ("ToBF16" if out == "bfloat16" else "")
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  lib = native_build.load_library("kv_append.cc")
  for target, symbol in _APPEND_SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def _bucket(n: int, least: int = 1) -> int:
  """Next power of two >= n: bounds the number of shapes jit compiles for."""
  return max(least, 1 << max(0, n - 1).bit_length())


def _token_bytes(storage: str, num_kv_heads: int, head_dim: int) -> int:
  """Bytes of K and V (and int8 scales) for one token in one layer."""
  per_head = head_dim * np.dtype(_DTYPES[storage]).itemsize + (4 if storage == "int8" else 0)
  return 2 * num_kv_heads * per_head


@functools.partial(jax.jit, static_argnames=("storage", "kv_dtype"), donate_argnums=(0,))
def _write(arrays, page, offset, kv, *, storage, kv_dtype):
  """Store the k, v at addresses kv = [k, v] (_addresses; [n, kv_heads, dim] C-contiguous arrays of kv_dtype, kept
  alive by the caller until this completes) in slots (page, offset), in place: the pool buffers are
  aliased to the C++ append's results and donated. Out-of-range pages are padding rows, dropped."""
  call = jax.ffi.ffi_call(_APPEND_TARGETS[storage, kv_dtype],
                          tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
                          input_output_aliases={3 + i: i for i in range(len(arrays))})
  return tuple(call(page, offset, kv, *arrays))


@functools.partial(jax.jit, static_argnames=("storage", "out_dtype"))
def _attend(arrays, q, block_tables, positions, *, storage, out_dtype="float32"):
  """Output float32, or bf16 as its uint16 bits (out_dtype bfloat16)."""
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32 if out_dtype == "float32" else jnp.uint16)
  return jax.ffi.ffi_call(_TARGETS[storage, out_dtype], out)(q, block_tables, positions, *arrays)


@functools.partial(jax.jit, static_argnames=("storage", "kv_dtype", "out_dtype"), donate_argnums=(0,))
def _write_attend(arrays, page, offset, kv, q, block_tables, positions, *, storage, kv_dtype, out_dtype):
  """_write then _attend in one dispatch (a decode call's whole tier-2 work)."""
  arrays = _write(arrays, page, offset, kv, storage=storage, kv_dtype=kv_dtype)
  return arrays, _attend(arrays, q, block_tables, positions, storage=storage, out_dtype=out_dtype)


def _check_float(name: str, x, ndim: int) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype.kind not in "fV" and x.dtype != BF16:
    raise TypeError(f"{name}: dtype {x.dtype}, expected float32, bfloat16 or float16")
  if x.ndim != ndim:
    raise ValueError(f"{name}: shape {x.shape}, expected {ndim} dimensions")
  return x


def _as_f32(name: str, x, ndim: int) -> np.ndarray:
  return np.ascontiguousarray(_check_float(name, x, ndim), dtype=np.float32)


class KVPool:
  """Preallocated paged K,V for `num_layers` layers; see the module docstring for the layout."""

  def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
               head_dim: int, storage: str = "bfloat16"):
    if storage not in STORAGES:
      raise ValueError(f"storage {storage!r}: expected one of {STORAGES}")
    self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
    self.num_kv_heads, self.head_dim, self.storage = num_kv_heads, head_dim, storage
    _register_kernels()
    self._device = jax.devices("cpu")[0]
    v_shape = (num_pages, num_kv_heads, page_size, head_dim)
    k_shape = (num_pages, num_kv_heads, head_dim, page_size)
    dtype = _DTYPES[storage]
    self._layers = []
    for _ in range(num_layers):
      arrays = [jnp.zeros(shape, dtype, device=self._device) for shape in (k_shape, v_shape)]
      if storage == "int8":
        arrays += [jnp.ones(v_shape[:3], jnp.float32, device=self._device) for _ in range(2)]
      self._layers.append(tuple(arrays))

  @property
  def bytes_per_token(self) -> int:
    """K,V bytes one token takes over all layers of the pool (scales included)."""
    return self.num_layers * _token_bytes(self.storage, self.num_kv_heads, self.head_dim)

  @property
  def nbytes(self) -> int:
    return self.num_pages * self.page_size * self.bytes_per_token

  @staticmethod
  def pages_for_budget(kv_cache_bytes: int, num_layers: int, page_size: int, num_kv_heads: int,
                       head_dim: int, storage: str = "bfloat16") -> int:
    """How many pages fit in `kv_cache_bytes`."""
    if storage not in STORAGES:
      raise ValueError(f"storage {storage!r}: expected one of {STORAGES}")
    page_bytes = page_size * num_layers * _token_bytes(storage, num_kv_heads, head_dim)
    return kv_cache_bytes // page_bytes

  def _check_layer(self, layer: int) -> None:
    if not 0 <= layer < self.num_layers:
      raise IndexError(f"layer {layer} outside the pool's {self.num_layers} layers")

  def write(self, layer: int, slots, k, v) -> None:
    """Store k, v: [n, kv_heads, head_dim] at `slots` (page * page_size + offset)."""
    page, offset, kv, kv_dtype, k, v = self._write_args(layer, slots, k, v)
    self._layers[layer] = _write(self._layers[layer], page, offset, kv, storage=self.storage, kv_dtype=kv_dtype)
    # The kernel reads k, v in place: they stay referenced here until it is done, and the caller
    # may reuse their buffer (a shared-memory request) as soon as this returns.
    jax.block_until_ready(self._layers[layer])

  def stored(self, layer: int) -> tuple[np.ndarray, ...]:
    """Copies of the layer's K, V pages (and int8 scales) as stored: the module docstring's layout."""
    self._check_layer(layer)
    return tuple(np.array(a) for a in self._layers[layer])

  def attend(self, layer: int, q, block_tables, positions) -> np.ndarray:
    """Attention of q: [n, heads, head_dim] over positions 0..positions[i] of each row's sequence.

    block_tables: [n, max_pages] page indices of row i's sequence. Returns float32 [n, heads, dim].
    """
    args = self._attend_args(layer, q, block_tables, positions)
    return np.asarray(_attend(self._layers[layer], *args, storage=self.storage))[:np.shape(q)[0]]

  def write_attend(self, layer: int, slots, k, v, q, block_tables, positions, out_dtype: str = "float32") -> np.ndarray:
    """write(layer, slots, k, v) then attend(layer, q, block_tables, positions), in one dispatch; the
    output in `out_dtype` (one of OUTPUTS: a bf16 reply is rounded by the kernel, not by NumPy, whose
    cast of a decode call's output took 44 us, measured)."""
    if out_dtype not in OUTPUTS:
      raise ValueError(f"out_dtype {out_dtype!r}: expected one of {OUTPUTS}")
    page, offset, kv, kv_dtype, k, v = self._write_args(layer, slots, k, v)
    attend_args = self._attend_args(layer, q, block_tables, positions)
    self._layers[layer], out = _write_attend(self._layers[layer], page, offset, kv, *attend_args,
                                             storage=self.storage, kv_dtype=kv_dtype, out_dtype=out_dtype)
    out = np.asarray(out)[:np.shape(q)[0]]  # waits for the write too: k, v are referenced until then
    return out.view(ml_dtypes.bfloat16) if out_dtype == "bfloat16" else out

  def _write_args(self, layer: int, slots, k, v) -> tuple:
    """(page, offset, kv, kv_dtype, k, v) for _write: page and offset padded to a bucketed row count
    (padding pages are dropped), kv the addresses of k and v (C-contiguous, bf16 as uint16 bits or
    float32, kv_dtype's name)."""
    self._check_layer(layer)
    slots = np.asarray(slots).reshape(-1)  # integers (a page table's int32 as they are)
    if self.storage == "bfloat16" and _is_bf16(k) and _is_bf16(v):
      # Stored as is: no widening, half the bytes.
      kv_dtype, k, v = "uint16", *(np.ascontiguousarray(x).view(np.uint16) for x in (k, v))
    else:
      kv_dtype, k, v = "float32", _as_f32("k", k, 3), _as_f32("v", v, 3)
    expected = (slots.shape[0], self.num_kv_heads, self.head_dim)
    for name, x in (("k", k), ("v", v)):
      if x.shape != expected:
        raise ValueError(f"{name}: shape {x.shape}, expected {expected}")
    if slots.size and (slots.min() < 0 or slots.max() >= self.num_pages * self.page_size):
      bad = slots[(slots < 0) | (slots >= self.num_pages * self.page_size)][0]
      raise IndexError(f"slot {bad} outside the pool's {self.num_pages * self.page_size} slots")
    padded = np.full(_bucket(slots.shape[0]), self.num_pages * self.page_size, np.int32)
    padded[:slots.shape[0]] = slots  # padding rows: page out of range, dropped
    return *np.divmod(padded, self.page_size), _addresses(k, v), kv_dtype, k, v

  def _attend_args(self, layer: int, q, block_tables, positions) -> tuple:
    """(q, block_tables, positions) for _attend, rows and pages padded to buckets."""
    self._check_layer(layer)
    q = _check_float("q", q, 3)
    block_tables = np.asarray(block_tables, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.int32).reshape(-1)
    n, heads, dim = q.shape
    if dim != self.head_dim or heads % self.num_kv_heads:
      raise ValueError(f"q: shape {q.shape}, expected [n, a multiple of {self.num_kv_heads} heads, "
                       f"{self.head_dim}]")
    if block_tables.ndim != 2 or block_tables.shape[0] != n or positions.shape[0] != n:
      raise ValueError(f"block_tables {block_tables.shape} / positions {positions.shape}: "
                       f"expected [{n}, max_pages] / [{n}]")
    if n and positions.max() >= block_tables.shape[1] * self.page_size:
      i = int(np.argmax(positions))
      raise IndexError(f"positions[{i}] = {positions[i]} beyond block_tables' "
                       f"{block_tables.shape[1]} pages of {self.page_size}")
    size, pages = _bucket(n), _bucket(block_tables.shape[1])
    tables = np.zeros((size, pages), np.int32)
    tables[:n, :block_tables.shape[1]] = block_tables
    pos = np.full(size, -1, np.int32)  # padding rows: no keys, output zeros
    pos[:n] = positions
    padded = _aligned_empty((size, heads, dim), np.float32)
    padded[:n] = q  # padding rows' queries are never read
    return padded, tables, pos


def _addresses(*arrays) -> np.ndarray:
  """The arrays' data addresses as uint64 in uint32 pairs (JAX holds no 64-bit ints without x64)."""
  return np.array([x.ctypes.data for x in arrays], np.uint64).view(np.uint32)


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.empty starting at a 64-byte boundary: XLA's CPU client takes such an argument without a copy
  (a jitted call with a 512 KiB q: 6 us against 79 us when q was not aligned, measured)."""
  nbytes = math.prod(shape) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _is_bf16(x) -> bool:
  return getattr(x, "dtype", None) == BF16
