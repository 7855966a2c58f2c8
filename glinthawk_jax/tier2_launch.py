"""Tier 1's tier-2 servers: connect to config.tier2.addresses, or spawn config.tier2.spawn local ones.

Spawned servers are children of this process (tier2_cpu/process.py); `Tier2Servers.close()` stops them,
and an atexit hook does so too when the caller never gets to (Ctrl-C unwinding past it).
"""

from __future__ import annotations

import atexit
import os

import ml_collections

from glinthawk_jax.tier2_client import Tier2Client
from models.model_config import ModelConfig

_MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim")


def server_args(config: ml_collections.ConfigDict, model: ModelConfig, cpus: str) -> list[str]:
  """launch/tier2.py flags for a server holding every layer of `model`."""
  t = config.tier2
  args = ["--config=configs/tiny.py", "--port=0", f"--kv_cache_gb={t.kv_cache_gb}",
          f"--kv_dtype={t.kv_dtype}", f"--inject_delay_ms={t.inject_delay_ms}",
          f"--config.engine.page_size={config.engine.page_size}",
          f"--config.engine.max_model_len={config.engine.max_model_len}"]
  args += [f"--config.model.{k}={getattr(model, k)}" for k in _MODEL_KEYS]
  return args + ([f"--cpus={cpus}"] if cpus else [])


def core_lists(spec: str, count: int) -> list[str]:
  """Per-server core lists: "auto" splits this process's cores evenly (all share one when fewer)."""
  if spec != "auto":
    return [part.strip() for part in spec.split(";")]
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < count:
    return [""] * count
  per = len(cores) // count
  return [",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(count)]


class Tier2Servers:
  """The servers a run uses and a connected Tier2Client; owns the processes it spawned."""

  def __init__(self, config: ml_collections.ConfigDict, model: ModelConfig):
    from tier2_cpu.process import start_servers  # noqa: PLC0415 (only when spawning)

    t = config.tier2
    self.processes = []
    addresses = [a.strip() for a in t.addresses.split(",") if a.strip()]
    if not addresses:
      cpus = core_lists(t.cpus, t.spawn)
      self.processes = start_servers([server_args(config, model, c) for c in cpus])
      atexit.register(self.close)
      addresses = [p.address for p in self.processes]
    self.addresses = addresses
    try:
      self.client = Tier2Client.for_model(addresses, model, timeout_s=t.timeout_s, transport=t.transport)
    except Exception:
      self.close()
      raise

  def close(self) -> None:
    from tier2_cpu.process import stop_servers  # noqa: PLC0415

    client = getattr(self, "client", None)
    if client is not None:
      client.close()
      self.client = None
    if self.processes:
      stop_servers(self.processes)
      self.processes = []
