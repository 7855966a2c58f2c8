"""Hardware profiles: what a device can do and what it costs, from a datasheet or from measurement.

A profile is JSON (configs/hardware/*.json). `source` says where the figures came from:
"datasheet" (vendor peak figures times stated efficiencies, for hardware we do not have) or
"measured" (written by launch/profile.py on the machine itself). `notes` names sources and
assumptions; a plan quoting a datasheet profile must say so.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from glinthawk_jax.json_file import write_json

SOURCES = ("datasheet", "measured")
KINDS = ("accelerator", "cpu")


class ProfileError(ValueError):
  """A profile file is missing a key or holds a value outside what is allowed; names both."""


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """One machine (or VM) of one kind; `devices` of them share the price (e.g. 8 GPUs of a DGX)."""

  name: str
  kind: str  # accelerator or cpu
  source: str  # datasheet or measured
  memory_gb: float  # per device, GB (1e9 bytes)
  mem_bandwidth_gbs: float  # per device, GB/s, peak (datasheet) or achieved (measured)
  peak_tflops: float  # per device, dense fp16/bf16 (accelerator) or fp32 (cpu) TFLOP/s
  network_gbps: float  # NIC of the whole machine, Gbit/s
  price_per_hour: float  # USD for the whole machine
  devices: int = 1  # devices per machine (tensor-parallel group); figures above are per device
  bandwidth_efficiency: float = 1.0  # achieved / peak memory bandwidth (1.0 for measured profiles)
  compute_efficiency: float = 1.0  # achieved / peak FLOP/s
  usable_memory_fraction: float = 0.9  # share of memory left after runtime, workspace, activations
  step_overhead_s: float = 0.0  # fixed cost per layer step (kernel launches, dispatch)
  notes: str = ""  # sources and assumptions, in words
  measurements: dict = dataclasses.field(default_factory=dict)  # raw timing tables (measured only)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ProfileError(f"profile {self.name!r}: source={self.source!r}: expected one of {SOURCES}")
    if self.kind not in KINDS:
      raise ProfileError(f"profile {self.name!r}: kind={self.kind!r}: expected one of {KINDS}")
    for key in ("memory_gb", "mem_bandwidth_gbs", "peak_tflops", "network_gbps", "devices"):
      if getattr(self, key) <= 0:
        raise ProfileError(f"profile {self.name!r}: {key}={getattr(self, key)}: expected > 0")
    if self.price_per_hour < 0:
      raise ProfileError(f"profile {self.name!r}: price_per_hour={self.price_per_hour}: expected >= 0")
    for key in ("bandwidth_efficiency", "compute_efficiency", "usable_memory_fraction"):
      if not 0.0 < getattr(self, key) <= 1.0:
        raise ProfileError(f"profile {self.name!r}: {key}={getattr(self, key)}: expected (0, 1]")

  @property
  def bandwidth(self) -> float:
    """Achievable memory bandwidth of the whole machine, bytes/s."""
    return self.mem_bandwidth_gbs * 1e9 * self.bandwidth_efficiency * self.devices

  @property
  def flops(self) -> float:
    """Achievable FLOP/s of the whole machine."""
    return self.peak_tflops * 1e12 * self.compute_efficiency * self.devices

  @property
  def usable_memory(self) -> float:
    """Bytes of the whole machine's memory available to weights and KV."""
    return self.memory_gb * 1e9 * self.usable_memory_fraction * self.devices

  @property
  def network(self) -> float:
    """NIC bandwidth, bytes/s."""
    return self.network_gbps * 1e9 / 8

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def from_dict(d: dict[str, Any], where: str = "profile") -> HardwareProfile:
  fields = {f.name for f in dataclasses.fields(HardwareProfile)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ProfileError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
  try:
    return HardwareProfile(**d)
  except TypeError as e:
    raise ProfileError(f"{where}: {e}") from e


def load(path: str) -> HardwareProfile:
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ProfileError(f"{path}: not JSON: {e}") from e
  return from_dict(d, where=path)


def save(profile: HardwareProfile, path: str) -> None:
  write_json(path, profile.to_dict(), end="\n")


@dataclasses.dataclass(frozen=True)
class Network:
  """The link between tiers: one-way propagation delay and per-direction bandwidth cap."""

  one_way_latency_s: float = 0.0
  bandwidth_gbps: float = 0.0  # 0 = limited only by the machines' NICs

  def __post_init__(self):
    if self.one_way_latency_s < 0:
      raise ProfileError(f"network: one_way_latency_s={self.one_way_latency_s}: expected >= 0")
    if self.bandwidth_gbps < 0:
      raise ProfileError(f"network: bandwidth_gbps={self.bandwidth_gbps}: expected >= 0")
