"""Device kernel times from a jax.profiler Perfetto trace, grouped by what each kernel computes.

A kernel is named after its HLO instruction (a GPU fusion `input_reduce_fusion.8` runs as
`input_reduce_fusion_8`); the compiled HLO text gives that instruction's opcode, custom-call target and
metadata op_name, whose jax.named_scope parts (`decode_attention`, `kv_write`, `sampling`, set by
model_runner.py) say where it came from. Groups: attention, kv_write, matmul, copy/gather, sampling, other.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re

CONTAINERS = ("while", "conditional", "call")  # host-side events that enclose the kernels of their body
GROUPS = ("attention", "kv_write", "matmul", "copy/gather", "sampling", "other")
# Host threads that run XLA CPU thunks; their bookkeeping events are not kernels (the CPU smoke test).
_CPU_THREAD = "tf_XLAPjRtCpuClient"
_CPU_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?\s([a-z][a-z0-9-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%(\S+?)[,\s]")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """Instruction name (dots as underscores, as kernels are named) -> opcode, target, callee, op_name."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    info = dict(opcode=m.group(2))
    for key, pattern in (("op_name", _OP_NAME), ("target", _TARGET), ("calls", _CALLS)):
      found = pattern.search(line)
      info[key] = found.group(1) if found else ""
    out[m.group(1).replace(".", "_")] = info
  return out


def classify(kernel: str, info: dict) -> str:
  """The group of a kernel given its HLO instruction's opcode, target, callee and op_name."""
  text = " ".join((kernel, info["opcode"], info["target"], info["calls"])).lower()
  scope = info["op_name"]
  if "decode_attention" in scope or "paged_decode_attention" in text:
    return "attention"
  if "kv_write" in scope:
    return "kv_write"
  if any(w in text for w in ("gemm", "cublas", "dot", "xmma", "nvjet", "cutlass", "matmul")) or (
      "/dot_general" in scope):
    return "matmul"
  if "sampling" in scope:
    return "sampling"
  if any(w in text for w in ("copy", "memcpy", "memset", "transpose", "gather", "dynamic-slice",
                             "dynamic-update-slice", "dynamic_update_slice")):
    return "copy/gather"
  return "other"


def latest_trace(trace_dir: str) -> str:
  """The newest perfetto_trace.json.gz that jax.profiler.trace(create_perfetto_trace=True) wrote."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def kernel_events(path: str) -> list[tuple[str, float, str]]:
  """(kernel name, microseconds, its string args joined: op names the profiler attached) of every device
  kernel in the trace; on a host-only trace (CPU), the XLA thunks run on the CPU client's threads."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device = [e for e in complete if procs.get(e["pid"], "").startswith("/device:")]
  streams = [e for e in device if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
  device = streams or device  # kernels run on stream lines; other device lines repeat them (XLA Ops, ...)
  if not device:
    device = [e for e in complete if threads.get((e["pid"], e.get("tid")), "").startswith(_CPU_THREAD)
              and not e["name"].startswith(_CPU_BOOKKEEPING)]
  out = []
  for e in device:
    args = e.get("args") or {}
    hint = " ".join(v for v in args.values() if isinstance(v, str) and len(v) < 1000)
    out.append((str(args.get("hlo_op") or e["name"]), float(e["dur"]), hint))
  return out


def summarize(events: list[tuple[str, float, str]], hlo_text: str, steps: int, top: int = 15) -> dict:
  """Per decode step: ms by group and the `top` kernels by total time (name, group, ms, launches).

  A kernel whose name is no HLO instruction (a library kernel) is grouped by its name and trace args.
  """
  instructions = hlo_instructions(hlo_text)
  per_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
  for name, us, hint in events:
    per_kernel[name][0] += us
    per_kernel[name][1] += 1
    per_kernel[name][2] = per_kernel[name][2] or hint
  groups = dict.fromkeys(GROUPS, 0.0)
  rows = []
  for name, (us, count, hint) in per_kernel.items():
    info = instructions.get(name.replace(".", "_"))
    if info and info["opcode"] in CONTAINERS:
      continue
    info = info or dict(opcode="", op_name=hint, target="", calls="")
    group = classify(name, info)
    groups[group] += us / 1e3 / steps
    rows.append(dict(kernel=name, group=group, ms_per_step=us / 1e3 / steps, launches_per_step=count / steps,
                     op_name=info["op_name"]))
  rows.sort(key=lambda r: -r["ms_per_step"])
  return dict(group_ms_per_step=groups, kernel_ms_per_step=sum(groups.values()),
              launches_per_step=sum(r["launches_per_step"] for r in rows), top_kernels=rows[:top], num_kernels=len(rows))


_COPY = re.compile(r"^\s*(?:ROOT )?%(\S+) = ([a-z0-9]+)\[([0-9,]*)\]\S* copy\(")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}


def large_copies(hlo_text: str, min_bytes: int) -> list[dict]:
  """Copy instructions of at least min_bytes in compiled HLO (e.g. a KV pool or weights copied per call)."""
  out = []
  for line in hlo_text.splitlines():
    m = _COPY.match(line)
    if m and m.group(2) in _ITEMSIZE:
      shape = [int(d) for d in m.group(3).split(",") if d]
      nbytes = math.prod(shape) * _ITEMSIZE[m.group(2)]
      if nbytes >= min_bytes:
        out.append(dict(name=m.group(1), shape=f"{m.group(2)}{shape}", mib=nbytes / 2**20))
  return out
