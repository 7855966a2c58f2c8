"""Raw-bytes layout of the tensor path (/glinthawk.tier2.Tensor/Attend): no protobuf, no pickle.

Request: HEADER, then seq_ids int64[N], positions int32[N], q [N, H, D], k [N, KV, D], v [N, KV, D]
(q, k, v in the header's dtype, C order, little-endian). Reply: the attention output [N, H, D] in
the same dtype, nothing else.

Append-only request (K, V of a prompt computed on tier 1, no attention): magic APPEND_MAGIC and no q
(H still in the header, for validation); the reply is empty. Both go to the same method.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct

import ml_dtypes
import numpy as np

PROTOCOL_VERSION = 2  # 2: shm_wire's REPLY carries the server's send time
MAGIC = b"GT2A"
APPEND_MAGIC = b"GT2K"
# magic, version, dtype code, (pad), request id, layer, num tokens N, heads H, kv heads KV, head dim D.
HEADER = struct.Struct("<4sHBxQiiiii")
ATTEND_METHOD = "/glinthawk.tier2.Tensor/Attend"
ECHO_METHOD = "/glinthawk.tier2.Tensor/Echo"  # returns its payload; for transport measurements
DTYPE_CODES = {1: np.dtype(np.float32), 2: np.dtype(ml_dtypes.bfloat16), 3: np.dtype(np.float16)}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


class WireError(ValueError):
  """A tensor request or reply does not follow the layout; the message names the field."""


@dataclasses.dataclass(frozen=True)
class AttendRequest:
  """One decoded request; arrays are read-only views of the payload."""
  request_id: int
  layer: int
  seq_ids: np.ndarray  # int64 [N]
  positions: np.ndarray  # int32 [N]
  q: np.ndarray  # [N, H, D]
  k: np.ndarray  # [N, KV, D]
  v: np.ndarray  # [N, KV, D]

  @property
  def append_only(self) -> bool:
    """No queries (q is [0, H, D]): append K, V and reply with nothing."""
    return self.q.shape[0] == 0 and self.k.shape[0] > 0


def encode_request(request_id: int, layer: int, seq_ids, positions, q: np.ndarray, k: np.ndarray,
                   v: np.ndarray) -> bytes:
  """Packs one request; q, k and v must share a dtype of DTYPE_CODES."""
  return b"".join(p.tobytes() for p in request_parts(request_id, layer, seq_ids, positions, q, k, v))


def request_parts(request_id: int, layer: int, seq_ids, positions, q: np.ndarray | None, k: np.ndarray,
                  v: np.ndarray, num_heads: int = 0, contiguous: bool = True) -> list[np.ndarray]:
  """The pieces of encode_request's bytes, in order, as C-contiguous arrays (the header as uint8),
  for writers that place them straight into a buffer (shared memory) instead of joining them.

  q=None makes an append-only request; `num_heads` then fills the header's H. contiguous=False leaves
  q, k, v as given (strided views, for a writer that copies them into place itself: one copy, not two).
  """
  seq_ids = np.ascontiguousarray(seq_ids, np.int64)
  positions = np.ascontiguousarray(positions, np.int32)
  n = seq_ids.shape[0]
  append_only = q is None
  if append_only:
    if num_heads <= 0:
      raise WireError(f"num_heads={num_heads}: an append-only request needs the model's heads")
    q = np.empty((n, num_heads, k.shape[2] if k.ndim == 3 else 0), k.dtype)
  if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
    raise WireError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [N, H, D], k = v [N, KV, D]")
  if q.shape[0] != n or k.shape[0] != n or positions.shape != (n,) or q.shape[2] != k.shape[2]:
    raise WireError(f"seq_ids {seq_ids.shape}, positions {positions.shape}, q {q.shape}, k {k.shape}: "
                    "token counts or head dims differ")
  if not q.dtype == k.dtype == v.dtype or q.dtype not in CODE_OF_DTYPE:
    raise WireError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: expected one of "
                    f"{[str(d) for d in CODE_OF_DTYPE]} shared by all three")
  header = HEADER.pack(APPEND_MAGIC if append_only else MAGIC, PROTOCOL_VERSION, CODE_OF_DTYPE[q.dtype],
                       request_id, layer, n, q.shape[1], k.shape[1], q.shape[2])
  tensors = (q[:0] if append_only else q, k, v)
  return [np.frombuffer(header, np.uint8), seq_ids, positions,
          *((np.ascontiguousarray if contiguous else np.asarray)(t) for t in tensors)]


def decode_request(payload) -> AttendRequest:
  """Unpacks and checks sizes; raises WireError naming the bad field.

  `payload`: bytes or any buffer (a memoryview of shared memory); the arrays are views of it.
  """
  if len(payload) < HEADER.size:
    raise WireError(f"request of {len(payload)} bytes is shorter than the {HEADER.size}-byte header")
  magic, version, code, request_id, layer, n, h, kv, d = HEADER.unpack_from(payload)
  if magic not in (MAGIC, APPEND_MAGIC):
    raise WireError(f"header magic {magic!r}: expected {MAGIC!r} or {APPEND_MAGIC!r}")
  if version != PROTOCOL_VERSION:
    raise WireError(f"header version {version}: expected {PROTOCOL_VERSION}")
  if code not in DTYPE_CODES:
    raise WireError(f"header dtype code {code}: expected one of {sorted(DTYPE_CODES)}")
  for name, value in (("num_tokens", n), ("num_heads", h), ("num_kv_heads", kv), ("head_dim", d)):
    if value <= 0:
      raise WireError(f"header {name}={value}: expected > 0")
  dtype = DTYPE_CODES[code]
  nq = 0 if magic == APPEND_MAGIC else n
  sizes = (8 * n, 4 * n, nq * h * d * dtype.itemsize, n * kv * d * dtype.itemsize,
           n * kv * d * dtype.itemsize)
  expected = HEADER.size + sum(sizes)
  if len(payload) != expected:
    raise WireError(f"request {request_id}: {len(payload)} bytes, expected {expected} for N={n}, "
                    f"H={h}, KV={kv}, D={d}, dtype {dtype}")
  offsets = list(itertools.accumulate((HEADER.size,) + sizes))  # plain ints: this runs per call
  view = lambda i, dt, shape: np.frombuffer(payload, dt, count=math.prod(shape), offset=offsets[i]).reshape(shape)
  return AttendRequest(request_id, layer, view(0, np.int64, (n,)), view(1, np.int32, (n,)),
                       view(2, dtype, (nq, h, d)), view(3, dtype, (n, kv, d)), view(4, dtype, (n, kv, d)))


def encode_reply(out: np.ndarray) -> bytes:
  return _c_bytes(out)


def decode_reply(payload, shape: tuple[int, ...], dtype) -> np.ndarray:
  """The attention output [N, H, D]; raises WireError if the size is not that of `shape`."""
  dtype = np.dtype(dtype)
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(payload) != expected:
    raise WireError(f"reply of {len(payload)} bytes, expected {expected} for {shape} {dtype}")
  return np.frombuffer(payload, dtype).reshape(shape)


def _c_bytes(x: np.ndarray) -> bytes:
  return np.ascontiguousarray(x).tobytes()  # every host we run on is little-endian
