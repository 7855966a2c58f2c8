"""Scheduler decisions on the host: admission, chunking, page reservation, preemption, buckets."""

from glinthawk_jax.config import base_config
from glinthawk_jax.paged_cache import PageAllocator
from glinthawk_jax.requests import SamplingParams
from glinthawk_jax.scheduler import Scheduler, Sequence, pow2_at_least, pow2_at_most, width_bucket


def _engine_config(**kw):
  c = base_config().engine
  c.update(dict(max_num_seqs=4, page_size=4, max_model_len=64, max_prefill_tokens=32))
  c.update(kw)
  return c


def _scheduler(num_pages=64, decode_steps=1, max_prefill_rows=0, **kw):
  return Scheduler(_engine_config(**kw), PageAllocator(num_pages), decode_steps, max_prefill_rows=max_prefill_rows)


def _seq(i, n):
  return Sequence(index=i, request_id=str(i), prompt_ids=list(range(1, n + 1)), params=SamplingParams(),
                  seed=i, max_tokens=16)


def _run_prefills(s):
  batches = []
  while (b := s.schedule_prefill()) is not None:
    b.commit()
    batches.append(b)
  return batches


def test_max_prefill_rows_prefills_each_prompt_alone_in_order():
  s = _scheduler(max_prefill_rows=1)
  for i, n in enumerate([5, 3, 9, 2]):
    s.add(_seq(i, n))
  batches = _run_prefills(s)
  assert [[(seq.index, chunk) for seq, chunk in b.rows] for b in batches] == [[(0, 4)], [(1, 2)], [(2, 8)], [(3, 1)]]
  assert [b.tokens.shape for b in batches] == [(1, 16)] * 4  # one shape: a lone row of the token bucket
  assert all(seq.decode_ready for seq in s.running)


def test_sequences_not_eligible_keep_their_place_while_later_ones_prefill():
  """A Splitwise prefill worker at its shipped-batch limit still prefills its own requests."""
  s = _scheduler(max_prefill_tokens=16)
  s.add(_seq(0, 40))  # chunked: its first chunk runs now, its later ones wait with it
  s.schedule_prefill().commit()
  for i, n in ((1, 9), (2, 5), (3, 7)):
    s.add(_seq(i, n))
  shipped = {0, 2}
  batches = []
  while (b := s.schedule_prefill(lambda seq: seq.index not in shipped)) is not None:
    b.commit()
    batches.append(b)
  assert [[(seq.index, chunk) for seq, chunk in b.rows] for b in batches] == [[(1, 8)], [(3, 6)]]
  assert [q.index for q in s.waiting] == [2] and s.running[0].num_computed == 16
  assert [(seq.index, chunk) for seq, chunk in s.schedule_prefill().rows] == [(0, 16)]

def test_buckets():
  assert [pow2_at_least(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
  assert [width_bucket(n, 100) for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 17)] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 24]
  assert width_bucket(40, 33) == 33
  assert [width_bucket(n, 100, 1) for n in (1, 3, 5, 9, 17)] == [1, 4, 8, 16, 32]
  assert [width_bucket(n, 100, 4) for n in (5, 9, 11, 13, 15, 17, 21)] == [5, 10, 12, 14, 16, 20, 24]
  assert [width_bucket(n, 100, 8) for n in range(1, 17)] == list(range(1, 17))


def test_width_ladder_bounds_padding_and_distinct_widths():
  """per_octave sizes per doubling: padding under one step (p / per_octave pages), at most per_octave
  widths per octave (the compile bound)."""
  for per_octave in (1, 2, 3, 4, 8):
    widths = set()
    for pages in range(1, 1025):
      w = width_bucket(pages, 4096, per_octave)
      assert pages <= w < pages + -(-pow2_at_most(pages) // per_octave), (per_octave, pages, w)
      widths.add(w)
    assert len(widths) <= 10 * per_octave + 1  # 10 octaves up to 1024 pages


def _decode_widths(per_octave, steps=3):
  """(block-table width, pages the longest row needs by the call's last step) of every decode call of
  two sequences run to their max_tokens, prompts 5 and 30, page 4."""
  s = _scheduler(num_pages=200, decode_steps=steps, max_model_len=256, width_buckets_per_octave=per_octave)
  for i, n in enumerate((5, 30)):
    s.add(Sequence(index=i, request_id=str(i), prompt_ids=list(range(1, n + 1)), params=SamplingParams(),
                   seed=i, max_tokens=200 - n))
  _run_prefills(s)
  calls = []
  while (d := s.schedule_decode()) is not None:
    need = max(-(-min(q.num_tokens - 1 + steps, 256) // 4) for q in d.seqs)
    calls.append((d.block_tables.shape[1], need))
    for q in d.seqs:
      q.output_ids += [7] * steps
      q.num_computed = q.num_tokens - 1
      if len(q.output_ids) >= q.max_tokens:
        s.finish(q)
  return calls


def test_decode_width_tracks_the_longest_context_at_the_calls_last_step():
  fine, coarse = _decode_widths(8), _decode_widths(2)
  # page 4: at least 16 pages (MIN_CONTEXT_TOKENS); 16..32 pages in steps of 2, then steps of 4
  assert all(max(need, 16) <= w <= max(need, 16) + (2 if need <= 32 else 4) - 1 for w, need in fine)
  assert sorted({w for w, _ in fine}) == [16, 18, 20, 22, 24, 26, 28, 30, 32, 36, 40, 44, 48, 52]
  assert sorted({w for w, _ in coarse}) == [16, 24, 32, 48, 64]
  assert sum(w for w, _ in fine) < 0.9 * sum(w for w, _ in coarse)  # less padded KV read


def test_admission_stops_at_max_num_seqs_and_prefill_leaves_the_last_token_to_decode():
  s = _scheduler()
  for i, n in enumerate([5, 3, 9, 2, 7, 4]):
    s.add(_seq(i, n))
  batches = _run_prefills(s)
  assert [seq.index for seq in s.running] == [0, 1, 2, 3] and [q.index for q in s.waiting] == [4, 5]
  assert [(seq.index, chunk) for b in batches for seq, chunk in b.rows] == [(0, 4), (1, 2), (2, 8), (3, 1)]
  # rows and tokens go to powers of two (at least 16 tokens); 2 rows x 16 fill the 32-token budget
  assert [b.tokens.shape for b in batches] == [(2, 16), (2, 16)]
  b = batches[1]
  assert b.tokens[0, :8].tolist() == list(range(1, 9)) and b.context_lens.tolist() == [8, 1]
  assert b.page_ids[1, 1] == 0 and b.positions[0, 8:].tolist() == [7] * 8  # padding: scratch page
  d = s.schedule_decode()
  assert [q.index for q in d.seqs] == [0, 1, 2, 3]
  assert d.tokens[:4].tolist() == [5, 3, 9, 2] and d.positions[:4].tolist() == [4, 2, 8, 1]
  assert d.greedy_only


def test_finish_frees_pages_and_admits_the_next_prompt():
  s = _scheduler(max_num_seqs=2)
  for i in range(3):
    s.add(_seq(i, 6))
  _run_prefills(s)
  free = s.allocator.num_free
  done = s.running[0]
  s.finish(done)
  assert s.allocator.num_free == free + 2
  _run_prefills(s)
  assert [q.index for q in s.running] == [1, 2]


def test_long_prompt_is_chunked_to_the_token_budget():
  s = _scheduler(max_prefill_tokens=16)
  s.add(_seq(0, 40))
  chunks = [chunk for b in _run_prefills(s) for _, chunk in b.rows]
  assert chunks == [16, 16, 7]
  assert s.running[0].decode_ready and len(s.running[0].pages) == 10


def test_decode_reserves_pages_for_every_fused_step():
  s = _scheduler(decode_steps=6, max_num_seqs=16, max_model_len=128)
  s.add(_seq(0, 4))
  _run_prefills(s)
  d = s.schedule_decode()
  assert len(s.running[0].pages) == 3  # positions 3..8 cached by the call -> 9 tokens -> 3 pages
  assert d.block_tables.shape == (8, 16)  # at least 8 rows and 64 tokens of context
  assert d.block_tables[0, :3].tolist() == s.running[0].pages and not d.block_tables[1:].any()


def test_out_of_pages_preempts_the_newest_and_it_resumes_first_with_its_outputs():
  s = _scheduler(num_pages=1 + 16 + 1, max_num_seqs=4, decode_steps=4)  # 16 pages = one 64-token sequence
  for i in range(3):
    s.add(_seq(i, 15))  # 4 pages each once decode reserves 4 steps
  _run_prefills(s)
  for q in s.running:
    q.output_ids += [7] * 8
    q.num_computed = q.num_tokens - 1
  d = s.schedule_decode()
  assert s.num_preemptions == 1 and [q.index for q in d.seqs] == [0, 1]
  victim = s.waiting[0]
  assert victim.index == 2 and victim.num_computed == 0 and victim.pages == [] and len(victim.output_ids) == 8
  assert s.allocator.num_free + sum(len(q.pages) for q in s.running) == 17
  assert s.take_preempted() == [victim] and s.take_preempted() == []


def test_a_prompt_is_admitted_only_when_all_its_chunks_fit():
  """Admitting on the first chunk alone let a long prompt preempt itself at a later chunk and be
  admitted again, forever, while the running sequences never decoded."""
  s = _scheduler(num_pages=1 + 12, max_prefill_tokens=16)
  s.add(_seq(0, 16))  # 4 pages
  s.add(_seq(1, 40))  # 10 pages: only 8 left
  _run_prefills(s)
  assert [q.index for q in s.running] == [0] and [q.index for q in s.waiting] == [1]
  s.finish(s.running[0])
  _run_prefills(s)
  assert [q.index for q in s.running] == [1] and s.running[0].decode_ready and s.num_preemptions == 0


def _shared(local_pages, fraction, tier2_pages=64):
  """A two-tier scheduler with tier 1's pool beside tier 2's (local_attention_fraction)."""
  c = _engine_config(max_prefill_tokens=64)
  return Scheduler(c, PageAllocator(tier2_pages), 1, PageAllocator(local_pages), fraction)


def test_local_share_places_sequences_near_the_fraction_and_batches_carry_only_local_pages():
  s = _shared(64, 0.5)
  for i in range(4):
    s.add(_seq(i, 8))  # expected KV 8 + 16 each
  _run_prefills(s)
  assert [q.local for q in s.running] == [True, False, True, False]
  assert (s.num_local_admissions, s.num_admissions) == (2, 4)
  assert s.local_allocator.num_free == 63 - 4 and s.allocator.num_free == 63 - 4
  d = s.schedule_decode()
  for i, q in enumerate(d.seqs):
    assert d.block_tables[i, :len(q.pages)].tolist() == (q.pages if q.local else [0] * len(q.pages))


def test_local_share_uses_the_other_side_when_full_except_at_fraction_one():
  s = _shared(3, 0.5)  # 2 free local pages: one 8-token prompt
  for i in range(4):
    s.add(_seq(i, 8))
  _run_prefills(s)
  assert [q.local for q in s.running] == [True, False, False, False]
  s = _shared(3, 1.0)
  for i in range(2):
    s.add(_seq(i, 8))
  _run_prefills(s)
  assert [q.local for q in s.running] == [True] and len(s.waiting) == 1


def test_a_local_sequence_out_of_pages_preempts_the_newest_local_one_not_a_tier2_one():
  s = _shared(5, 0.5)  # 4 free local pages
  for i, n in enumerate([8, 8, 4, 8]):
    s.add(_seq(i, n))
  _run_prefills(s)
  first, _, newest_local, newest = s.running
  assert [q.local for q in s.running] == [True, False, True, False]
  for _ in range(5):  # the first sequence grows into two more pages; the local pool has one left
    first.output_ids.append(7)
    first.num_computed = first.num_tokens - 1
    s.schedule_decode()
  assert s.take_preempted() == [newest_local] and newest in s.running
  assert s.local_allocator.num_free == 0 and len(first.pages) == 4
