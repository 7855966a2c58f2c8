"""Tier 1's tier-2 servers: connect to config.tier2.addresses, or spawn config.tier2.spawn local ones
(per layer slice: with engine.layer_slices > 1 each slice's servers hold only its layers).

Spawned servers are children of this process (tier2_cpu/process.py); `Tier2Servers.close()` stops them,
and an atexit hook does so too when the caller never gets to (Ctrl-C unwinding past it). With
tier2.pin_tier1, an accelerator tier 1 moves its own threads onto the cores its servers were not given
while they run, so a tier-1 thread woken by a reply never preempts a tier-2 kernel thread.
"""

from __future__ import annotations

import atexit
import logging
import os

import jax
import ml_collections

from glinthawk_jax.sharding import layer_bounds
from glinthawk_jax.tier2_client import Tier2Client
from glinthawk_jax.tier2_slices import SlicedTier2Client
from models.model_config import ModelConfig

_MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "max_position_embeddings")


def server_args(config: ml_collections.ConfigDict, model: ModelConfig, cpus: str,
                layers: tuple[int, int] | None = None) -> list[str]:
  """launch/tier2.py flags for a server holding layers [first, end) of `model` (default all)."""
  t = config.tier2
  args = ["--config=configs/tiny.py", "--port=0", f"--kv_cache_gb={t.kv_cache_gb}",
          f"--kv_dtype={t.kv_dtype}", f"--inject_delay_ms={t.inject_delay_ms}", f"--serve_threads={t.serve_threads}",
          f"--config.engine.page_size={config.engine.page_size}",
          f"--config.engine.max_model_len={config.engine.max_model_len}"]
  args += [f"--config.model.{k}={getattr(model, k)}" for k in _MODEL_KEYS]
  if layers is not None:
    args.append(f"--layers={layers[0]}-{layers[1] - 1}")
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


def pin_to_free_cores(server_cores: list[str]):
  """Moves every thread of this process onto its cores that no server of `server_cores` (core_lists'
  output) uses, when some are free; returns a function restoring the previous cores, or None when
  nothing moved."""
  before = os.sched_getaffinity(0)
  taken = {int(c) for cores in server_cores for c in cores.split(",") if c}
  free = before - taken
  if not free or not taken:
    return None
  _set_threads_affinity(free)
  logging.info("tier 1 pinned to cores %s (tier-2 servers on %d others)", sorted(free), len(taken))
  return lambda: _set_threads_affinity(before)


def _set_threads_affinity(cores: set[int]) -> None:
  """Every thread of this process (sched_setaffinity(0) moves only the calling one); new threads inherit."""
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), cores)
    except (ProcessLookupError, PermissionError):
      pass  # a thread that ended meanwhile


class Tier2Servers:
  """The servers a run uses and a connected Tier2Client (a SlicedTier2Client with engine.layer_slices > 1);
  `fleets` holds one Tier2Client per layer slice. Owns the processes it spawned."""

  def __init__(self, config: ml_collections.ConfigDict, model: ModelConfig, ready_timeout_s: float = 120.0):
    from tier2_cpu.process import ServerProcess, huge_page_env  # noqa: PLC0415 (only when spawning)

    t = config.tier2
    self.client = None
    self.fleets: list[Tier2Client] = []
    self.processes = []
    self._unpin = None  # restores this process's cores (pin_to_free_cores)
    slices = config.engine.layer_slices
    ranges = layer_bounds(model.num_layers, slices)
    groups = [[a.strip() for a in group.split(",") if a.strip()] for group in t.addresses.split(";")]
    try:
      if not t.addresses:
        atexit.register(self.close)  # before the first child exists: Ctrl-C while they start
        server_cores = core_lists(t.cpus, t.spawn * slices)
        cores = iter(server_cores)
        for layers in ranges:
          for _ in range(t.spawn):
            self.processes.append(ServerProcess(server_args(config, model, next(cores), layers),
                                                env=huge_page_env(t.huge_pages)))
        spawned = [p.wait_ready(ready_timeout_s) for p in self.processes]
        if t.pin_tier1 and t.cpus == "auto" and jax.default_backend() != "cpu":  # CPU compute needs the cores
          self._unpin = pin_to_free_cores(server_cores)
        logging.info("spawned %d tier-2 servers: %s", len(spawned), ", ".join(spawned))
        groups = [spawned[s * t.spawn:(s + 1) * t.spawn] for s in range(slices)]
      self.addresses = [a for group in groups for a in group]
      self.client = SlicedTier2Client(self.fleets, ranges[0][1])  # closes whatever connected if one fails
      for group, layers in zip(groups, ranges):
        self.fleets.append(Tier2Client.for_model(group, model, layers=layers, timeout_s=t.timeout_s,
                                             transport=t.transport, auth_token=t.auth_token,
                                             tls_ca=t.tls_ca,  # set with addresses only
                                             native_writer=t.native_writer))
      if slices == 1:
        self.client = self.fleets[0]
    except BaseException:
      self.close()
      raise

  @property
  def pids(self) -> list[int]:
    return [p.process.pid for p in self.processes]

  def close(self) -> None:
    from tier2_cpu.process import stop_servers  # noqa: PLC0415

    if self.client is not None:
      self.client.close()
      self.client = None
    if self.processes:
      stop_servers(self.processes)
      self.processes = []
    if self._unpin:
      self._unpin()
      self._unpin = None
