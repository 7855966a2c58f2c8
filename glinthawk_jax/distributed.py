"""Tier 1 across hosts: joins this process to a multi-process JAX runtime (config.distributed).

With distributed.coordinator_address set, every tier-1 process calls `jax.distributed.initialize`
before JAX touches a device; `jax.devices()` then lists the accelerators of all processes and
`jax.local_devices()` this one's. Unset (the default), nothing happens. Steps: docs/MULTI_HOST.md.
"""

from __future__ import annotations

import logging

import ml_collections


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Calls jax.distributed.initialize from config.distributed; returns whether it did."""
  d = config.distributed
  if not d.coordinator_address:
    return False
  import jax  # noqa: PLC0415 (only when joining)

  local = [int(i) for i in d.local_device_ids.split(",")] if d.local_device_ids else None
  jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                             process_id=d.process_id, local_device_ids=local,
                             initialization_timeout=d.initialization_timeout_s)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
