"""Splitwise KV transfer throughput, stage by stage: a real decode worker process, an in-process KVSender.

The sender ships one request's K,V (--layers layers of [--tokens, --kv_heads, --head_dim], 7B widths by
default, bf16) as ModelRunner.prefill_by_layer hands it over (host arrays of --layers_per_call layers),
Commit included, --reps times. The decode worker (hidden size 64, so the model is small on a CPU, K,V at
full width) reports its receipt stages (kv_stages in Poll: decoding messages, host->device, cache writes).
Stages, in GB/s of K,V bytes:
  encode: encode_kv alone, in this process (one thread);
  send: ship() to Commit returned (encode + gRPC + the worker's receipt handlers, overlapped);
  decode / to_device / write: the decode worker's handler and loop time per stage (summed over threads);
  ready: ship() to the request's first token at the decode worker (its K,V written, one decode step).

  python benchmarks/kv_transfer.py --out kv_transfer.json          # CPU or GPU, about a minute
  python benchmarks/kv_transfer.py --smoke --out /tmp/kv.json      # small widths, a bug check
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.requests import SamplingParams  # noqa: E402
from glinthawk_jax.splitwise.cluster import WorkerProcess  # noqa: E402
from glinthawk_jax.splitwise.kv_sender import KVSender, ShippedRow  # noqa: E402
from glinthawk_jax.splitwise.wire import WorkerStub, encode_kv, params_to_json  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="kv_transfer.json")
  p.add_argument("--smoke", action="store_true", help="4 layers, 200 tokens, 4 KV heads of 32 (a bug check)")
  p.add_argument("--tokens", type=int, default=1200)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=32)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--layers_per_call", type=int, default=4)
  p.add_argument("--send_threads", type=int, default=4)
  p.add_argument("--kv_message_mb", type=float, default=4.0, help="largest K,V message (splitwise.kv_message_mb)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="K,V dtype (XLA's CPU scatters bfloat16 about 700x slower: float32 there)")
  p.add_argument("--reps", type=int, default=3, help="requests shipped after one warm-up")
  return p.parse_args(argv)


def worker_args(a) -> list[str]:
  return ["--config=configs/tiny.py", "--config.placement=local", "--config.role=decode", "--port=0",
          f"--config.dtype={a.dtype}", f"--config.model.num_layers={a.layers}", f"--config.model.num_heads={a.kv_heads}",
          f"--config.model.num_kv_heads={a.kv_heads}", f"--config.model.head_dim={a.head_dim}",
          "--config.engine.max_num_seqs=2", f"--config.engine.max_model_len={a.tokens + 64}",
          f"--config.engine.kv_cache_gb={1.5 * a.layers * a.tokens * a.kv_heads * a.head_dim * 2 * np.dtype(a.dtype).itemsize / 2**30:.3f}",
          "--config.splitwise.kv_timeout_s=120"]


def wait_output(stub: WorkerStub, uid: int, timeout_s: float = 300.0) -> tuple[float, dict]:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    reply = stub.call("Poll", {}, 30.0)
    if any(o["uid"] == uid for o in reply["outputs"]):
      return time.perf_counter(), reply["stats"]
    time.sleep(0.002)
  raise TimeoutError(f"request {uid}: no output from the decode worker in {timeout_s} s")


def ship_one(sender: KVSender, stub: WorkerStub, address: str, uid: int, groups: list, positions) -> dict:
  n = len(positions)
  sender.begin(uid, address, {"uid": uid, "request_id": f"r{uid}", "prompt_ids": [1] * (n + 1),
                              "params": params_to_json(SamplingParams(max_tokens=1, ignore_eos=True)),
                              "num_kv_tokens": n})
  done, result = threading.Event(), {}

  def on_done(_, error, __):
    result["error"] = error
    result["committed"] = time.perf_counter()
    done.set()

  start = time.perf_counter()
  sender.ship(list(groups), [ShippedRow(uid, 0, positions)], [uid], lambda *_: None, on_done)
  if not done.wait(300):
    raise TimeoutError(f"request {uid}: not committed in 300 s")
  if result["error"] is not None:
    raise RuntimeError(f"request {uid}: transfer failed: {result['error']}")
  ready, stats = wait_output(stub, uid)
  return {"send_s": result["committed"] - start, "ready_s": ready - start, "kv_stages": stats["kv_stages"], "device": stats["device"]}


def main(argv=None) -> None:
  a = parse_args(argv)
  if a.smoke:
    a.tokens, a.layers, a.kv_heads, a.head_dim, a.reps = 200, 4, 4, 32, 2
  dtype = np.dtype(ml_dtypes.bfloat16 if a.dtype == "bfloat16" else np.float32)
  rng = np.random.default_rng(0)
  pool = rng.standard_normal(1 << 20, np.float32).astype(dtype)
  shape = (2, a.tokens, a.kv_heads, a.head_dim)
  layer_kv = np.resize(pool, shape)
  groups = [np.stack([layer_kv] * min(a.layers_per_call, a.layers - f)) for f in range(0, a.layers, a.layers_per_call)]
  positions = np.arange(a.tokens, dtype=np.int32)
  nbytes = a.layers * layer_kv.nbytes
  started = time.perf_counter()
  encode_kv(0, 0, positions, layer_kv[0], layer_kv[1], a.kv_heads)
  t = time.perf_counter()
  for layer in range(a.layers):
    encode_kv(0, layer, positions, layer_kv[0], layer_kv[1], a.kv_heads)
  encode_s = time.perf_counter() - t

  worker = WorkerProcess("decode", worker_args(a))
  sender = None
  try:
    address = worker.wait_ready(600)
    stub = WorkerStub(address)
    sender = KVSender(a.kv_heads, 120.0, a.send_threads, message_bytes=a.kv_message_mb * 2**20)
    runs, before = [], None
    for uid in range(a.reps + 1):  # the first one compiles the worker's writes and decode
      r = ship_one(sender, stub, address, uid + 1, groups, positions)
      if before is not None:
        r["stage_s"] = {k: r["kv_stages"][k] - before[k] for k in ("decode_s", "to_device_s", "write_s")}
        runs.append(r)
      before = r["kv_stages"]
  finally:
    if sender is not None:
      sender.close()
    worker.stop()
  gbps = lambda s: nbytes / s / 1e9
  med = lambda xs: float(np.median(xs))
  stages = {"encode": gbps(encode_s), "send": gbps(med([r["send_s"] for r in runs])),
            **{k[:-2]: gbps(med([r["stage_s"][k] for r in runs])) for k in ("decode_s", "to_device_s", "write_s")},
            "ready": gbps(med([r["ready_s"] for r in runs]))}
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "device": runs[-1]["device"], "args": vars(a), "bytes_per_request": nbytes,
         "gbps": stages, "runs": runs, "wall_s": time.perf_counter() - started}
  write_json(a.out, out, indent=1)
  print(f"K,V per request: {nbytes / 1e6:.0f} MB ({a.layers} layers x {a.tokens} tokens x {a.kv_heads} x "
        f"{a.head_dim} {a.dtype} K and V), {a.send_threads} send threads, {a.layers_per_call} layers per call, messages <= {a.kv_message_mb} MB")
  print(f"{'stage':<10} {'GB/s':>7}")
  for k, v in stages.items():
    print(f"{k:<10} {v:7.2f}")


if __name__ == "__main__":
  main()
