"""The worker's gRPC service: raw-bytes methods (wire.py) mapped onto a Worker, and serve()."""

from __future__ import annotations

import json
import signal
import threading
from concurrent import futures

import grpc

from glinthawk_jax.splitwise.wire import CHANNEL_OPTIONS, SERVICE
from glinthawk_jax.splitwise.worker import Worker, WorkerError


def _json_method(fn):
  def handler(request: bytes, context):
    try:
      message = json.loads(request)
      if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    except ValueError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad JSON message: {e}")
    try:
      return json.dumps(fn(message) or {}).encode()
    except WorkerError as e:
      context.abort(grpc.StatusCode[e.code], str(e))

  return handler


def _kv_method(worker: Worker):
  def handler(request: bytes, context):
    try:
      worker.receive_kv(request)
    except WorkerError as e:
      context.abort(grpc.StatusCode[e.code], str(e))
    return b""

  return handler


def build_server(worker: Worker, host: str, port: int, threads: int = 16) -> tuple[grpc.Server, int]:
  """A started server for `worker` and its port."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                       options=CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)])
  methods = {"Submit": _json_method(worker.submit), "Begin": _json_method(worker.begin),
             "Commit": _json_method(worker.commit), "Abort": _json_method(worker.abort),
             "Poll": _json_method(lambda _: worker.poll()), "KV": _kv_method(worker)}
  handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()}
  server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
  bound = server.add_insecure_port(f"{host}:{port}")
  if bound == 0:
    raise OSError(f"cannot bind {host}:{port}")
  server.start()
  return server, bound


def serve(worker: Worker, host: str, port: int) -> None:
  """Serves until SIGTERM/SIGINT; prints "worker ready on HOST:PORT" once serving."""
  server, bound = build_server(worker, host, port)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  loop = threading.Thread(target=worker.run, args=(stop,), name="engine-loop", daemon=True)
  loop.start()
  print(f"worker ready on {host}:{bound}", flush=True)
  while loop.is_alive() and not stop.wait(0.5):
    pass
  server.stop(grace=1.0).wait()
  died = not stop.is_set()
  stop.set()
  loop.join(timeout=30)  # so the worker's close() frees what the loop held, not what it still changes
  if died:
    raise SystemExit("worker: engine loop died")
