"""Page allocation of a tier-2 server: a free list and a block table per sequence."""

from __future__ import annotations

import numpy as np


class PoolFullError(RuntimeError):
  """Not enough free pages for a request; nothing was allocated."""


class PageTable:
  """Hands out pages of a pool of `num_pages` pages of `page_size` tokens to sequences.

  A sequence's page j holds its positions [j * page_size, (j + 1) * page_size); the same pages
  serve every layer of the pool.
  """

  def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
    self.num_pages = num_pages
    self.page_size = page_size
    self.max_pages_per_seq = max_pages_per_seq
    self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
    self._pages: dict[int, list[int]] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_sequences(self) -> int:
    return len(self._pages)

  def __contains__(self, seq_id: int) -> bool:
    return seq_id in self._pages

  def add(self, seq_ids) -> None:
    """Registers sequences with no pages yet; KeyError naming the first one already known;
    PoolFullError when there would be more sequences than pages (each needs at least one)."""
    seq_ids = [int(s) for s in seq_ids]
    known = [s for s in seq_ids if s in self._pages]
    if known:
      raise KeyError(f"sequence {known[0]} is already allocated")
    if len(set(seq_ids)) != len(seq_ids):
      raise KeyError(f"sequence ids {seq_ids} repeat")
    if len(self._pages) + len(seq_ids) > self.num_pages:
      raise PoolFullError(f"{len(seq_ids)} more sequences would exceed the pool's {self.num_pages} pages "
                          f"({len(self._pages)} sequences held)")
    for s in seq_ids:
      self._pages[s] = []

  def remove(self, seq_ids) -> None:
    """Frees the sequences' pages; KeyError naming the first unknown one (then nothing is freed)."""
    seq_ids = [int(s) for s in seq_ids]
    unknown = [s for s in seq_ids if s not in self._pages]
    if unknown:
      raise KeyError(f"sequence {unknown[0]} is not allocated")
    for s in set(seq_ids):
      self._free.extend(reversed(self._pages.pop(s)))

  def grow(self, seq_ids: np.ndarray, positions: np.ndarray) -> None:
    """Gives each sequence pages up to its largest position here; PoolFullError leaves all as was."""
    need = {}
    for s, p in zip(seq_ids.tolist(), positions.tolist()):
      need[s] = max(need.get(s, 0), p // self.page_size + 1)
    extra = {s: n - len(self._pages[s]) for s, n in need.items() if n > len(self._pages[s])}
    total = sum(extra.values())
    if total > len(self._free):
      raise PoolFullError(f"{total} more KV pages needed, {len(self._free)} free of {self.num_pages}")
    for s, n in extra.items():
      self._pages[s].extend(self._free.pop() for _ in range(n))

  def slots(self, seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Flat slot (page * page_size + offset) of each token: int32 [N]."""
    pages = [self._pages[s][p // self.page_size] for s, p in zip(seq_ids.tolist(), positions.tolist())]
    return np.asarray(pages, np.int32) * self.page_size + positions % self.page_size

  def block_tables(self, seq_ids: np.ndarray, width: int) -> np.ndarray:
    """Pages of each token's sequence, padded with page 0 to `width`: int32 [N, width]."""
    table = np.zeros((len(seq_ids), width), np.int32)
    for i, s in enumerate(seq_ids.tolist()):
      pages = self._pages[s][:width]
      table[i, :len(pages)] = pages
    return table
