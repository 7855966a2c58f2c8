"""Which entries of a padded [rows, T] token batch are real tier-2 tokens; the seq_ids markers of rows
that are not."""

from __future__ import annotations

import numpy as np

PADDING_ROW = -1  # seq_ids entry of a padding row
LOCAL_ROW = -2  # seq_ids entry of a row attending on tier 1's paged cache (local_attention_fraction)


def valid_tokens(seq_ids: np.ndarray, positions: np.ndarray, context_lens: np.ndarray):
  """(rows, cols) of real tokens: rows with seq_id >= 0, the first context_len - positions[:, 0] columns.

  seq_ids: [R] (tier-2 ids; PADDING_ROW and LOCAL_ROW rows hold no tier-2 token), positions: [R, T]
  (chunk start in column 0), context_lens: [R].
  """
  t = positions.shape[1]
  count = np.where(seq_ids >= 0, context_lens - positions[:, 0], 0)
  return np.nonzero(np.arange(t)[None, :] < count[:, None])
