"""Page allocation of a tier-2 server: a free list and a block table per sequence."""

from __future__ import annotations

import numpy as np


class PoolFullError(RuntimeError):
  """Not enough free pages for a request; nothing was allocated."""


class PageTable:
  """Hands out pages of a pool of `num_pages` pages of `page_size` tokens to sequences.

  A sequence's page j holds its positions [j * page_size, (j + 1) * page_size); the same pages
  serve every layer of the pool. Each sequence's block table is a row of one zero-padded matrix, so a
  call's slots and block tables are one gather each (not a Python loop over its tokens).
  """

  def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
    self.num_pages = num_pages
    self.page_size = page_size
    self.max_pages_per_seq = max_pages_per_seq
    self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
    self._held: dict[int, int] = {}  # seq -> pages held
    self._row: dict[int, int] = {}  # seq -> its row of _table
    self._free_rows: list[int] = []
    self._table = np.zeros((0, max_pages_per_seq), np.int32)  # doubles its rows when full

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_sequences(self) -> int:
    return len(self._held)

  def __contains__(self, seq_id: int) -> bool:
    return seq_id in self._held

  def add(self, seq_ids) -> None:
    """Registers sequences with no pages yet; KeyError naming the first one already known;
    PoolFullError when there would be more sequences than pages (each needs at least one)."""
    seq_ids = [int(s) for s in seq_ids]
    known = [s for s in seq_ids if s in self._held]
    if known:
      raise KeyError(f"sequence {known[0]} is already allocated")
    if len(set(seq_ids)) != len(seq_ids):
      raise KeyError(f"sequence ids {seq_ids} repeat")
    if len(self._held) + len(seq_ids) > self.num_pages:
      raise PoolFullError(f"{len(seq_ids)} more sequences would exceed the pool's {self.num_pages} pages "
                          f"({len(self._held)} sequences held)")
    for s in seq_ids:
      if not self._free_rows:
        rows = len(self._table)
        self._table = np.concatenate([self._table, np.zeros((max(rows, 1), self.max_pages_per_seq), np.int32)])
        self._free_rows.extend(range(len(self._table) - 1, rows - 1, -1))
      self._held[s], self._row[s] = 0, self._free_rows.pop()

  def remove(self, seq_ids) -> None:
    """Frees the sequences' pages; KeyError naming the first unknown one (then nothing is freed)."""
    seq_ids = [int(s) for s in seq_ids]
    unknown = [s for s in seq_ids if s not in self._held]
    if unknown:
      raise KeyError(f"sequence {unknown[0]} is not allocated")
    for s in set(seq_ids):
      row = self._row.pop(s)
      self._free.extend(reversed(self._table[row, :self._held.pop(s)].tolist()))
      self._table[row] = 0
      self._free_rows.append(row)

  def grow(self, seq_ids, positions) -> None:
    """Gives each sequence pages up to its largest position here (ints, or arrays of them);
    PoolFullError leaves all as was."""
    need = {}  # pages by sequence, of those that need more
    for s, p in zip(seq_ids, positions):
      n = p // self.page_size + 1
      if n > need.get(s, self._held[s]):
        need[s] = n
    wide = [s for s, n in need.items() if n > self.max_pages_per_seq]
    if wide:
      raise PoolFullError(f"sequence {wide[0]} would need {need[wide[0]]} pages, more than the "
                          f"{self.max_pages_per_seq} a sequence may hold")
    extra = {s: n - self._held[s] for s, n in need.items()}
    total = sum(extra.values())
    if total > len(self._free):
      raise PoolFullError(f"{total} more KV pages needed, {len(self._free)} free of {self.num_pages}")
    for s, n in extra.items():
      held = self._held[s]
      self._table[self._row[s], held:held + n] = [self._free.pop() for _ in range(n)]
      self._held[s] = held + n

  def slots_and_tables(self, seq_ids: np.ndarray, positions: np.ndarray, width: int) -> tuple:
    """Each token's flat slot (page * page_size + offset), int32 [N], and its sequence's pages padded
    with page 0 to `width`, int32 [N, width] (None for width 0). Its pages must be held (grow)."""
    rows = np.array([self._row[s] for s in seq_ids.tolist()], np.intp)
    page, offset = np.divmod(positions, self.page_size)
    return self._table[rows, page] * self.page_size + offset, (self._table[rows, :width] if width else None)
