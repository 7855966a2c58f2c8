"""Continuous batching on the host: which sequences prefill or decode next, their pages, preemption.

A sequence's tokens are its prompt then its outputs. The cache holds `num_computed` of them; prefill
fills it up to all but the last token (in chunks within engine.max_prefill_tokens), and decode feeds the
last token, so every token is sampled by decode. When pages run out the newest running sequence is
preempted by recompute: its pages are freed and it waits again with its outputs kept, to be prefilled
anew.

Two-tier placements with local_attention_fraction > 0 have two pools: `allocator` books tier 2's room
and `local_allocator` hands out pages of tier 1's paged cache. Each admission places the sequence on one
side (`Sequence.local`) so the running sequences' expected KV stays near the fraction, on the other side
when the preferred one has no room (at fraction 1 it waits instead); its KV stays there until it finishes or is preempted, and
preemption frees pages on its own side only. Batches carry the real pages of local sequences and the
scratch page for the others (their KV is on tier 2), so tier 1 writes only local KV.

Shapes are bucketed (rows and tokens to powers of two, block-table widths to engine.width_buckets_per_octave
evenly spaced sizes per doubling) so the jitted calls compile a bounded number of times. A decode batch's
width covers its longest row's context at the call's last fused step (the pages reserved for it).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Callable

import numpy as np

from glinthawk_jax.paged_cache import SCRATCH_PAGE, PageAllocator, pages_per_sequence
from glinthawk_jax.requests import SamplingParams

# Smallest buckets, so short prompts, small batches and short contexts share one compiled shape; the
# padding costs little next to reading the weights.
MIN_PREFILL_TOKENS = 16  # tokens of a prefill row
MIN_DECODE_ROWS = 8  # rows of a decode batch
MIN_CONTEXT_TOKENS = 64  # block-table width, in tokens


@dataclasses.dataclass(eq=False)
class Sequence:
  """One request inside the engine."""

  index: int  # position in the caller's prompt list (also the waiting-queue order)
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  max_tokens: int  # params.max_tokens clipped to engine.max_model_len
  stop_ids: frozenset[int] = frozenset()  # token ids that finish the request (EOS unless ignore_eos)
  output_ids: list[int] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  local: bool = False  # KV in tier 1's paged cache under local_attention_fraction (set at admission)
  num_computed: int = 0  # tokens whose K, V are in the pages
  token_times_s: list[float] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  text: str = ""

  @property
  def num_tokens(self) -> int:
    return len(self.prompt_ids) + len(self.output_ids)

  def token(self, i: int) -> int:
    n = len(self.prompt_ids)
    return self.prompt_ids[i] if i < n else self.output_ids[i - n]

  @property
  def decode_ready(self) -> bool:
    return self.num_computed == self.num_tokens - 1


@dataclasses.dataclass
class PrefillBatch:
  """Arrays for ModelRunner.prefill, plus the (sequence, chunk length) rows to commit after it ran."""

  rows: list[tuple[Sequence, int]]
  tokens: np.ndarray  # [R, T] int32
  positions: np.ndarray  # [R, T] int32
  page_ids: np.ndarray  # [R, T] int32
  offsets: np.ndarray  # [R, T] int32
  block_tables: np.ndarray  # [R, W] int32
  context_lens: np.ndarray  # [R] int32

  def commit(self) -> None:
    for seq, chunk in self.rows:
      seq.num_computed += chunk


@dataclasses.dataclass
class DecodeBatch:
  """Arrays for ModelRunner.decode; row i of the result belongs to seqs[i]."""

  seqs: list[Sequence]
  tokens: np.ndarray  # [B] int32: each row's last token
  positions: np.ndarray  # [B] int32
  block_tables: np.ndarray  # [B, W] int32
  token_index: np.ndarray  # [B] int32: index of the next output token
  temperature: np.ndarray  # [B] float32
  top_k: np.ndarray  # [B] int32
  top_p: np.ndarray  # [B] float32
  seeds: np.ndarray  # [B] uint32
  greedy_only: bool


def pow2_at_least(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def pow2_at_most(n: int) -> int:
  """The largest power of two <= n (1 for n < 2)."""
  return 1 << max(int(n), 1).bit_length() - 1


def width_bucket(pages: int, limit: int, per_octave: int = 2) -> int:
  """Smallest width >= pages on the ladder of `per_octave` evenly spaced sizes in each octave [p, 2p]
  (p + ceil(j * p / per_octave), p a power of two), capped at limit. per_octave 1: powers of two; 2: 2^k and
  1.5 * 2^k; 8: every width up to 16, then steps of p / 8 (padding under 1/8 of the width)."""
  p = pow2_at_most(pages)
  j = (pages - p - 1) * per_octave // p + 1 if pages > p else 0  # the first step reaching pages
  return min(p + -(-j * p // per_octave), limit)


class Scheduler:
  """FIFO admission, prefill before decode, LIFO preemption by recompute."""

  def __init__(self, engine_config, allocator: PageAllocator, decode_steps: int,
               local_allocator: PageAllocator | None = None, local_fraction: float = 0.0,
               max_prefill_rows: int = 0):
    self.page_size = engine_config.page_size
    self.max_prefill_rows = max_prefill_rows  # rows of a prefill batch at most (0: the token budget only)
    self.max_num_seqs = engine_config.max_num_seqs
    self.max_model_len = engine_config.max_model_len
    self.max_prefill_tokens = engine_config.max_prefill_tokens
    self.chunk_cap = 1 << int(math.log2(engine_config.max_prefill_tokens))
    self.max_width = pages_per_sequence(engine_config.max_model_len, engine_config.page_size)
    self.widths_per_octave = engine_config.width_buckets_per_octave
    self.allocator = allocator
    self.local_allocator = local_allocator  # tier 1's pool when some two-tier sequences attend locally
    self.local_fraction = local_fraction if local_allocator is not None else 0.0
    self.decode_steps = decode_steps
    self.waiting: list[Sequence] = []  # sorted by index
    self.running: list[Sequence] = []  # in admission order
    self.num_preemptions = 0
    self.preempted: list[Sequence] = []  # sent back to waiting since the last take_preempted()
    self.num_admissions = 0
    self.num_local_admissions = 0  # admissions to local_allocator's pool

  def add(self, seq: Sequence) -> None:
    bisect.insort(self.waiting, seq, key=lambda s: s.index)

  def admit_prefilled(self, seq: Sequence) -> None:
    """Runs a sequence whose KV another worker computed into pages already allocated to it (Splitwise)."""
    self.running.append(seq)

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  def finish(self, seq: Sequence) -> None:
    """Removes a finished sequence and frees its pages."""
    self.running.remove(seq)
    self._pool(seq).free(seq.pages)
    seq.pages = []

  def requeue(self, seq: Sequence) -> None:
    """Sends a running sequence back to waiting to be prefilled anew (its KV was lost); outputs kept."""
    self._preempt(seq)
    self.num_preemptions -= 1

  def preempt(self, seq: Sequence) -> None:
    """Preempts a running sequence by recompute (a KV store outside the scheduler ran out of room)."""
    self._preempt(seq)

  def take_preempted(self) -> list[Sequence]:
    """The sequences preempted or requeued since the last call (their KV elsewhere can go)."""
    taken, self.preempted = self.preempted, []
    return taken

  def _pool(self, seq: Sequence) -> PageAllocator:
    return self.local_allocator if seq.local else self.allocator

  def _device_pages(self, seq: Sequence) -> list[int]:
    """Pages a batch carries: none for a tier-2 sequence beside a local pool (it writes to scratch)."""
    return seq.pages if seq.local or self.local_allocator is None else []

  def _place(self, seq: Sequence, pages: int) -> bool:
    """Chooses seq's side for admission (sets seq.local); False when neither side has `pages` free
    beyond the decode reserve of its running sequences."""
    if self.local_allocator is None:
      return self._room(False, pages)
    size = len(seq.prompt_ids) + seq.max_tokens
    local_kv = sum(len(s.prompt_ids) + s.max_tokens for s in self.running if s.local)
    all_kv = sum(len(s.prompt_ids) + s.max_tokens for s in self.running)
    prefer = local_kv + size / 2 <= self.local_fraction * (all_kv + size)  # the share closest to the fraction
    sides = [prefer] if self.local_fraction in (0.0, 1.0) else [prefer, not prefer]
    for local in sides:
      if self._room(local, pages):
        seq.local = local
        return True
    return False

  def _room(self, local: bool, pages: int) -> bool:
    pool = self.local_allocator if local else self.allocator
    running = sum(s.local == local for s in self.running)
    return pages + running * math.ceil(self.decode_steps / self.page_size) <= pool.num_free

  def _pages_for(self, seq: Sequence, num_cached: int) -> int:
    return max(0, math.ceil(num_cached / self.page_size) - len(seq.pages))

  def _preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    self._pool(seq).free(seq.pages)
    seq.pages = []
    seq.num_computed = 0
    self.num_preemptions += 1
    self.preempted.append(seq)
    self.add(seq)

  def _reserve(self, seq: Sequence, need: int) -> bool:
    """Allocates `need` pages to a running seq, preempting the newest others on its side; False if seq
    was preempted."""
    pool = self._pool(seq)
    while need > pool.num_free:
      victim = [s for s in self.running if s.local == seq.local][-1]
      self._preempt(victim)
      if victim is seq:
        return False
    seq.pages += pool.allocate(need)
    return True

  def schedule_prefill(self, eligible: Callable[[Sequence], bool] = lambda seq: True) -> PrefillBatch | None:
    """Chunks of running-but-unfilled sequences, then newly admitted ones, within the token budget.
    Sequences `eligible` rejects are passed over (they keep their place for a later call)."""
    rows: list[tuple[Sequence, int]] = []
    longest = 0
    for seq in [s for s in self.running if not s.decode_ready and eligible(s)]:
      if self._rows_full(rows):
        break
      chunk = min(seq.num_tokens - 1 - seq.num_computed, self.chunk_cap)
      if rows and not self._fits(len(rows) + 1, max(longest, chunk)):
        break
      if seq not in self.running or not self._reserve(seq, self._pages_for(seq, seq.num_computed + chunk)):
        continue
      rows.append((seq, chunk))
      longest = max(longest, chunk)
    i = 0
    while i < len(self.waiting) and len(self.running) < self.max_num_seqs and not self._rows_full(rows):
      seq = self.waiting[i]
      if not eligible(seq):
        i += 1
        continue
      chunk = min(seq.num_tokens - 1 - seq.num_computed, self.chunk_cap)
      if chunk and rows and not self._fits(len(rows) + 1, max(longest, chunk)):
        break
      need = self._pages_for(seq, seq.num_computed + chunk)
      # Admitted only if its whole prompt and first decode call fit: else its later chunks would
      # preempt it (it is the newest) and it would be admitted again, forever, while nothing decodes.
      whole = self._pages_for(seq, min(seq.num_tokens - 1 + self.decode_steps, self.max_model_len))
      if not self._place(seq, max(need, whole)):
        break
      self.waiting.pop(i)
      self.running.append(seq)
      self.num_admissions += 1
      self.num_local_admissions += seq.local
      seq.pages += self._pool(seq).allocate(need)
      if chunk:
        rows.append((seq, chunk))
        longest = max(longest, chunk)
    return self._prefill_batch(rows, longest) if rows else None

  def _rows_full(self, rows: list) -> bool:
    return 0 < self.max_prefill_rows <= len(rows)

  def _token_bucket(self, longest: int) -> int:
    return min(max(pow2_at_least(longest), MIN_PREFILL_TOKENS), self.chunk_cap)

  def _fits(self, num_rows: int, longest: int) -> bool:
    return pow2_at_least(num_rows) * self._token_bucket(longest) <= self.max_prefill_tokens

  def _width(self, pages: int) -> int:
    pages = max(pages, math.ceil(MIN_CONTEXT_TOKENS / self.page_size))
    return width_bucket(pages, self.max_width, self.widths_per_octave)

  def _prefill_batch(self, rows, longest) -> PrefillBatch:
    r, t = pow2_at_least(len(rows)), self._token_bucket(longest)
    w = self._width(max(len(self._device_pages(s)) for s, _ in rows))
    tokens = np.zeros((r, t), np.int32)
    positions = np.zeros((r, t), np.int32)
    page_ids = np.full((r, t), SCRATCH_PAGE, np.int32)
    offsets = np.zeros((r, t), np.int32)
    block_tables = np.full((r, w), SCRATCH_PAGE, np.int32)
    context_lens = np.ones((r,), np.int32)
    for i, (seq, chunk) in enumerate(rows):
      start = seq.num_computed
      pos = np.arange(start, start + chunk, dtype=np.int32)
      pages = np.asarray(self._device_pages(seq), np.int32)
      tokens[i, :chunk] = (seq.prompt_ids + seq.output_ids)[start:start + chunk]
      positions[i, :chunk] = pos
      positions[i, chunk:] = pos[-1]
      if len(pages):
        page_ids[i, :chunk] = pages[pos // self.page_size]
      offsets[i, :chunk] = pos % self.page_size
      block_tables[i, :len(pages)] = pages
      context_lens[i] = start + chunk
    return PrefillBatch(rows, tokens, positions, page_ids, offsets, block_tables, context_lens)

  def schedule_decode(self) -> DecodeBatch | None:
    """Every decode-ready running sequence, with pages for the next `decode_steps` tokens."""
    for seq in [s for s in self.running if s.decode_ready]:
      if seq in self.running:
        cached = min(seq.num_tokens - 1 + self.decode_steps, self.max_model_len)
        self._reserve(seq, self._pages_for(seq, cached))
    seqs = [s for s in self.running if s.decode_ready]
    if not seqs:
      return None
    b = min(pow2_at_least(max(len(seqs), MIN_DECODE_ROWS)), self.max_num_seqs)
    w = self._width(max(len(self._device_pages(s)) for s in seqs))
    batch = DecodeBatch(
        seqs=seqs, tokens=np.zeros((b,), np.int32), positions=np.zeros((b,), np.int32),
        block_tables=np.full((b, w), SCRATCH_PAGE, np.int32), token_index=np.zeros((b,), np.int32),
        temperature=np.zeros((b,), np.float32), top_k=np.zeros((b,), np.int32),
        top_p=np.ones((b,), np.float32), seeds=np.zeros((b,), np.uint32),
        greedy_only=all(s.params.temperature == 0 for s in seqs))
    for i, seq in enumerate(seqs):
      batch.tokens[i] = seq.token(seq.num_tokens - 1)
      batch.positions[i] = seq.num_tokens - 1
      pages = self._device_pages(seq)
      batch.block_tables[i, :len(pages)] = pages
      batch.token_index[i] = len(seq.output_ids)
      batch.temperature[i] = seq.params.temperature
      batch.top_k[i] = seq.params.top_k
      batch.top_p[i] = seq.params.top_p
      batch.seeds[i] = seq.seed
    return batch
