"""Float64 NumPy reference of what a tier-2 server computes, shared by the tier-2 tests."""

import numpy as np


class ReferenceKV:
  """Per (layer, sequence) K and V by position; attention over positions 0..p."""

  def __init__(self):
    self.k, self.v = {}, {}

  def attend(self, layer, seq_ids, positions, q, k, v):
    """Writes every token first, then returns float64 outputs [N, H, D]."""
    for s, p, kk, vv in zip(seq_ids, positions, np.asarray(k, np.float64), np.asarray(v, np.float64)):
      self.k.setdefault((layer, s), {})[p] = kk
      self.v.setdefault((layer, s), {})[p] = vv
    q = np.asarray(q, np.float64)
    n, h, d = q.shape
    out = np.zeros((n, h, d))
    for i, (s, p) in enumerate(zip(seq_ids, positions)):
      keys = np.stack([self.k[(layer, s)][j] for j in range(p + 1)])  # [T, KV, D]
      values = np.stack([self.v[(layer, s)][j] for j in range(p + 1)])
      group = h // keys.shape[1]
      for head in range(h):
        scores = keys[:, head // group] @ q[i, head] / np.sqrt(d)
        weights = np.exp(scores - scores.max())
        out[i, head] = (weights / weights.sum()) @ values[:, head // group]
    return out
