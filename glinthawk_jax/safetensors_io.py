"""The safetensors file format, read through mmap (bf16 via ml_dtypes) and written from numpy buffers.

Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the tensors' bytes; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file is malformed or holds a dtype we do not load; the message names file and tensor."""


def open_tensors(path: str) -> dict[str, np.ndarray]:
  """Read-only mmapped views of every tensor in the file, by name; nothing is read until used."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise SafetensorsError(f"{path}: unreadable header ({e})") from e
  header.pop("__metadata__", None)
  data_start = 8 + header_len
  size = os.path.getsize(path)
  buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
  views = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"tensor {name} in {path}: dtype {info['dtype']} is not supported "
                             f"(expected one of {', '.join(DTYPES)})")
    dtype = DTYPES[info["dtype"]]
    begin, end = (data_start + o for o in info["data_offsets"])
    shape = tuple(info["shape"])
    if end > size or end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(f"tensor {name} in {path}: data offsets {info['data_offsets']} do not fit "
                             f"shape {shape} {info['dtype']} in a file of {size} bytes")
    views[name] = buffer[begin:end].view(dtype).reshape(shape)
  return views


def write_file(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Iterable[np.ndarray]]]):
  """Writes (name, shape, dtype, chunks) entries; chunks are arrays whose bytes, in order, fill the tensor.

  Streaming chunks lets a writer reuse one buffer instead of holding whole tensors in memory.
  """
  entries = list(tensors)
  header, offset = {}, 0
  for name, shape, dtype, _ in entries:
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # aligned data, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for name, shape, dtype, chunks in entries:
      written = 0
      for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=dtype).reshape(-1)
        f.write(chunk.view(np.uint8).data)
        written += chunk.nbytes
      if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
        raise SafetensorsError(f"tensor {name}: wrote {written} bytes, header says otherwise")
