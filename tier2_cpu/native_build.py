"""Compile tier 2's C++ kernels (and the shared-memory client's batch writer, shm_ring.cc) with g++ at
first use and load them; the .so is cached under tier2_cpu/_build/, keyed by a hash of the source, csrc's
own headers, the flags, the JAX FFI headers and the CPU's flags (the code is built with -march=native)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

CSRC = pathlib.Path(__file__).parent / "csrc"
BUILD_DIR = pathlib.Path(__file__).parent / "_build"
# -mprefer-vector-width=512: GCC's tuning for AVX-512 Xeons otherwise keeps loops at 256 bits.
CXXFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-fPIC",
            "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-Wall")


class NativeBuildError(RuntimeError):
  """The C++ kernel could not be compiled (no g++, or a compile error)."""


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return ""


def load_library(source: str) -> ctypes.CDLL:
  """Build (once per source/CPU) and load `csrc/<source>` as a shared library."""
  src = CSRC / source
  include = jax.ffi.include_dir()
  key = hashlib.sha256()
  headers = [h.read_bytes() for h in sorted(CSRC.glob("*.h"))]  # included by the sources
  for part in (src.read_bytes(), *headers, " ".join(CXXFLAGS).encode(), include.encode(),
               _cpu_flags().encode()):
    key.update(part)
  lib = BUILD_DIR / f"{src.stem}-{key.hexdigest()[:16]}.so"
  if not lib.exists():
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
      raise NativeBuildError(f"building {src}: g++ not found on PATH (install g++ or set CXX)")
    BUILD_DIR.mkdir(exist_ok=True)
    # Build to a temporary name, then rename: several processes may build at once.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, "-shared", f"-I{include}", str(src), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      os.unlink(tmp)
      raise NativeBuildError(f"building {src} failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, lib)
  return ctypes.CDLL(str(lib))
