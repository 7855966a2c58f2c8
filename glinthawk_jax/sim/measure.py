"""Times the stages of two-tier generation on this machine, for a measured profile (launch/profile.py).

Tier 1 (default JAX device), per layer step of a micro-batch of `rows` sequences, split as the host
sees it: dispatch (the jitted call returning), compute (until the outputs are ready) and the
device-to-host copy of q, k, v. Also the step after the last layer (post-attention, LM head,
greedy pick), the first step (embedding, pre-attention) and a prompt's bulk prefill step per layer
(attention over the chunk itself, then the device's gather of the real tokens' K, V), split the
same way: the runner overlaps the device's part with the host's.

Tier 2 (real servers through a Tier2Client), per layer round trip at the payload size of a
micro-batch at a context: `send_s` (the client call returning: serialization, on tier 1's host
thread), `rtt_s` (send to reply, one request alone), `queued_s` (how far apart n requests issued
at once finish: (all done - rtt) / (n - 2)) and `service_s`, the servers' work per request, taken as
min(queued, rtt - send): queued requests are paced by the slower of the client's sends and the
servers. The pure latency of an RPC is rtt - send - service. `rpc` spreads a micro-batch over the
shards; `shard_rpc` puts all its rows on one shard and keeps every shard busy at once (the servers
share the host's cores and memory bandwidth), as the runner's shard-grouped micro-batches do.
Bulk appends (prefill) at each prefill chunk's shape, one per layer back to back as the runner sends
them. Every timing drops its first call(s) (kernels compile per shape on both tiers, shared-memory
slots grow) and takes a median.
"""

from __future__ import annotations

import gc
import itertools
import time

import numpy as np

from glinthawk_jax.sim import cost_model, host_cpu

SEQ_BASE = 1 << 40  # sequence ids the profiler allocates on tier 2 (far from an engine's)
_SEQ_BLOCKS = itertools.count()


def wire_dtype(name: str) -> np.dtype:
  """NumPy dtype of q, k, v on the wire: the model's dtype (bfloat16 through ml_dtypes)."""
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(name))


WARMUP = 2  # untimed calls before every timing: the first ones compile, fault pages in, grow slots


def median_time(fn, reps: int) -> float:
  """Median seconds of fn() over `reps` calls after WARMUP untimed ones."""
  for _ in range(WARMUP):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


class Tier1Steps:
  """Jitted per-layer steps of one micro-batch, built from two decoder layers and an LM head."""

  def __init__(self, m):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from models.attention import causal_mask, grouped_attention
    from models.llama import DecoderLayer

    self.m = m
    dt = jnp.dtype(m.dtype)
    self.graphdef, self.layer_a = nnx.split(nnx.jit(lambda: DecoderLayer(m, rngs=nnx.Rngs(params=0)))())
    _, self.layer_b = nnx.split(nnx.jit(lambda: DecoderLayer(m, rngs=nnx.Rngs(params=1)))())
    key = jax.random.PRNGKey(0)
    self.embed_table = (0.02 * jax.random.normal(key, (m.vocab_size, m.hidden_size))).astype(dt)
    self.head = (0.02 * jax.random.normal(key, (m.hidden_size, m.vocab_size))).astype(dt)
    merge = lambda s: nnx.merge(self.graphdef, s)  # noqa: E731

    def middle(a, b, x, attn, positions):
      x = merge(a).post_attention(x, attn)
      q, k, v = merge(b).pre_attention(x, positions)
      return x, q, k, v

    def first(table, b, tokens, positions):
      x = table[tokens]
      q, k, v = merge(b).pre_attention(x, positions)
      return x, q, k, v

    def last(a, head, x, attn):
      x = merge(a).post_attention(x, attn)
      return jnp.argmax(jnp.dot(x[:, -1].astype(jnp.float32), head.astype(jnp.float32)), -1)

    def bulk(a, x, positions):
      lay = merge(a)
      q, k, v = lay.pre_attention(x, positions)
      mask = causal_mask(positions, positions, m.sliding_window)
      return lay.post_attention(x, grouped_attention(q, k, v, mask)), k, v

    self.middle, self.first, self.last, self.bulk = (jax.jit(f) for f in (middle, first, last, bulk))

  def _inputs(self, rows, tokens=1):
    import jax.numpy as jnp
    m = self.m
    x = jnp.ones((rows, tokens, m.hidden_size), jnp.dtype(m.dtype))
    attn = jnp.ones((rows, tokens, m.num_heads, m.head_dim), jnp.dtype(m.dtype))
    positions = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (rows, tokens))
    return x, attn, positions

  def decode_step(self, rows: int, reps: int) -> dict:
    """The middle step split into dispatch, compute and copy; the full step as the runner runs it."""
    import jax
    x, attn, positions = self._inputs(rows)
    tokens = np.ones((rows, 1), np.int32)
    parts = {"dispatch_s": [], "compute_s": [], "copy_s": []}
    for _ in range(WARMUP):
      _to_host(self.middle(self.layer_a, self.layer_b, x, attn, positions))
    for _ in range(reps):
      t0 = time.perf_counter()
      out = self.middle(self.layer_a, self.layer_b, x, attn, positions)
      t1 = time.perf_counter()
      jax.block_until_ready(out)
      t2 = time.perf_counter()
      [np.asarray(a) for a in out[1:]]
      t3 = time.perf_counter()
      parts["dispatch_s"].append(t1 - t0)
      parts["compute_s"].append(t2 - t1)
      parts["copy_s"].append(t3 - t2)
    row = {k: float(np.median(v)) for k, v in parts.items()}

    row["step_s"] = median_time(lambda: _to_host(self.middle(self.layer_a, self.layer_b, x, attn, positions)),
                                reps)
    row["first_s"] = median_time(lambda: _to_host(self.first(self.embed_table, self.layer_b, tokens, positions)),
                                 reps)
    row["last_s"] = median_time(lambda: _to_host(self.last(self.layer_a, self.head, x, attn)), reps)
    return {"rows": rows, **row}

  def bulk_step(self, rows: int, tokens: int, reps: int) -> dict:
    """One layer over a prompt chunk of rows x tokens, split as PipelinedRunner._bulk_prefill overlaps
    it: dispatch (host), compute (device: the layer, then the gather of the real tokens' k, v into one
    array), the copy of it to the host (the device's copy stream); gather_s is the host's part, now
    none (each shard's append is a view of the copy). A prompt fills all but its last token; step_s
    is the whole, serially."""
    import jax

    from glinthawk_jax.placements.pipelined import gather_tokens

    x, _, positions = self._inputs(rows, tokens)
    take = _take(rows, tokens)

    def run(parts=None):
      t0 = time.perf_counter()
      _, k, v = self.bulk(self.layer_a, x, positions)
      kv = gather_tokens(k, v, take)
      t1 = time.perf_counter()
      jax.block_until_ready(kv)
      t2 = time.perf_counter()
      kv.copy_to_host_async()
      np.asarray(kv)
      t3 = time.perf_counter()
      if parts is not None:
        for key, dt in zip(("dispatch_s", "compute_s", "copy_s", "gather_s"), (t1 - t0, t2 - t1, t3 - t2, 0.0)):
          parts.setdefault(key, []).append(dt)

    parts = {}
    for rep in range(WARMUP + reps):
      run(parts if rep >= WARMUP else None)
    row = {key: float(np.median(v)) for key, v in parts.items()}
    return {"rows": rows, "tokens": tokens, "step_s": median_time(lambda: _bulk_serial(self, x, positions), reps),
            **row}


def _take(rows: int, tokens: int) -> np.ndarray:
  """gather_tokens' index of a chunk's real tokens (all but each prompt's last), as the runner builds it."""
  from glinthawk_jax.placements.pipelined import token_take

  return token_take(np.repeat(np.arange(rows), tokens - 1), np.tile(np.arange(tokens - 1), rows))


def _bulk_serial(steps: Tier1Steps, x, positions):
  """The bulk step with its real tokens' k, v gathered and copied to the host, nothing overlapped."""
  from glinthawk_jax.placements.pipelined import gather_tokens

  _, k, v = steps.bulk(steps.layer_a, x, positions)
  kv = gather_tokens(k, v, _take(*x.shape[:2]))
  kv.copy_to_host_async()
  return np.asarray(kv)


def _to_host(out):
  """What the runner copies to the host after a step: q, k, v of (x, q, k, v), or the tokens."""
  arrays = out[1:] if isinstance(out, tuple) else (out,)
  for a in arrays:
    a.copy_to_host_async()
  return [np.asarray(a) for a in arrays]


def _rpc_timing(send, n: int, alone: int = 3, servers: int = 1) -> dict:
  """send_s, rtt_s: medians over `alone` requests 0 issued one at a time, after WARMUP untimed ones;
  queued_s, service_s: requests 1..n-1 issued at once, spread over `servers` that work in parallel
  (each serves its (n - 1) / servers one after another).

  `send(i)` issues request i and returns its future (request 0 may be sent again: tier 2
  overwrites the same positions)."""
  for _ in range(WARMUP):
    send(0).result()
  sends, rtts = [], []
  for _ in range(alone):
    t = time.perf_counter()
    f = send(0)
    sends.append(time.perf_counter() - t)
    f.result()
    rtts.append(time.perf_counter() - t)
  send_s, rtt = float(np.median(sends)), float(np.median(rtts))
  t = time.perf_counter()
  pending = [send(i) for i in range(1, n)]
  for f in pending:
    f.result()
  total = time.perf_counter() - t
  per_server = -(-(n - 1) // servers)
  queued = (total - rtt) / (per_server - 1) if per_server > 1 else rtt
  # Queued requests finish `queued` apart: the slower of the client's sends and the servers' work.
  service = max(min(queued, rtt - send_s), 0.0)
  return {"send_s": send_s, "rtt_s": rtt, "queued_s": queued, "service_s": service}


def _median_rows(timings: list[dict]) -> dict:
  return {key: float(np.median([t[key] for t in timings])) for key in timings[0]}


def _new_sequences(client, count: int, expected_tokens: int) -> np.ndarray:
  """`count` fresh sequence ids allocated on tier 2 (spread over the shards as the engine's are)."""
  seqs = SEQ_BASE + next(_SEQ_BLOCKS) * (1 << 20) + np.arange(count)
  client.allocate(seqs.tolist(), expected_tokens=expected_tokens)
  return seqs


def _fanout(client, seqs) -> int:
  """Shards holding `seqs` (a client of several layer slices has no placement: assume spread)."""
  shard_of = getattr(client, "shard_of", None)
  if shard_of is None:
    return min(len(seqs), len(client.addresses))
  return len({shard_of(s) for s in seqs.tolist()})


def _fill(client, m, seqs, layers, context: int, dtype, rng) -> None:
  """Appends `context` tokens of K, V to every sequence in each of `layers` (untimed)."""
  ids, pos = np.repeat(seqs, context), np.tile(np.arange(context, dtype=np.int32), len(seqs))
  kv = rng.standard_normal((len(ids), m.num_kv_heads, m.head_dim)).astype(dtype)
  for f in [client.append_async(layer, ids, pos, kv, kv) for layer in layers]:
    f.result()


def tier2_round_trips(client, m, rows: int, context: int, queue: int, reps: int, dtype) -> dict:
  """Round trips of a micro-batch of `rows` sequences at `context` cached tokens (every layer),
  its rows spread over the shards: alone (rtt) and `queue` micro-batches x layers at once (queued)."""
  L, kv, h, d = m.num_layers, m.num_kv_heads, m.num_heads, m.head_dim
  seqs = _new_sequences(client, queue * rows, context + reps + 2)
  rng = np.random.default_rng(0)
  try:
    _fill(client, m, seqs, range(L), context, dtype, rng)
    q = rng.standard_normal((rows, h, d)).astype(dtype)
    k = rng.standard_normal((rows, kv, d)).astype(dtype)
    groups = [seqs[g * rows:(g + 1) * rows] for g in range(queue)]
    timings = []
    for rep in range(reps):  # one new token per rep for every micro-batch and layer
      p = np.full(rows, context + rep, np.int32)
      requests = [(layer, g) for g in range(queue) for layer in range(L)]
      timings.append(_rpc_timing(lambda i: client.attend_async(requests[i][0], groups[requests[i][1]], p,
                                                               q, k, k), len(requests)))
    return {"rows": rows, "context": context, "fanout": _fanout(client, groups[0]),
            "bytes_out": q.nbytes + 2 * k.nbytes, "bytes_back": q.nbytes, "queued": queue * L, **_median_rows(timings)}
  finally:
    client.release(seqs.tolist())


def shard_round_trips(client, m, rows: int, context: int, queue: int, reps: int, dtype) -> dict:
  """Round trips of `rows` sequences that all live on one shard, at `context` cached tokens: alone
  (rtt), and `queue` requests to every shard at once (service_s: one shard's spacing while all the
  shards work, as the runner's shard-grouped micro-batches keep them)."""
  shards = len(client.addresses)
  seqs = np.zeros(0, np.int64)
  rng = np.random.default_rng(1)
  try:
    # Placement goes to the shard with the most free KV: allocate until every shard holds `rows`.
    for _ in range(4 * rows):
      seqs = np.concatenate([seqs, _new_sequences(client, shards, context + reps + 2)])
      by_shard = [seqs[[client.shard_of(s) == i for s in seqs.tolist()]] for i in range(shards)]
      if min(len(g) for g in by_shard) >= rows:
        break
    else:
      raise RuntimeError(f"tier 2 placed {[len(g) for g in by_shard]} of {len(seqs)} sequences per shard; "
                         f"expected {rows} on each")
    groups = [g[:rows] for g in by_shard]
    _fill(client, m, seqs, [0], context, dtype, rng)  # every request attends layer 0
    q = rng.standard_normal((rows, m.num_heads, m.head_dim)).astype(dtype)
    k = rng.standard_normal((rows, m.num_kv_heads, m.head_dim)).astype(dtype)
    timings = []
    for rep in range(reps):
      p = np.full(rows, context + rep, np.int32)  # request i goes to shard i % shards
      timings.append(_rpc_timing(lambda i: client.attend_async(0, groups[i % shards], p, q, k, k),
                                 1 + queue * shards, servers=shards))
    return {"rows": rows, "context": context, "fanout": 1, "concurrent_shards": shards,
            "queued": queue, **_median_rows(timings)}
  finally:
    client.release(seqs.tolist())


def append_round_trips(client, m, rows: int, tokens: int, reps: int, dtype) -> dict:
  """Bulk appends of a prefill chunk, `rows` prompts x `tokens` - 1 real tokens (spread over the
  shards as the engine spreads a chunk): one per layer, issued back to back as the runner does."""
  L = m.num_layers
  seqs = _new_sequences(client, rows, tokens)
  rng = np.random.default_rng(2)
  try:
    ids, pos = np.repeat(seqs, tokens - 1), np.tile(np.arange(tokens - 1, dtype=np.int32), rows)
    kv = rng.standard_normal((len(ids), m.num_kv_heads, m.head_dim)).astype(dtype)
    timings = [_rpc_timing(lambda layer: client.append_async(layer % L, ids, pos, kv, kv), max(L, 3))
               for _ in range(reps)]  # the same positions again and again: tier 2 overwrites
    return {"tokens": len(ids), "seqs": rows, "fanout": _fanout(client, seqs), "bytes": 2 * kv.nbytes,
            **_median_rows(timings)}
  finally:
    client.release(seqs.tolist())


def control_rtt(client, reps: int) -> float:
  """Median seconds of one sequence's Allocate or Release call (the engine makes one of each a sequence)."""
  times = []
  for _ in range(reps):
    seq = SEQ_BASE + next(_SEQ_BLOCKS) * (1 << 20)
    t = time.perf_counter()
    client.allocate([seq])
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
    client.release([seq])
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def two_tier_tables(m, client, rows: list[int], contexts: list[int], prefill: list[tuple[int, int]],
                    queue: int, reps: int, dtype, shard_rows: list[int] | None = None,
                    shard_queue: int = 4) -> dict:
  """Every stage time generation.predict needs: tier-1 steps by rows, bulk prefill steps and appends
  by chunk (rows, tokens), RPCs by rows and context, one-shard RPCs by `shard_rows` (rows on a
  shard; default rows and rows / shards) and context, control RPCs. The pipelined runner's own
  per-layer costs (tables["runner"]) come from runner_overheads, measured beside the runs."""
  shards = len(client.addresses)
  shard_rows = shard_rows or sorted({max(r // shards, 1) for r in rows} | set(rows))
  steps = Tier1Steps(m)
  tables = {"shards": shards, "tier1_step": [steps.decode_step(r, reps) for r in rows],
            "bulk_step": [steps.bulk_step(r, t, reps) for r, t in prefill],
            "rpc": [tier2_round_trips(client, m, r, c, queue, reps, dtype) for r in rows for c in contexts],
            "shard_rpc": [shard_round_trips(client, m, r, c, shard_queue, reps, dtype)
                          for r in shard_rows for c in sorted({min(contexts), max(contexts)})
                          if hasattr(client, "shard_of")],  # one layer slice: its placement is known
            "append": [append_round_trips(client, m, r, t, min(reps, 3), dtype) for r, t in prefill],
            "control_rtt_s": control_rtt(client, reps)}
  return tables


def _timed(fn, *args, reps=5):
  """Median seconds of fn(*args), outputs ready, after a compile-and-warm call."""
  import jax
  return median_time(lambda: jax.block_until_ready(fn(*args)), reps)


def roofline_tables(m, tiny: bool) -> dict:
  """One decoder layer's dense work by batch and prefill length (default device), fp32 decode
  attention by batch and context (CPU device), host -> device -> host copies by size."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from models.llama import DecoderLayer

  layer = nnx.jit(lambda: DecoderLayer(m, rngs=nnx.Rngs(params=0)))()
  graphdef, state = nnx.split(layer)

  @jax.jit
  def dense(state, x, positions):
    lay = nnx.merge(graphdef, state)
    q, _, _ = lay.pre_attention(x, positions)
    return lay.post_attention(x, q)  # q stands in for the attention output: same shape

  def step(batch, tokens):
    x = jnp.ones((batch, tokens, m.hidden_size), jnp.dtype(m.dtype))
    pos = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    return _timed(dense, state, x, pos)

  batches = (1, 4, 16) if tiny else (1, 8, 32, 64, 128, 256, 512)
  prompts = (16, 64) if tiny else (128, 512, 2048, 8192)
  tier1 = [dict(batch=b, seconds=step(b, 1)) for b in batches]
  prefill = [dict(tokens=t, seconds=step(1, t)) for t in prompts]

  cpu = jax.devices("cpu")[0]
  group = m.num_heads // m.num_kv_heads

  @jax.jit
  def decode_attention(q, k, v):  # q: [B, KV, G, D]; k, v: [B, C, KV, D], float32
    s = jnp.einsum("bkgd,bckd->bkgc", q, k) / jnp.sqrt(jnp.float32(m.head_dim))
    return jnp.einsum("bkgc,bckd->bkgd", jax.nn.softmax(s, axis=-1), v)

  tier2 = []
  for b, c in ((1, 256), (4, 1024)) if tiny else ((1, 1024), (8, 1024), (8, 4096), (32, 4096)):
    q = jax.device_put(np.ones((b, m.num_kv_heads, group, m.head_dim), np.float32), cpu)
    k = jax.device_put(np.ones((b, c, m.num_kv_heads, m.head_dim), np.float32), cpu)
    tier2.append(dict(batch=b, context=c, kv_bytes=2 * k.nbytes, seconds=_timed(decode_attention, q, k, k)))

  transfer = []
  for nbytes in (1 << 16, 1 << 20) if tiny else (1 << 16, 1 << 20, 1 << 24, 1 << 28):
    host = np.ones(nbytes, np.uint8)
    transfer.append(dict(bytes=nbytes, seconds=_timed(lambda a: np.asarray(jax.device_put(a)), host)))
  return dict(device=str(jax.devices()[0].device_kind), tier1_step=tier1, prefill=prefill,
              tier2_attention=tier2, transfer=transfer)


def fit(m, table: dict, kind: str) -> tuple[float, float]:
  """Achieved bandwidth and FLOP rate from the timing tables."""
  if kind == "cpu":
    bw = max(r["kv_bytes"] / r["seconds"] for r in table["tier2_attention"])
    flops = max(cost_model.attention_flops(m, r["batch"] * r["context"]) / r["seconds"]
                for r in table["tier2_attention"])
    return bw, flops
  weights = cost_model.layer_params(m) * cost_model.WEIGHT_BYTES
  bw = weights / min(r["seconds"] for r in table["tier1_step"])
  flops = max([2 * cost_model.layer_params(m) * r["batch"] / r["seconds"] for r in table["tier1_step"]]
              + [2 * cost_model.layer_params(m) * r["tokens"] / r["seconds"] for r in table["prefill"]])
  return bw, flops


def measured_profile(config, kind: str = "accelerator", tiny: bool = False, two_tier: dict | None = None,
                     name: str = "", memory_gb: float = 0.0, network_gbps: float = 10.0,
                     price_per_hour: float = 0.0, devices: int = 1, notes: str = "", command: str = ""):
  """Times this machine for `config`'s model and returns a "measured" HardwareProfile.

  `two_tier`: arguments of two_tier_tables besides the model (client, rows, contexts, prefill, queue,
  reps, dtype), or None to skip the two-tier stages (stored under measurements["two_tier"])."""
  import datetime
  import os

  import jax

  from glinthawk_jax.config import model_config
  from glinthawk_jax.sim import profiles

  m = model_config(config)
  table = roofline_tables(m, tiny)
  if two_tier is not None:
    table["two_tier"] = two_tier_tables(m, **two_tier)
  bw, flops = fit(m, table, kind)
  if not memory_gb:
    stats = jax.devices()[0].memory_stats() or {}
    memory_gb = stats.get("bytes_limit", 0) / 1e9 or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
  table.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=command, model=config.name)
  return profiles.HardwareProfile(
      name=name or table["device"], kind=kind, source="measured", memory_gb=memory_gb,
      mem_bandwidth_gbs=bw / 1e9, peak_tflops=flops / 1e12, network_gbps=network_gbps,
      price_per_hour=price_per_hour, devices=devices,
      notes=notes or f"measured by launch/profile.py with {config.name} shapes", measurements=table)


def print_tables(table: dict) -> None:
  """The timing tables of a measured profile, in ms."""
  print(f"{'stage':18} {'size':>16} {'ms':>10}")
  for r in table["tier1_step"]:
    print(f"{'tier1 dense':18} {'B=' + str(r['batch']):>16} {r['seconds'] * 1e3:10.3f}")
  for r in table["prefill"]:
    print(f"{'prefill dense':18} {'T=' + str(r['tokens']):>16} {r['seconds'] * 1e3:10.3f}")
  for r in table["tier2_attention"]:
    print(f"{'tier2 XLA attn':18} {'B=%d C=%d' % (r['batch'], r['context']):>16} {r['seconds'] * 1e3:10.3f}")
  for r in table["transfer"]:
    print(f"{'host<->device':18} {str(r['bytes']) + ' B':>16} {r['seconds'] * 1e3:10.3f}")
  t = table.get("two_tier")
  if not t:
    return
  for r in t["tier1_step"]:
    print(f"{'pipelined step':18} {'rows=' + str(r['rows']):>16} {r['step_s'] * 1e3:10.3f}  (dispatch "
          f"{r['dispatch_s'] * 1e3:.3f}, compute {r['compute_s'] * 1e3:.3f}, copy {r['copy_s'] * 1e3:.3f}; "
          f"first {r['first_s'] * 1e3:.3f}, last {r['last_s'] * 1e3:.3f})")
  for r in t["bulk_step"]:
    print(f"{'bulk prefill step':18} {'%dx%d' % (r['rows'], r['tokens']):>16} {r['step_s'] * 1e3:10.3f}  (dispatch "
          f"{r['dispatch_s'] * 1e3:.3f}, compute {r['compute_s'] * 1e3:.3f}, copy {r['copy_s'] * 1e3:.3f}, "
          f"gather {r['gather_s'] * 1e3:.3f})")
  for r in t["rpc"]:
    print(f"{'tier2 RPC':18} {'rows=%d C=%d' % (r['rows'], r['context']):>16} {r['rtt_s'] * 1e3:10.3f}  (send "
          f"{r['send_s'] * 1e3:.3f}, service {r['service_s'] * 1e3:.3f}, queued {r['queued_s'] * 1e3:.3f}; "
          f"{r['fanout']} shards; {r['bytes_out']} B out, {r['bytes_back']} B back)")
  for r in t["shard_rpc"]:
    print(f"{'tier2 RPC 1 shard':18} {'rows=%d C=%d' % (r['rows'], r['context']):>16} {r['rtt_s'] * 1e3:10.3f}  "
          f"(send {r['send_s'] * 1e3:.3f}, service {r['service_s'] * 1e3:.3f} with {r['concurrent_shards']} "
          f"shards busy, queued {r['queued_s'] * 1e3:.3f})")
  for r in t["append"]:
    print(f"{'tier2 append':18} {str(r['tokens']) + ' tok':>16} {r['rtt_s'] * 1e3:10.3f}  (send "
          f"{r['send_s'] * 1e3:.3f}, service {r['service_s'] * 1e3:.3f}; {r['fanout']} shards; {r['bytes']} B)")
  print(f"{'control RPC':18} {'1 seq':>16} {t['control_rtt_s'] * 1e3:10.3f}")
  for r in t.get("runner", []):
    cpu = (f"; CPU tier 1 {r['cpu_s'] * 1e3:.3f}, servers {r['server_cpu_s'] * 1e3:.3f} a shard call, "
           f"{r['cores']:.2f} cores free") if "cpu_s" in r else ""
    print(f"{'runner, depth 1':18} {'rows=' + str(r['rows']):>16} {r['step_s'] * 1e3:10.3f}  (step; per round "
          f"trip: host {r['host_s'] * 1e3:.3f}, waiting for tier 2 {r['remote_s'] * 1e3:.3f}{cpu})")


def runner_overheads(config, model, rows: list[int], prompt_len: int, output_len: int,
                     repeats: int = 3, server_pids: list[int] = ()) -> list[dict]:
  """The pipelined runner's own per-layer costs, from real depth-1 runs of the Engine on `config`'s
  tier-2 servers (config.tier2.addresses), one run of `rows` prompts per entry.

  Decode calls only (runner.decode is wrapped to take PipelineStats deltas around each call): per
  tier-1 step `step_s` (dispatch to q, k, v on the host), per round trip `host_s` (everything else
  on the host thread: building and sending the request, placing the reply, bookkeeping) and
  `remote_s` (the host waiting for tier 2, nothing else in flight); sums over `repeats` runs. With the
  tier-2 servers' `server_pids` (on this host), also the CPU they share: `cpu_s`, tier 1's process CPU
  per round trip (every thread: dispatch, the CPU backend's compute, sends, replies), `server_cpu_s`,
  the servers' CPU per shard call, and `cores`, host_cpu.available_cores() just before the runs."""
  import dataclasses

  from glinthawk_jax.engine import Engine
  from glinthawk_jax.requests import SamplingParams

  out = []
  rng = np.random.default_rng(0)
  for r in rows:
    c = config.copy_and_resolve_references()
    c.tier2.in_flight = 1
    c.engine.max_num_seqs = max(r, c.engine.max_num_seqs)
    prompts = [rng.integers(3, c.model.vocab_size, prompt_len).tolist() for _ in range(r)]
    with Engine(c, model=model) as engine:
      runner = engine.runner
      if not hasattr(runner, "stats"):
        raise RuntimeError("placement pipelined: the runner has no PipelineStats (runner.stats)")
      engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # compiles
      totals = {"wall": 0.0, "tier1_s": 0.0, "wait_s": 0.0, "num_steps": 0, "num_round_trips": 0, "cpu": 0.0,
                "server_cpu": 0.0}
      decode = runner.decode

      def servers_cpu() -> float:
        return sum(host_cpu.cpu_seconds(p) for p in server_pids)

      def timed_decode(*args, **kwargs):
        server_cpu = servers_cpu()  # before the clocks start: reading /proc is not the runner's work
        before, t, cpu = dataclasses.replace(runner.stats), time.perf_counter(), time.process_time()
        result = decode(*args, **kwargs)
        totals["wall"] += time.perf_counter() - t
        totals["cpu"] += time.process_time() - cpu
        totals["server_cpu"] += servers_cpu() - server_cpu
        for key in ("tier1_s", "wait_s", "num_steps", "num_round_trips"):
          totals[key] += getattr(runner.stats, key) - getattr(before, key)
        return result

      runner.decode = timed_decode
      cores = host_cpu.available_cores() if server_pids else 0.0
      for _ in range(repeats):
        engine.generate(prompts, SamplingParams(max_tokens=output_len, ignore_eos=True))
    del engine, runner, decode, timed_decode
    gc.collect()  # frees the runner's per-layer weight copies (its jit closures hold cycles)
    trips = max(totals["num_round_trips"], 1)
    fanout = min(r, len(config.tier2.addresses.split(",")))
    out.append({"rows": r, "context": prompt_len + output_len / 2, "fanout": fanout,
                "step_s": totals["tier1_s"] / max(totals["num_steps"], 1),
                "host_s": (totals["wall"] - totals["tier1_s"] - totals["wait_s"]) / trips,
                "remote_s": totals["wait_s"] / trips, "round_trips": totals["num_round_trips"]})
    if server_pids:
      out[-1].update(cpu_s=totals["cpu"] / trips, server_cpu_s=totals["server_cpu"] / (trips * fanout), cores=cores)
  return out
