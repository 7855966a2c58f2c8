"""The cluster-level scheduler (Splitwise): a pure policy over the workers' reported load.

At arrival a request gets a prefill worker (fewest pending prompt tokens) and a decode worker (least KV
reserved, among those with room for it). The mixed pool: a decode worker with nothing to do also
prefills when every prefill worker has a queue, and a prefill worker with an empty queue also decodes
when no decode worker has room (a route whose two workers are one runs colocated there). Colocated
workers are in the decode pool and prefill what they decode. `mixed_pool=False` keeps roles strict
(a decode worker then prefills only when no prefill worker is alive). A request no worker can take
gets no route: the caller keeps it waiting and asks again; nothing is ever dropped.
"""

from __future__ import annotations

import dataclasses

DECODE_ROLES = ("decode", "colocated")  # colocated workers only ever take routes to themselves


@dataclasses.dataclass
class WorkerLoad:
  """One worker as the router sees it (Poll's stats plus what the router sent since)."""
  name: str
  role: str
  kv_capacity_tokens: int
  max_num_seqs: int
  alive: bool = True
  pending_prompt_tokens: int = 0  # prompt tokens queued or being prefilled here
  kv_reserved_tokens: int = 0  # prompt + max output tokens of the requests held here for decode
  num_seqs: int = 0  # requests held here for decode

  @property
  def idle(self) -> bool:
    return self.pending_prompt_tokens == 0 and self.num_seqs == 0

  def fits(self, tokens: int) -> bool:
    return (self.num_seqs < self.max_num_seqs and
            self.kv_reserved_tokens + tokens <= self.kv_capacity_tokens)


@dataclasses.dataclass(frozen=True)
class Route:
  prefill: str
  decode: str

  @property
  def colocated(self) -> bool:
    return self.prefill == self.decode


class Router:
  """route() picks workers and charges them the request; update() replaces a worker's load by its report."""

  def __init__(self, workers: list[WorkerLoad], mixed_pool: bool = True):
    self.workers = {w.name: w for w in workers}
    self.mixed_pool = mixed_pool

  def update(self, name: str, **load) -> None:
    for key, value in load.items():
      setattr(self.workers[name], key, value)

  def mark_dead(self, name: str) -> None:
    self.workers[name].alive = False

  def route(self, prompt_tokens: int, max_tokens: int) -> Route | None:
    """The route for a request of `prompt_tokens` + up to `max_tokens` outputs, or None (it waits)."""
    need = prompt_tokens + max_tokens
    alive = [w for w in self.workers.values() if w.alive]
    decoders = sorted((w for w in alive if w.role in DECODE_ROLES and w.fits(need)),
                      key=lambda w: (w.kv_reserved_tokens, w.name))
    prefillers = sorted((w for w in alive if w.role == "prefill"),
                        key=lambda w: (w.pending_prompt_tokens, w.name))
    if not decoders:  # mixed pool: an idle prefill worker decodes too
      spare = [w for w in prefillers if self.mixed_pool and w.pending_prompt_tokens == 0 and w.fits(need)]
      if not spare:
        return None
      route = Route(spare[0].name, spare[0].name)
    else:
      decode = decoders[0]
      if decode.role == "colocated":
        route = Route(decode.name, decode.name)
      elif not prefillers or (self.mixed_pool and prefillers[0].pending_prompt_tokens > 0 and decode.idle):
        route = Route(decode.name, decode.name)  # mixed pool: an idle decode worker prefills too
      else:
        route = Route(prefillers[0].name, decode.name)
    self.workers[route.prefill].pending_prompt_tokens += prompt_tokens
    d = self.workers[route.decode]
    d.kv_reserved_tokens += need
    d.num_seqs += 1
    return route
