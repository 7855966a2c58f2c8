"""Which entries of a padded [rows, T] token batch are real tokens."""

from __future__ import annotations

import numpy as np


def valid_tokens(seq_ids: np.ndarray, positions: np.ndarray, context_lens: np.ndarray):
  """(rows, cols) of real tokens: rows with seq_id >= 0, the first context_len - positions[:, 0] columns.

  seq_ids: [R] (-1 = padding row), positions: [R, T] (chunk start in column 0), context_lens: [R].
  """
  t = positions.shape[1]
  count = np.where(seq_ids >= 0, context_lens - positions[:, 0], 0)
  return np.nonzero(np.arange(t)[None, :] < count[:, None])
