"""A cluster of worker processes on this host and the router loop that feeds them requests.

Workers are children started with launch/worker.py (each told this process's pid, so a killed cluster
leaves none behind: tier2_cpu/lifetime.py); `env` per worker picks its devices (CUDA_VISIBLE_DEVICES).
`Cluster.run` releases requests at their arrival times, routes them (router.py), polls the workers for
outputs, events and load, and recovers: a worker that dies or a KV transfer that fails sends its
requests back to the queue to be computed again (splitwise.on_transfer_failure=recompute) or ends
them with finish_reason "error" (fail).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import re
import time
from typing import Callable

import grpc

from glinthawk_jax.config import REPO_ROOT
from glinthawk_jax.requests import SamplingParams, token_gaps
from glinthawk_jax.splitwise.router import Route, Router, WorkerLoad
from glinthawk_jax.splitwise.wire import WorkerStub, params_to_json
from tier2_cpu.process import ServerProcess, stop_servers

LAUNCHER = os.path.join(REPO_ROOT, "launch", "worker.py")
_READY = re.compile(r"^worker ready on (\S+:\d+)$", re.M)
FINISH_ERROR = "error"  # a request ended by a failed transfer under on_transfer_failure=fail
# A request's timeline, in order (wall-clock stamps; a colocated route has no Begin and no transfer):
# arrival; routed (workers picked, Submit sent); begun (the decode worker's Begin returned at the prefill worker);
# dispatched (its last prefill chunk queued on the device); prefilled (its last layer's K,V on the prefill
# worker's host); commit_sent (every send returned, Commit going out); committed (Commit reached the decode
# worker); admitted (it joined the decode batch); first_token.
STAGES = ("arrival", "routed", "begun", "dispatched", "prefilled", "commit_sent", "committed", "admitted",
          "first_token")
_STAGE_KEYS = {"arrival": "arrival_s", "routed": "routed_s", "begun": "begun_s", "dispatched": "dispatched_s",
               "prefilled": "prefill_end_s", "commit_sent": "commit_sent_s", "committed": "commit_s",
               "admitted": "admitted_s"}


class WorkerProcess(ServerProcess):
  """A running worker (launch/worker.py); `address` is "host:port" once ready; `stop()` ends it."""

  launcher = LAUNCHER
  ready = _READY

  def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None):
    self.name = name
    super().__init__(args, env)

  @property
  def label(self) -> str:
    return f"worker {self.name}"


@dataclasses.dataclass
class ClusterRequest:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  arrival_s: float = 0.0  # seconds after the run starts


@dataclasses.dataclass
class ClusterOutput:
  """One finished request; times in seconds from its arrival (wall-clock stamps under `transfer`)."""
  request_id: str
  num_prompt_tokens: int
  token_ids: list[int]
  finish_reason: str
  ttft_s: float
  token_times_s: list[float]
  attempts: int  # routes tried (1 unless recomputed)
  route: tuple[str, str]  # (prefill worker, decode worker) of the attempt that finished
  kv_visible_s: float | None = None  # prefill end to KV committed at the decode worker (split routes)
  transfer: dict = dataclasses.field(default_factory=dict)
  error: str = ""

  @property
  def e2e_s(self) -> float:
    return self.token_times_s[-1] if self.token_times_s else self.ttft_s

  @property
  def time_between_tokens_s(self) -> list[float]:
    return token_gaps(self.token_times_s)

  @property
  def timeline(self) -> dict[str, float]:
    """The STAGES this request's finishing attempt went through: stage -> wall-clock time, in order."""
    out = {stage: self.transfer[key] for stage, key in _STAGE_KEYS.items() if self.transfer.get(key) is not None}
    if "arrival" in out and self.token_times_s:
      out["first_token"] = out["arrival"] + self.ttft_s
    return out


@dataclasses.dataclass
class _Attempt:
  index: int  # into the run's requests
  route: Route
  transfer: dict = dataclasses.field(default_factory=dict)


class Cluster:
  """Spawns the workers and runs request sets through them. roles[i] is worker i's "role" (placement
  local unless `overrides` set one) or "role:placement" ("decode:pipelined": the combined mode, its K,V
  on tier-2 servers it spawns); the worker is named role+i."""

  def __init__(self, config_path: str, roles: list[str], overrides: list[str] = (),
               envs: list[dict[str, str]] | None = None, ready_timeout_s: float = 300.0,
               on_transfer_failure: str = "recompute", mixed_pool: bool = True, poll_interval_s: float = 0.002,
               rpc_timeout_s: float = 60.0, max_attempts: int = 3):
    self.on_transfer_failure = on_transfer_failure
    self.max_attempts = max_attempts
    self.poll_interval_s = poll_interval_s
    self.rpc_timeout_s = rpc_timeout_s
    self.processes: dict[str, WorkerProcess] = {}
    self.stubs: dict[str, WorkerStub] = {}
    envs = envs or [{}] * len(roles)
    try:
      for i, (spec, env) in enumerate(zip(roles, envs)):
        role, _, placement = spec.partition(":")
        name = f"{role}{i}"
        args = [f"--config={config_path}", "--config.placement=local", f"--config.role={role}", "--port=0",
                *overrides, *([f"--config.placement={placement}"] if placement else [])]  # the spec's wins
        self.processes[name] = WorkerProcess(name, args, env)
      for name, p in self.processes.items():
        self.stubs[name] = WorkerStub(p.wait_ready(ready_timeout_s))
      loads = []
      for name, stub in self.stubs.items():
        s = stub.call("Poll", {}, rpc_timeout_s)["stats"]
        loads.append(WorkerLoad(name, s["role"], s["kv_capacity_tokens"], s["max_num_seqs"]))
      self.router = Router(loads, mixed_pool)
    except BaseException:
      self.close()
      raise
    self._uids = itertools.count(1)

  @property
  def addresses(self) -> dict[str, str]:
    return {name: p.address for name, p in self.processes.items()}

  def compiles(self) -> dict[str, dict]:
    """Each live worker's XLA compiles so far (Poll's stats; call between runs: Poll takes outputs)."""
    return {name: stub.call("Poll", {}, self.rpc_timeout_s)["stats"]["compiles"] for name, stub in self.stubs.items()
            if self.router.workers[name].alive}

  def kill(self, name: str) -> None:
    """SIGKILLs a worker (failure tests); the run loop notices and recomputes its requests."""
    self.processes[name].process.kill()
    self.processes[name].process.wait()

  def close(self) -> None:
    for stub in self.stubs.values():
      stub.close()
    stop_servers(list(self.processes.values()))
    self.stubs, self.processes = {}, {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def run(self, requests: list[ClusterRequest], timeout_s: float = 600.0,
          on_output: Callable[[ClusterOutput], None] | None = None) -> list[ClusterOutput]:
    """Runs every request to completion (outputs in request order); raises TimeoutError after timeout_s."""
    return _Run(self, requests, on_output).go(timeout_s)


class _Run:
  """One Cluster.run: arrivals, routing, polling, recovery."""

  def __init__(self, cluster: Cluster, requests: list[ClusterRequest], on_output):
    self.c = cluster
    self.requests = requests
    self.on_output = on_output
    self.outputs: list[ClusterOutput | None] = [None] * len(requests)
    self.attempts: dict[int, _Attempt] = {}  # uid -> the live attempt of a request
    self.num_attempts = collections.Counter()
    self.waiting: collections.deque[int] = collections.deque()  # arrived, not routed (in arrival order)
    self.t0 = 0.0

  def go(self, timeout_s: float) -> list[ClusterOutput]:
    order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival_s)
    arrivals = collections.deque(order)
    self.t0 = time.time()
    deadline = time.monotonic() + timeout_s
    remaining = len(self.requests)
    while remaining:
      if time.monotonic() > deadline:
        raise TimeoutError(f"cluster run: {remaining} of {len(self.requests)} requests unfinished after "
                           f"{timeout_s} s ({len(self.waiting)} waiting for a route)")
      now = time.time() - self.t0
      while arrivals and self.requests[arrivals[0]].arrival_s <= now:
        self.waiting.append(arrivals.popleft())
      remaining -= self._poll_all()
      self._route_waiting()
      time.sleep(self.c.poll_interval_s)
    return self.outputs

  def _poll_all(self) -> int:
    finished = 0
    for name in list(self.c.stubs):
      if not self.c.router.workers[name].alive:
        continue
      try:
        if self.c.processes[name].process.poll() is not None:
          raise ConnectionError("process exited")
        reply = self.c.stubs[name].call("Poll", {}, self.c.rpc_timeout_s)
      except (grpc.RpcError, ConnectionError) as e:
        self._worker_died(name, e)
        continue
      s = reply["stats"]
      self.c.router.update(name, pending_prompt_tokens=s["pending_prompt_tokens"], num_seqs=s["num_seqs"],
                           kv_reserved_tokens=s["kv_reserved_tokens"] + self._unbegun(name))
      for event in reply["events"]:
        finished += self._event(event)
      for out in reply["outputs"]:
        finished += self._output(out)
    return finished

  def _unbegun(self, name: str) -> int:
    """KV the router sent `name` that it cannot report yet (split routes not yet prefilled)."""
    return sum(self._need(a.index) for a in self.attempts.values()
               if a.route.decode == name and not a.route.colocated and "prefill_end_s" not in a.transfer)

  def _need(self, i: int) -> int:
    r = self.requests[i]
    return len(r.prompt_ids) + r.params.max_tokens

  def _event(self, event: dict) -> int:
    a = self.attempts.get(event["uid"])
    if a is None:
      return 0  # an attempt already given up
    kind = event["event"]
    if kind == "prefilled":
      a.transfer["prefill_end_s"] = event["prefill_end_s"]
    elif kind in ("begun", "dispatched"):  # the first: a preempted sequence is dispatched again later
      a.transfer.setdefault(f"{kind}_s", event["t"])
    elif kind == "transferred":
      a.transfer["layer_computed_s"] = event["layer_computed_s"]
      a.transfer["commit_sent_s"] = event.get("commit_sent_s")
    elif kind == "transfer_failed":
      del self.attempts[event["uid"]]
      logging.warning("request %s: KV transfer %s -> %s failed: %s", self.requests[a.index].request_id,
                      a.route.prefill, a.route.decode, event.get("error"))
      return self._retry_or_fail(a, event.get("error", "transfer failed"))
    return 0

  def _output(self, out: dict) -> int:
    a = self.attempts.pop(out["uid"], None)
    if a is None:
      return 0
    r = self.requests[a.index]
    arrival = self.t0 + r.arrival_s
    times = [t - arrival for t in out["token_times_s"]]
    transfer = dict(a.transfer, arrival_s=arrival,
                    **{k: out[k] for k in ("commit_s", "kv_layer_received_s", "admitted_s") if k in out})
    visible = (transfer["commit_s"] - transfer["prefill_end_s"]
               if "commit_s" in transfer and "prefill_end_s" in transfer else None)
    self._done(a.index, ClusterOutput(r.request_id, len(r.prompt_ids), out["token_ids"], out["finish_reason"],
                                      times[0], times, self.num_attempts[a.index],
                                      (a.route.prefill, a.route.decode), visible, transfer))
    return 1

  def _done(self, index: int, output: ClusterOutput) -> None:
    self.outputs[index] = output
    if self.on_output is not None:
      self.on_output(output)

  def _retry_or_fail(self, a: _Attempt, error: str) -> int:
    """A failed transfer: route the request again (recompute, up to max_attempts routes), else end it."""
    attempts = self.num_attempts[a.index]
    if self.c.on_transfer_failure == "recompute":
      if attempts < self.c.max_attempts:
        self.waiting.appendleft(a.index)
        return 0
      error = f"gave up after {attempts} attempts (splitwise.max_attempts); last: {error}"
    r = self.requests[a.index]
    self._done(a.index, ClusterOutput(r.request_id, len(r.prompt_ids), [], FINISH_ERROR, float("nan"), [],
                                      self.num_attempts[a.index], (a.route.prefill, a.route.decode), error=error))
    return 1

  def _worker_died(self, name: str, error: Exception) -> None:
    logging.warning("worker %s is gone (%s): recomputing its requests", name, error)
    self.c.router.mark_dead(name)
    lost = sorted((uid, a) for uid, a in self.attempts.items() if name in (a.route.prefill, a.route.decode))
    for uid, a in lost:
      del self.attempts[uid]
      for other in {a.route.prefill, a.route.decode} - {name}:
        self._abort(other, uid)
    for _, a in reversed(lost):  # back to the head of the queue, oldest first
      self.waiting.appendleft(a.index)
    if not any(w.alive for w in self.c.router.workers.values()):
      raise RuntimeError(f"every worker is gone (last: {name}: {error})")

  def _abort(self, name: str, uid: int) -> None:
    try:
      self.c.stubs[name].call("Abort", {"uid": uid}, self.c.rpc_timeout_s)
    except grpc.RpcError as e:
      logging.warning("abort of %d on %s failed: %s", uid, name, e)

  def _route_waiting(self) -> None:
    while self.waiting:
      i = self.waiting[0]
      r = self.requests[i]
      route = self.c.router.route(len(r.prompt_ids), r.params.max_tokens)
      if route is None:
        return  # no worker can take it now: it waits (first in line)
      self.waiting.popleft()
      uid = next(self.c._uids)  # noqa: SLF001
      self.num_attempts[i] += 1
      self.attempts[uid] = _Attempt(i, route)
      decode = "" if route.colocated else self.c.processes[route.decode].address
      msg = {"uid": uid, "request_id": r.request_id, "prompt_ids": r.prompt_ids,
             "params": params_to_json(r.params), "decode_address": decode}
      self.attempts[uid].transfer["routed_s"] = time.time()
      try:
        self.c.stubs[route.prefill].call("Submit", msg, self.c.rpc_timeout_s)
      except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
          self._worker_died(route.prefill, e)  # requeues this request too
          continue
        raise ValueError(f"request {r.request_id}: {e.details()}") from None
