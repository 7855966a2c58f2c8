"""Starts one tier-2 server: python launch/tier2.py --config=configs/tiny.py --port=0 --cpus=0.

Tier 2 runs JAX on the CPU device only (on a GPU host it would otherwise take the GPU). Pins the
process to --cpus and makes NumPy's BLAS single-threaded before JAX or NumPy load (XLA sizes its CPU
thread pool from the affinity; BLAS otherwise starts a thread per core).
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ[_var] = "1"

import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root replaces launch/

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model config (dimensions).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; loopback unless set.")
_PORT = flags.DEFINE_integer("port", 0, "Port; 0 picks a free one (printed on the ready line).")
_CPUS = flags.DEFINE_string("cpus", "", "Cores to pin to, e.g. 0-3 or 0,2; empty = leave as is.")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 1.0, "Size of the preallocated KV pool in GiB.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bfloat16", ["bfloat16", "float32", "int8"],
                              "Storage dtype of the KV pool.")
_LAYERS = flags.DEFINE_string("layers", "", "Layers held, inclusive, e.g. 0-31; empty = all.")
_AUTH_TOKEN = flags.DEFINE_string("auth_token", "", "Shared token clients must send; empty = none.")
_TLS_CERT = flags.DEFINE_string("tls_cert", "", "PEM certificate chain: serve TLS (with --tls_key).")
_TLS_KEY = flags.DEFINE_string("tls_key", "", "PEM private key of --tls_cert.")
_INJECT_DELAY_MS = flags.DEFINE_float("inject_delay_ms", 0.0, "Delay added to each tensor RPC.")
_SHM = flags.DEFINE_bool("shm", True, "Accept shared-memory tensor regions from same-host clients.")
_SERVE_THREADS = flags.DEFINE_integer("serve_threads", 1, "Shared-memory calls served at once (>= 1).")
_EXIT_WITH_PARENT_PID = flags.DEFINE_integer(
    "exit_with_parent_pid", 0, "Exit when this process (the tier 1 that spawned us) dies; 0 = never.")


def _parse_range(text: str, name: str) -> list[int]:
  """'0-3' or '0,2,5' or '7' -> sorted ints; ValueError naming the flag."""
  values = set()
  try:
    for part in text.split(","):
      lo, _, hi = part.partition("-")
      values.update(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise ValueError(f"--{name}={text!r}: expected ranges like 0-3 or 0,2,5") from None
  if not values:
    raise ValueError(f"--{name}={text!r}: empty")
  return sorted(values)


def main(argv):
  del argv
  if _EXIT_WITH_PARENT_PID.value:
    from tier2_cpu.lifetime import exit_with_parent  # noqa: PLC0415 (no jax: safe before pinning)
    exit_with_parent(_EXIT_WITH_PARENT_PID.value)
  if _CPUS.value:
    os.sched_setaffinity(0, _parse_range(_CPUS.value, "cpus"))
  from glinthawk_jax.config import model_config, validate  # noqa: PLC0415 (after pinning, see doc)
  from tier2_cpu import server  # noqa: PLC0415 (imports jax)

  validate(_CONFIG.value)
  cfg = model_config(_CONFIG.value)
  first, end = 0, cfg.num_layers
  if _LAYERS.value:
    layers = _parse_range(_LAYERS.value, "layers")
    first, end = layers[0], layers[-1] + 1
    if layers != list(range(first, end)):
      raise ValueError(f"--layers={_LAYERS.value!r}: expected one contiguous range")
  server.serve(server.ServerOptions(
      num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, first_layer=first, end_layer=end,
      page_size=_CONFIG.value.engine.page_size, max_seq_len=_CONFIG.value.engine.max_model_len,
      kv_cache_gb=_KV_CACHE_GB.value, kv_dtype=_KV_DTYPE.value, host=_HOST.value, port=_PORT.value,
      auth_token=_AUTH_TOKEN.value, inject_delay_ms=_INJECT_DELAY_MS.value, shm=_SHM.value,
      serve_threads=_SERVE_THREADS.value,
      tls_cert=_TLS_CERT.value, tls_key=_TLS_KEY.value))


if __name__ == "__main__":
  app.run(main)
