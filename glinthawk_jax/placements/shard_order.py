"""Row orders of a decode batch by tier-2 shard (NumPy only: the simulator mirrors the runner with them)."""

from __future__ import annotations

import numpy as np


def interleaved(shards: np.ndarray) -> np.ndarray:
  """Order of rows on `shards` (one shard index a row) in which the shards take turns in proportion to
  their rows: by rank within the shard over the shard's rows, then shard. Any contiguous cut of it holds
  about its share of every shard's rows."""
  shards = np.asarray(shards, np.int64)
  if not len(shards):
    return np.zeros(0, np.int64)
  sizes = np.bincount(shards)
  grouped = np.argsort(shards, kind="stable")
  rank = np.empty(len(shards), np.float64)
  rank[grouped] = np.arange(len(shards)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  return np.lexsort((shards, rank / sizes[shards]))


def grouped_within(shards: np.ndarray, cuts: list[slice]) -> np.ndarray:
  """A permutation of rows on `shards` that sorts each cut (a slice of rows) by shard, stably, and leaves
  rows outside the cuts in place: a micro-batch cut from an interleaved order keeps its share of every
  shard, and each shard's rows in it become one contiguous run (sent as views of the batch, not gathers)."""
  perm = np.arange(len(shards))
  for cut in cuts:
    perm[cut] = perm[cut][np.argsort(shards[cut], kind="stable")]
  return perm
