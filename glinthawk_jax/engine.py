"""The local engine: requests in, RequestOutputs out; continuous batching over a paged KV cache.

Layers: Engine (requests, stop rules, outputs) -> Scheduler (what runs, pages, preemption) ->
ModelRunner (jitted prefill/decode over an attention backend) -> models/ (the model).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
from typing import Callable, Sequence as Seq

import ml_collections
import numpy as np
import tqdm

from glinthawk_jax import config as config_lib
from glinthawk_jax.checkpoint import load_model
from glinthawk_jax.model_runner import LocalPagedAttention, ModelRunner
from glinthawk_jax.paged_cache import GIB, KVCacheTooSmallError, PageAllocator, num_pages_for, pages_per_sequence
from glinthawk_jax.placements.tokens import LOCAL_ROW, PADDING_ROW
from glinthawk_jax.requests import FINISH_LENGTH, FINISH_STOP, RequestOutput, SamplingParams
from glinthawk_jax.scheduler import Scheduler, Sequence
from glinthawk_jax.sharding import Layout
from glinthawk_jax.tier2_client import KVCacheFullError, ShardUnavailableError, Tier2Error
from glinthawk_jax.tier2_launch import Tier2Servers
from glinthawk_jax.tokenizer import load_tokenizer

SEED_STRIDE = 1_000_003  # default seed of request i: config.seed * SEED_STRIDE + i (mod 2^32)


class SchedulerStalledError(RuntimeError):
  """Neither a prefill nor a decode could be scheduled while requests remain (a scheduler bug)."""


@dataclasses.dataclass
class EngineStats:
  """Counters over the engine's lifetime (all generate calls)."""

  num_pages: int = 0
  page_size: int = 0
  kv_pool_gib: float = 0.0
  num_prefill_calls: int = 0
  num_decode_calls: int = 0
  num_preemptions: int = 0
  prefill_time_s: float = 0.0
  decode_time_s: float = 0.0
  num_compilations: int = 0  # distinct jitted shapes run (each compiled once)
  num_tier2_failovers: int = 0  # tier-2 shards lost mid-run (their sequences re-prefilled elsewhere)
  num_local_pages: int = 0  # pages of tier 1's paged cache (two-tier placements: local_attention_fraction > 0)
  num_local_admissions: int = 0  # sequences admitted with their KV on tier 1 (re-admissions counted)
  num_tier2_admissions: int = 0  # sequences admitted with their KV on tier 2


class Engine:
  """Offline generation with continuous batching; attention placed by config.placement, tier 1 over
  engine.tensor_parallel x engine.layer_slices devices (sharding.py)."""

  def __init__(self, config: ml_collections.ConfigDict, model=None, tokenizer=None):
    config_lib.validate(config)
    self.config = config
    self.model_config = config_lib.model_config(config)
    self.layout = Layout.from_config(config, self.model_config)
    if model is None:
      model = load_model(config, self.layout)
    if tokenizer is None:
      tokenizer = _load_tokenizer_if_present(config)
    self.tokenizer = tokenizer
    ec = config.engine
    self.tier2 = None  # Tier2Servers for the two-tier placements
    self._switch_interval = None  # the interpreter's, while tier2.switch_interval_ms replaces it
    self._tier2_ids: dict[Sequence, int] = {}  # sequences holding KV on tier 2 -> their tier-2 id
    self._next_tier2_id = itertools.count()
    self.num_local_pages = 0  # tier 1's paged cache beside tier 2 (local_attention_fraction > 0)
    if config.placement == "local":
      self.num_pages = num_pages_for(ec, self.model_config, self.layout.devices[0], self.layout.num_devices)
      backend = LocalPagedAttention(self.model_config, self.num_pages, ec.page_size, ec.decode_attention)
      self.runner = ModelRunner(model, backend, ec.decode_steps_per_call, ec.layer_loop, self.layout)
    else:
      self.tier2 = Tier2Servers(config, self.model_config)
      try:
        self.num_pages = self._tier2_pages()
        if config.local_attention_fraction > 0:
          self.num_local_pages = num_pages_for(ec, self.model_config, self.layout.devices[0],
                                               self.layout.num_devices)
        self.runner = self._two_tier_runner(model)
      except Exception:
        self.close()
        raise
    del model  # with layer_loop="unrolled" the runner holds per-layer copies; let the stacked ones go
    local_pages = self.num_pages if self.tier2 is None else self.num_local_pages
    kv_bytes = local_pages * ec.page_size * self.model_config.kv_bytes_per_token
    if self.tier2 is not None:
      kv_bytes += sum(row["kv_bytes_capacity"] for row in self.tier2.client.stats())  # tier 2's pools
    self.stats = EngineStats(num_pages=self.num_pages, page_size=ec.page_size, kv_pool_gib=kv_bytes / GIB,
                             num_local_pages=self.num_local_pages)
    if config.placement == "pipelined" and config.tier2.switch_interval_ms > 0:  # last: close() restores it
      self._switch_interval = sys.getswitchinterval()
      sys.setswitchinterval(config.tier2.switch_interval_ms / 1e3)

  def _tier2_pages(self) -> int:
    """Scheduler pages of a two-tier placement (scratch page included): tier 2's capacity in
    engine.page_size pages, at most every slot at full length, so preemption follows tier 2's room."""
    ec = self.config.engine
    fleets = [[row["num_pages"] * row["page_size"] for row in c.stats()] for c in self.tier2.fleets]
    largest = min(max(tokens) for tokens in fleets)
    if largest < ec.max_model_len:
      raise KVCacheTooSmallError(f"tier2.kv_cache_gb={self.config.tier2.kv_cache_gb}: the largest tier-2 pool "
                                 f"holds {largest} tokens, less than engine.max_model_len={ec.max_model_len}")
    full = ec.max_num_seqs * pages_per_sequence(ec.max_model_len, ec.page_size)
    return min(full, min(sum(t // ec.page_size for t in tokens) for tokens in fleets)) + 1

  def _two_tier_runner(self, model):
    """The placement's runner; with local_attention_fraction > 0 it also holds tier 1's paged cache
    (LocalPagedAttention), where the rows of local sequences attend."""
    from glinthawk_jax.placements.callback import CallbackAttention, SharedAttention  # noqa: PLC0415
    from glinthawk_jax.placements.pipelined import PipelinedRunner  # noqa: PLC0415

    ec, t = self.config.engine, self.config.tier2
    local = (LocalPagedAttention(self.model_config, self.num_local_pages, ec.page_size, ec.decode_attention)
             if self.num_local_pages else None)
    if self.config.placement == "callback":
      backend = CallbackAttention(self.tier2.client, ec.page_size, self.num_pages, t.timeout_s)
      if local is not None:
        backend = SharedAttention(local, backend)
      return ModelRunner(model, backend, ec.decode_steps_per_call, ec.layer_loop, self.layout)
    return PipelinedRunner(model, self.tier2.client, ec.decode_steps_per_call, t.in_flight, t.timeout_s,
                           self.layout, local, spread=t.split == "spread", send_thread=t.send_thread,
                           host_copy=t.host_copy)

  def close(self) -> None:
    """Stops the tier-2 servers this engine spawned (no-op for placement local) and restores the
    interpreter's switch interval."""
    if self.tier2 is not None:
      self.tier2.close()
    if self._switch_interval is not None:
      sys.setswitchinterval(self._switch_interval)
      self._switch_interval = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def stats_dict(self) -> dict:
    return dataclasses.asdict(self.stats)

  def generate(self, prompts: Seq[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
               request_ids: Seq[str] | None = None,
               on_output: Callable[[RequestOutput], None] | None = None,
               progress: bool = False) -> list[RequestOutput]:
    """Runs every prompt to completion; returns outputs in prompt order.

    `on_output` is called with each RequestOutput as its request finishes. Raises ValueError naming the
    request for a prompt that is empty, has ids outside the vocabulary, or is longer than
    engine.max_model_len - 1 tokens; nothing runs in that case.
    """
    seqs = self._sequences(prompts, sampling, request_ids)
    start = time.perf_counter()
    ec = self.config.engine
    scheduler = Scheduler(ec, PageAllocator(self.num_pages), ec.decode_steps_per_call,
                          PageAllocator(self.num_local_pages) if self.num_local_pages else None,
                          self.config.local_attention_fraction)
    for seq in seqs:
      scheduler.add(seq)
    outputs: list[RequestOutput | None] = [None] * len(seqs)
    bar = tqdm.tqdm(total=len(seqs), file=sys.stderr, disable=not progress, unit="req")

    def finish(seq: Sequence):
      scheduler.finish(seq)
      self._release_tier2([seq])
      out = self._output(seq)
      outputs[seq.index] = out
      bar.update(1)
      if on_output is not None:
        on_output(out)

    preemptions_before = scheduler.num_preemptions
    try:
      while scheduler.has_unfinished():
        ran_prefill = self._prefill_all(scheduler)
        batch = scheduler.schedule_decode()
        self._release_tier2(scheduler.take_preempted())
        if batch is None:
          if not ran_prefill:
            raise SchedulerStalledError(f"{len(scheduler.waiting)} waiting, {len(scheduler.running)} running "
                                        f"and nothing schedulable with {scheduler.allocator.num_free} free pages")
          continue
        t = time.perf_counter()
        try:
          tokens = self.runner.decode(batch.tokens, batch.positions, batch.block_tables, batch.token_index,
                                      batch.temperature, batch.top_k, batch.top_p, batch.seeds,
                                      batch.greedy_only, self._tier2_rows(batch.seqs, len(batch.tokens)))
          self._check_tier2()
        except (ShardUnavailableError, KVCacheFullError) as e:
          self._recover_tier2(scheduler, e)
          continue
        now = time.perf_counter()
        self.stats.decode_time_s += now - t
        self.stats.num_decode_calls += 1
        self.append_decoded(batch.seqs, tokens, t - start, now - start, finish)
    finally:
      self._release_tier2(list(self._tier2_ids), best_effort=True)
      bar.close()
      self.stats.num_preemptions += scheduler.num_preemptions - preemptions_before
      local = scheduler.num_local_admissions if self.tier2 is not None else scheduler.num_admissions
      self.stats.num_local_admissions += local
      self.stats.num_tier2_admissions += scheduler.num_admissions - local
      self.stats.num_compilations = self.runner.num_compilations
    return outputs

  def _prefill_all(self, scheduler: Scheduler) -> bool:
    """Runs prefill batches until no more can be scheduled; True if any ran."""
    ran = False
    while (batch := scheduler.schedule_prefill()) is not None:
      t = time.perf_counter()
      if self.tier2 is not None:  # a row starting at 0 is new or was preempted: fresh KV on tier 2
        self._release_tier2(scheduler.take_preempted() + [seq for seq, _ in batch.rows if seq.num_computed == 0])
      try:
        seq_ids = self._tier2_rows([seq for seq, _ in batch.rows], len(batch.tokens))
        self.runner.prefill(batch.tokens, batch.positions, batch.page_ids, batch.offsets, batch.block_tables,
                            batch.context_lens, seq_ids)
        self._check_tier2()
      except ShardUnavailableError as e:
        self._fail_over(scheduler, e)
        continue
      except KVCacheFullError as e:  # decode the running ones first, else a prompt would take the room again
        self._make_room(scheduler, e)
        return True
      batch.commit()
      self.stats.prefill_time_s += time.perf_counter() - t
      self.stats.num_prefill_calls += 1
      ran = True
    if ran:  # prefill calls return before the device runs them: their time belongs here, not to decode
      t = time.perf_counter()
      self.runner.wait()
      self.stats.prefill_time_s += time.perf_counter() - t
    return ran

  def _tier2_rows(self, seqs: list[Sequence], rows: int):
    """[rows] tier-2 ids of the batch's sequences (allocating new ones), PADDING_ROW for padding and
    LOCAL_ROW for sequences attending on tier 1; None if placement local."""
    if self.tier2 is None:
      return None
    new = [s for s in seqs if s not in self._tier2_ids and not s.local]
    if new:
      ids = [next(self._next_tier2_id) for _ in new]
      self.tier2.client.allocate(ids, expected_tokens=max(s.num_tokens + s.max_tokens for s in new))
      self._tier2_ids.update(zip(new, ids))
    out = np.full((rows,), PADDING_ROW, np.int32)
    out[:len(seqs)] = [LOCAL_ROW if s.local else self._tier2_ids[s] for s in seqs]
    return out

  def _release_tier2(self, seqs: list[Sequence], best_effort: bool = False) -> None:
    held = list(dict.fromkeys(s for s in seqs if s in self._tier2_ids))
    if not held:
      return
    try:
      self.tier2.client.release([self._tier2_ids.pop(s) for s in held])
    except Tier2Error as e:  # an unreachable shard is failed over at its next tensor call
      if not (best_effort or isinstance(e, ShardUnavailableError)):
        raise
      logging.warning("releasing %d sequences on tier 2 failed: %s", len(held), e)

  def _recover_tier2(self, scheduler: Scheduler, error: ShardUnavailableError | KVCacheFullError) -> None:
    """After a tier-2 call failed: a lost shard is failed over, a full one makes room; the failed step reruns."""
    if isinstance(error, KVCacheFullError):
      self._make_room(scheduler, error)
    else:
      self._fail_over(scheduler, error)

  def _fail_over(self, scheduler: Scheduler, error: ShardUnavailableError) -> None:
    """A shard is gone: its sequences wait to be prefilled again on the others; the failed step's
    other sequences simply rerun it (tier 2 overwrites the positions they had reached)."""
    client = self.tier2.client
    if error.address not in client.addresses or client.num_alive == 0:
      raise error
    lost = set(client.mark_dead(error.address))
    self.stats.num_tier2_failovers += 1
    logging.warning("tier-2 shard %s lost (%s): re-prefilling its %d sequences on %d remaining shard(s)",
                    error.address, error, len(lost), client.num_alive)
    if client.num_alive == 0:
      raise Tier2Error(error.address, error.code, "no tier-2 shard left; finished outputs were delivered")
    for seq in [s for s, i in self._tier2_ids.items() if i in lost]:
      del self._tier2_ids[seq]
      if seq in scheduler.running:
        scheduler.requeue(seq)

  def _make_room(self, scheduler: Scheduler, error: KVCacheFullError) -> None:
    """A shard's pool is full (sequences grew unevenly across shards, or another client holds pages):
    preempts the newest running sequence on it and frees its KV there; the failed step reruns (like
    _fail_over)."""
    fleet = next((c for c in self.tier2.fleets if error.address in c.addresses), None)
    if fleet is None:
      raise error
    shard = fleet.addresses.index(error.address)
    on_shard = [s for s in scheduler.running if s in self._tier2_ids
                and fleet.shard_of(self._tier2_ids[s]) == shard]
    if not on_shard:
      raise error
    scheduler.preempt(on_shard[-1])
    self._release_tier2(scheduler.take_preempted())
    # If tier 2 has less room than the scheduler thinks (another client holds pages), the difference
    # leaves the scheduler's free list for this run; else the preempted sequence would come straight back.
    page = self.config.engine.page_size
    free = min(sum((row["num_pages"] - row["pages_in_use"]) * row["page_size"] // page for row in c.stats())
               for c in self.tier2.fleets)
    if scheduler.allocator.num_free > free:
      scheduler.allocator.allocate(scheduler.allocator.num_free - free)

  def _check_tier2(self) -> None:
    check = getattr(getattr(self.runner, "backend", None), "raise_error", None)
    if check is not None:
      check()

  def _sequences(self, prompts, sampling, request_ids) -> list[Sequence]:
    n = len(prompts)
    ids = [str(i) for i in range(n)] if request_ids is None else [str(r) for r in request_ids]
    if len(ids) != n:
      raise ValueError(f"{len(ids)} request_ids for {n} prompts")
    if sampling is None or isinstance(sampling, SamplingParams):
      params = [sampling or config_lib.default_sampling(self.config)] * n
    else:
      params = list(sampling)
      if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    limit = self.config.engine.max_model_len - 1
    vocab = self.model_config.vocab_size
    seqs = []
    for i, (prompt, rid, sp) in enumerate(zip(prompts, ids, params)):
      if isinstance(prompt, str):
        if self.tokenizer is None:
          raise ValueError(f"request {rid!r}: a text prompt needs a tokenizer (pass token ids or a tokenizer)")
        tokens = self.tokenizer.encode(prompt)
      else:
        tokens = [int(t) for t in prompt]
      if not tokens:
        raise ValueError(f"request {rid!r}: empty prompt")
      if len(tokens) > limit:
        raise ValueError(f"request {rid!r}: prompt of {len(tokens)} tokens is longer than "
                         f"engine.max_model_len - 1 = {limit}")
      if min(tokens) < 0 or max(tokens) >= vocab:
        raise ValueError(f"request {rid!r}: token ids must lie in [0, {vocab})")
      if sp.stop and self.tokenizer is None:
        raise ValueError(f"request {rid!r}: stop strings need a tokenizer")
      seed = sp.seed if sp.seed is not None else self.config.seed * SEED_STRIDE + i
      seqs.append(Sequence(index=i, request_id=rid, prompt_ids=tokens, params=sp, seed=seed % (1 << 32),
                           max_tokens=min(sp.max_tokens, limit + 1 - len(tokens)), stop_ids=self._stop_ids(sp)))
    return seqs

  def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos and self.tokenizer is not None:
      ids.update(getattr(self.tokenizer, "eos_token_ids", None) or (self.tokenizer.eos_token_id,))
    ids.discard(None)
    return frozenset(ids)

  def append_decoded(self, seqs: list[Sequence], tokens: np.ndarray, call_start_s: float, call_end_s: float,
                     on_finish: Callable[[Sequence], None]) -> None:
    """Adds a decode call's tokens [steps, B] to its sequences, applying the stop rules; each finished
    sequence goes to on_finish. A fused call's tokens reach the host together: their times are spread
    evenly over the call, in the order the device produced them, so time-between-tokens stays meaningful."""
    steps = tokens.shape[0]
    step_times = [call_start_s + (call_end_s - call_start_s) * (step + 1) / steps for step in range(steps)]
    for i, seq in enumerate(seqs):
      for step in range(steps):
        if self._append(seq, int(tokens[step, i]), step_times[step]):
          on_finish(seq)
          break
      else:
        seq.num_computed = seq.num_tokens - 1

  def _append(self, seq: Sequence, token: int, now: float) -> bool:
    """Adds a sampled token and applies the stop rules; True when the sequence is finished."""
    seq.output_ids.append(token)
    seq.token_times_s.append(now)
    if token in seq.stop_ids:
      seq.finish_reason = FINISH_STOP
    elif seq.params.stop and self._stop_string_hit(seq):
      seq.finish_reason = FINISH_STOP
      return True
    elif len(seq.output_ids) >= seq.max_tokens:
      seq.finish_reason = FINISH_LENGTH
    if seq.finish_reason and self.tokenizer is not None:
      seq.text = self.tokenizer.decode(seq.output_ids)
    return seq.finish_reason is not None

  def _stop_string_hit(self, seq: Sequence) -> bool:
    """If the decoded output contains a stop string, keeps the text before the first one."""
    text = self.tokenizer.decode(seq.output_ids)
    hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
    if not hits:
      return False
    seq.text = text[:min(hits)]
    return True

  def _output(self, seq: Sequence) -> RequestOutput:
    times = seq.token_times_s
    return RequestOutput(request_id=seq.request_id, prompt_token_ids=list(seq.prompt_ids),
                         token_ids=list(seq.output_ids), text=seq.text, finish_reason=seq.finish_reason,
                         ttft_s=times[0], decode_time_s=times[-1] - times[0], token_times_s=list(times))


def _load_tokenizer_if_present(config):
  try:
    return load_tokenizer(config)
  except FileNotFoundError:
    logging.info("no tokenizer file for config %s: prompts must be token ids", config.name)
    return None
