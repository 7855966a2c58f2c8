"""The one config tree (ml_collections): defaults with a comment per knob, validation at load."""

from __future__ import annotations

import json
import os
import re

import ml_collections

from glinthawk_jax.requests import SamplingParams
from models.model_config import ModelConfig

PLACEMENTS = ("local", "callback", "pipelined")
LAYER_LOOPS = ("scan", "unrolled")
DECODE_ATTENTION_KERNELS = ("xla", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
TIER2_KV_DTYPES = ("float32", "bfloat16", "int8")
TIER2_TRANSPORTS = ("auto", "grpc", "shm")
TIER2_SPLITS = ("shards", "spread")  # how the pipelined runner cuts a decode batch (placements/pipelined.py)
TIER2_HOST_COPIES = ("fused", "pinned", "pageable")  # how its q, k, v reach the host (placements/pipelined.py)
ROLES = ("colocated", "prefill", "decode")
TRANSFER_FAILURE_POLICIES = ("recompute", "fail")
MAX_IN_FLIGHT = 8
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO_ROOT, "configs", "assets", "tiny_tokenizer.json")


class ConfigError(ValueError):
  """A config value is missing or outside what is allowed; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default; model files override `model` and whatever else they need."""
  c = ml_collections.ConfigDict()
  c.name = "base"  # human-readable name printed in logs and summaries
  c.checkpoint = ""  # Hugging Face checkpoint directory; empty = random weights of config.model's shape
  c.tokenizer = ""  # tokenizer.json path; empty = the checkpoint's, else the built-in tiny tokenizer
  c.dtype = "bfloat16"  # parameter/activation dtype: float32, bfloat16 or float16
  c.seed = 0  # seed of random weights and of the default sampling seed
  c.placement = "local"  # where attention runs: local (paged on tier 1), callback, pipelined
  # Splitwise worker role: colocated (prefill and decode), prefill or decode; decode with placement pipelined
  # is the combined mode (received K,V kept on tier-2 shards).
  c.role = "colocated"
  # Two-tier placements: share of sequences (weighted by prompt + max_tokens) whose KV lives in tier 1's
  # paged cache and which attend there, the others on tier 2; 0 = all on tier 2, 1 = all local.
  c.local_attention_fraction = 0.0

  c.model = ml_collections.ConfigDict()  # model dimensions; replaced by config.json when checkpoint is set
  c.model.vocab_size = 512
  c.model.hidden_size = 64
  c.model.intermediate_size = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 16
  c.model.rope_theta = 10000.0
  c.model.rope_scaling = ml_collections.FieldReference(None, field_type=tuple)  # llama3 tuple or None
  c.model.rms_norm_eps = 1e-5
  c.model.attention_bias = False
  c.model.tie_word_embeddings = False
  c.model.max_position_embeddings = 2048
  c.model.sliding_window = ml_collections.FieldReference(None, field_type=int)

  c.engine = ml_collections.ConfigDict()
  c.engine.max_num_seqs = 64  # decode slots: sequences generating at once
  c.engine.page_size = 16  # tokens per KV page
  c.engine.kv_cache_gb = 0.0  # KV pool size in GiB; 0 = use kv_cache_memory_fraction of free memory
  c.engine.kv_cache_memory_fraction = 0.8  # share of free accelerator memory for KV when kv_cache_gb = 0
  c.engine.max_model_len = 2048  # longest prompt + output, in tokens
  c.engine.max_prefill_tokens = 4096  # token budget of one batched prefill step (chunks longer prompts)
  c.engine.decode_steps_per_call = 1  # decode steps fused into one jitted call (fewer dispatches)
  # Block-table widths (pages) the jitted calls compile for: this many evenly spaced sizes per doubling
  # (1: 2^k; 2: 2^k and 1.5 * 2^k). More = less padded KV read a decode step, at most this many compiles
  # per octave of context; 4 pads a width by under a quarter of its octave's base.
  c.engine.width_buckets_per_octave = 4
  # scan: one compiled layer over stacked weights (fast compiles); unrolled: per-layer weights, no
  # per-layer slice of the stack (1.5x faster decode on an H100, docs/BENCHMARKS.md).
  c.engine.layer_loop = "scan"
  # Devices per layer slice, weights split Megatron-style and KV pages on the KV-head axis
  # (docs/MULTI_DEVICE.md); must divide num_heads, num_kv_heads and intermediate_size.
  c.engine.tensor_parallel = 1
  # Contiguous layer ranges on different devices (tensor_parallel each); must divide num_layers. Two-tier
  # placements give each slice its own tier-2 servers for its layers.
  c.engine.layer_slices = 1
  # Decode attention of placement local: xla (gather then reduce) or pallas (a Triton kernel reading
  # pages in place; needs layer_loop=unrolled; 1.7-2.1x faster alone on an H200 but 9% slower inside
  # the engine, docs/BENCHMARKS.md; interpreted off the GPU).
  c.engine.decode_attention = "xla"

  c.sampling = ml_collections.ConfigDict()  # defaults for requests that do not set their own
  c.sampling.max_tokens = 32  # new tokens per request
  c.sampling.temperature = 0.0  # 0 = greedy
  c.sampling.top_k = 0  # 0 = off
  c.sampling.top_p = 1.0  # 1.0 = off
  c.sampling.ignore_eos = False  # keep generating past EOS (benchmarks)

  c.tier2 = ml_collections.ConfigDict()  # tier-2 KV/attention servers (placements callback, pipelined)
  c.tier2.spawn = 2  # local servers (per layer slice) tier 1 starts and stops itself when addresses is empty
  c.tier2.addresses = ""  # "host:port,..." of running servers (";" between layer slices); set = spawn nothing
  c.tier2.kv_dtype = "bfloat16"  # KV storage dtype on tier 2: float32, bfloat16 or int8
  c.tier2.kv_cache_gb = 1.0  # KV pool of each spawned server, GiB
  c.tier2.cpus = "auto"  # cores of spawned servers: "auto" (split this host's cores) or "0-3;4-7" per server
  # With cpus auto and an accelerator: tier 1's threads on the cores servers leave free, so none of them
  # preempts a server's kernel thread (on an H200 host more decode tok/s in 4 of 4 pairs, +4% to +22%, and
  # shorter reply spreads at p99, docs/BENCHMARKS.md).
  c.tier2.pin_tier1 = True
  # Spawned servers' KV pools on transparent huge pages (glibc.malloc.hugetlb=1; the host's THP mode must
  # be always or madvise): the kernel read 1-5% faster on an H200 host (docs/BENCHMARKS.md).
  c.tier2.huge_pages = True
  # Pipelined: how q, k, v and prefill K, V reach the host. "fused": a decode step's own program copies its
  # q, k, v into pinned host memory (one dispatch a step instead of two; on an H200 host less dispatch time in
  # 7 of 8 interleaved pairs and more decode tok/s in 6, docs/BENCHMARKS.md; prefill's K, V as "pinned");
  # "pinned": a device_put into pinned host memory after each step (the bulk prefill's K, V reached tier 2
  # at 11.6 GB/s against 1.3 pageable); "pageable": copy_to_host_async.
  c.tier2.host_copy = "fused"
  # Shared-memory requests of a tensor call written and rung in one native call without the GIL
  # (tier2_cpu/csrc/shm_ring.cc; built with g++ at first use); False: NumPy writes, one part at a time.
  c.tier2.native_writer = True
  # Pipelined: the interpreter's thread switch interval while the engine runs (0 = Python's 5 ms). Shorter
  # hands the GIL sooner to the thread that dispatches tier 1's steps when the sender or reply threads hold it
  # (0.5 ms changed nothing on the H200 host's long shapes, docs/BENCHMARKS.md).
  c.tier2.switch_interval_ms = 0.0
  c.tier2.serve_threads = 1  # calls a spawned server serves at once (2: one's host work beside another's kernel)
  c.tier2.timeout_s = 60.0  # deadline of every tier-2 call
  c.tier2.transport = "auto"  # auto (shared memory on loopback), grpc or shm
  c.tier2.in_flight = 0  # pipelined micro-batches in flight; 0 = auto from measured step, round trip and tier-2 work
  c.tier2.split = "spread"  # pipelined micro-batches: "spread" (each spans every shard) or "shards" (rows grouped by shard)
  c.tier2.send_thread = True  # pipelined: q, k, v waited for and sent by a thread of their own, not the dispatching one
  c.tier2.inject_delay_ms = 0.0  # delay spawned servers add to each tensor RPC (latency studies)
  c.tier2.auth_token = ""  # token for tier2.addresses' servers (their --auth_token); empty = none
  c.tier2.tls_ca = ""  # PEM CA or self-signed cert of tier2.addresses' servers (--tls_cert); empty = no TLS

  c.distributed = ml_collections.ConfigDict()  # tier 1 across hosts (jax.distributed); docs/MULTI_HOST.md
  c.distributed.coordinator_address = ""  # "host:port" of process 0's coordinator; empty = one process
  c.distributed.num_processes = 1  # tier-1 processes in the job (one per host, usually)
  c.distributed.process_id = 0  # this process's index in [0, num_processes)
  c.distributed.local_device_ids = ""  # accelerators this process uses, e.g. "0,1"; empty = all visible
  c.distributed.initialization_timeout_s = 300  # how long to wait for every process to join

  c.splitwise = ml_collections.ConfigDict()  # phase splitting: workers, KV transfer, router (launch/worker.py)
  c.splitwise.kv_timeout_s = 30.0  # a KV transfer not committed within this is abandoned; its KV freed
  c.splitwise.on_transfer_failure = "recompute"  # recompute: route the request again; fail: report an error
  c.splitwise.max_attempts = 3  # routes a request gets under recompute before it ends with an error
  c.splitwise.mixed_pool = True  # an idle worker of one role may take the other role's work (router)
  c.splitwise.send_threads = 4  # threads a prefill worker sends layers' K,V with
  c.splitwise.prefills_in_flight = 2  # a prefill worker's shipped batches dispatched but not yet all sent
  c.splitwise.layers_per_call = 4  # a prefill worker's layers per jitted call: K,V ship after each call
  # Rows of a prefill worker's batch at most: 1 prefills each prompt alone, so its prefill and K,V gather
  # shapes depend on its length alone (replay's warm-up runs each length; batches of several rows would
  # compile a new shape per combination, seconds each on a GPU, during measured requests).
  c.splitwise.prefill_rows = 1
  c.splitwise.kv_message_mb = 4.0  # a layer's K,V goes in messages of at most this (power-of-two tokens)
  c.splitwise.poll_interval_s = 0.002  # how often the router polls each worker for outputs and load
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key and what is allowed."""
  _one_of("placement", config.placement, PLACEMENTS)
  _one_of("dtype", config.dtype, DTYPES)
  _one_of("role", config.role, ROLES)
  _one_of("engine.layer_loop", config.engine.layer_loop, LAYER_LOOPS)
  _one_of("engine.decode_attention", config.engine.decode_attention, DECODE_ATTENTION_KERNELS)
  if config.engine.decode_attention == "pallas" and config.engine.layer_loop != "unrolled":
    raise ConfigError("engine.decode_attention='pallas' needs engine.layer_loop='unrolled' (a static layer "
                      "index per kernel call)")
  for key in ("max_num_seqs", "page_size", "max_model_len", "max_prefill_tokens", "decode_steps_per_call",
              "width_buckets_per_octave", "tensor_parallel", "layer_slices"):
    _positive(config, f"engine.{key}")
  if config.engine.decode_attention == "pallas" and config.engine.tensor_parallel > 1:
    raise ConfigError("engine.decode_attention='pallas' runs on one device: it needs engine.tensor_parallel=1")
  if not 0.0 < config.engine.kv_cache_memory_fraction <= 1.0:
    raise ConfigError(f"engine.kv_cache_memory_fraction={config.engine.kv_cache_memory_fraction}: "
                      "expected a value in (0, 1]")
  if config.engine.kv_cache_gb < 0:
    raise ConfigError(f"engine.kv_cache_gb={config.engine.kv_cache_gb}: expected >= 0")
  if config.sampling.temperature < 0:
    raise ConfigError(f"sampling.temperature={config.sampling.temperature}: expected >= 0")
  if not 0.0 < config.sampling.top_p <= 1.0:
    raise ConfigError(f"sampling.top_p={config.sampling.top_p}: expected a value in (0, 1]")
  _validate_local_share(config)
  _validate_tier2(config.tier2, config.engine.layer_slices)
  _validate_distributed(config.distributed)
  _validate_splitwise(config)
  if config.checkpoint and not os.path.isdir(config.checkpoint):
    raise ConfigError(f"checkpoint={config.checkpoint!r}: no such directory")


def _validate_local_share(config) -> None:
  f = config.local_attention_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
    raise ConfigError(f"local_attention_fraction={f!r}: expected a number in [0, 1]")
  if f > 0 and config.placement == "local":
    raise ConfigError(f"local_attention_fraction={f!r} with placement='local': the share applies to the two-tier "
                      "placements (callback, pipelined); local keeps all attention on tier 1 already")
  if f > 0 and config.placement == "pipelined" and config.engine.decode_attention == "pallas":
    raise ConfigError("local_attention_fraction > 0 with placement='pipelined' needs engine.decode_attention="
                      "'xla': its per-layer steps take the layer as a traced index, the Pallas kernel a static one")


def _validate_tier2(t, slices: int) -> None:
  if not isinstance(t.spawn, int) or t.spawn < 0:
    raise ConfigError(f"tier2.spawn={t.spawn!r}: expected an integer >= 0")
  if not isinstance(t.switch_interval_ms, (int, float)) or t.switch_interval_ms < 0:
    raise ConfigError(f"tier2.switch_interval_ms={t.switch_interval_ms!r}: expected a number >= 0 (0 = Python's default)")
  if not isinstance(t.serve_threads, int) or t.serve_threads < 1:
    raise ConfigError(f"tier2.serve_threads={t.serve_threads!r}: expected an integer >= 1")
  groups = t.addresses.split(";")
  if t.addresses and len(groups) != slices:
    raise ConfigError(f"tier2.addresses: {len(groups)} \";\"-separated groups for engine.layer_slices={slices}")
  for a in filter(None, re.split("[,;]", t.addresses)):
    if not _is_host_port(a.strip()):
      raise ConfigError(f"tier2.addresses: {a!r}: expected host:port")
  if not t.addresses and t.spawn == 0:
    raise ConfigError("tier2.spawn=0 and tier2.addresses is empty: no tier-2 server to use")
  _one_of("tier2.kv_dtype", t.kv_dtype, TIER2_KV_DTYPES)
  if t.kv_cache_gb <= 0:
    raise ConfigError(f"tier2.kv_cache_gb={t.kv_cache_gb}: expected > 0")
  if t.cpus != "auto" and not all(part.strip() for part in t.cpus.split(";")):
    raise ConfigError(f"tier2.cpus={t.cpus!r}: expected \"auto\" or core lists like \"0-3;4-7\"")
  if t.cpus != "auto" and t.spawn and len(t.cpus.split(";")) != t.spawn * slices:
    raise ConfigError(f"tier2.cpus={t.cpus!r}: {len(t.cpus.split(';'))} core lists for tier2.spawn={t.spawn} "
                      f"x engine.layer_slices={slices} servers")
  if t.timeout_s <= 0:
    raise ConfigError(f"tier2.timeout_s={t.timeout_s}: expected > 0")
  _one_of("tier2.transport", t.transport, TIER2_TRANSPORTS)
  if not isinstance(t.in_flight, int) or not 0 <= t.in_flight <= MAX_IN_FLIGHT:
    raise ConfigError(f"tier2.in_flight={t.in_flight!r}: expected an integer in [0, {MAX_IN_FLIGHT}]")
  _one_of("tier2.split", t.split, TIER2_SPLITS)
  _one_of("tier2.host_copy", t.host_copy, TIER2_HOST_COPIES)
  if t.inject_delay_ms < 0:
    raise ConfigError(f"tier2.inject_delay_ms={t.inject_delay_ms}: expected >= 0")
  for key in ("auth_token", "tls_ca"):
    if t[key] and not t.addresses:
      raise ConfigError(f"tier2.{key} is set but tier2.addresses is empty: it applies to running servers "
                        "given by address, not to the ones tier 1 spawns")
  if t.tls_ca and not os.path.isfile(t.tls_ca):
    raise ConfigError(f"tier2.tls_ca={t.tls_ca!r}: no such file")


def _validate_distributed(d) -> None:
  if d.coordinator_address and not _is_host_port(d.coordinator_address):
    raise ConfigError(f"distributed.coordinator_address={d.coordinator_address!r}: expected host:port")
  if not isinstance(d.num_processes, int) or d.num_processes < 1:
    raise ConfigError(f"distributed.num_processes={d.num_processes!r}: expected a positive integer")
  if not isinstance(d.process_id, int) or not 0 <= d.process_id < d.num_processes:
    raise ConfigError(f"distributed.process_id={d.process_id!r}: expected an integer in "
                      f"[0, {d.num_processes})")
  if d.num_processes > 1 and not d.coordinator_address:
    raise ConfigError(f"distributed.num_processes={d.num_processes} needs distributed.coordinator_address")
  if d.local_device_ids and not all(i.strip().isdigit() for i in d.local_device_ids.split(",")):
    raise ConfigError(f"distributed.local_device_ids={d.local_device_ids!r}: expected device ids like 0,1")
  if not isinstance(d.initialization_timeout_s, int) or d.initialization_timeout_s <= 0:
    raise ConfigError(f"distributed.initialization_timeout_s={d.initialization_timeout_s!r}: "
                      "expected a positive integer")


def _validate_splitwise(config) -> None:
  s = config.splitwise
  if config.role == "prefill" and config.placement != "local":
    raise ConfigError(f"role='prefill' needs placement='local' (got {config.placement!r}): a prefill worker "
                      "ships each layer's K,V from its paged cache")
  if config.role == "decode" and config.placement not in ("local", "pipelined"):
    raise ConfigError(f"role='decode' needs placement 'local' or 'pipelined' (the combined mode: K,V received "
                      f"into tier-2 shards), got {config.placement!r}")
  if config.role == "decode" and config.placement == "pipelined" and config.local_attention_fraction > 0:
    raise ConfigError(f"local_attention_fraction={config.local_attention_fraction!r} with role='decode' and "
                      "placement='pipelined': a combined decode worker keeps every request's KV on tier 2")
  _one_of("splitwise.on_transfer_failure", s.on_transfer_failure, TRANSFER_FAILURE_POLICIES)
  for key in ("kv_timeout_s", "poll_interval_s", "kv_message_mb"):
    if not s[key] > 0:
      raise ConfigError(f"splitwise.{key}={s[key]}: expected > 0")
  for key in ("send_threads", "prefills_in_flight", "layers_per_call", "prefill_rows"):
    if not isinstance(s[key], int) or s[key] < 1:
      raise ConfigError(f"splitwise.{key}={s[key]!r}: expected a positive integer")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig to build: the checkpoint's config.json when one is set, else config.model."""
  if config.checkpoint:
    path = os.path.join(config.checkpoint, "config.json")
    if not os.path.exists(path):
      raise ConfigError(f"checkpoint={config.checkpoint!r}: missing config.json")
    with open(path) as f:
      return _fits_context(config, ModelConfig.from_hf(json.load(f), dtype=config.dtype))
  fields = config.model.to_dict()
  try:
    model = ModelConfig(dtype=config.dtype, **fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from e
  return _fits_context(config, model)


def _fits_context(config: ml_collections.ConfigDict, model: ModelConfig) -> ModelConfig:
  if config.engine.max_model_len > model.max_position_embeddings:
    raise ConfigError(f"engine.max_model_len={config.engine.max_model_len} exceeds the model's "
                      f"max_position_embeddings={model.max_position_embeddings}")
  return model


def default_sampling(config: ml_collections.ConfigDict) -> SamplingParams:
  """The config's sampling section as SamplingParams (requests override fields one by one)."""
  s = config.sampling
  return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, ignore_eos=s.ignore_eos)


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """config.tokenizer, else the checkpoint's tokenizer.json, else the built-in tiny tokenizer."""
  if config.tokenizer:
    return config.tokenizer
  if config.checkpoint:
    return os.path.join(config.checkpoint, "tokenizer.json")
  return TINY_TOKENIZER


def _one_of(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def _is_host_port(address: str) -> bool:
  host, _, port = address.rpartition(":")
  return bool(host) and port.isdigit()


def _positive(config, dotted):
  section, key = dotted.split(".")
  value = config[section][key]
  if not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{dotted}={value!r}: expected a positive integer")
