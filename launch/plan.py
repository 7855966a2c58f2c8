"""Planner: the most tokens per dollar for a model on given hardware, prices and network.

  # Two-tier (Glinthawk) vs a single-tier paged baseline, with the latency-tolerance curve:
  python launch/plan.py --config=configs/llama2_70b.py --tier1=configs/hardware/t4.json \
      --tier2=configs/hardware/cpu_vm.json --rtt_ms=1 --workloads=512:512,3584:512 --out=out/plan
  # Splitwise: prefill:decode split vs unsplit cluster at equal cost on an Azure trace:
  python launch/plan.py --system=splitwise --config=configs/llama2_70b.py \
      --machine=configs/hardware/dgx_h100.json --trace=conv --machines=6 --out=out/plan_split

Prints the chosen plans, writes plan.json and PNG plots into --out. Figures from datasheet
profiles are estimates, not measurements (see docs/SIMULATOR.md).
"""

import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from glinthawk_jax.config import ConfigError, model_config  # noqa: E402
from glinthawk_jax.json_file import write_json  # noqa: E402
from glinthawk_jax.sim import planner, profiles, splitwise, traces  # noqa: E402
from glinthawk_jax.sim.profiles import Network, ProfileError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama2_70b.py", "Model config (get_config()).")
_SYSTEM = flags.DEFINE_enum("system", "two_tier", ["two_tier", "splitwise"], "What to plan.")
_OUT = flags.DEFINE_string("out", "out/plan", "Directory for plan.json and the PNG plots.")
# Two-tier.
_TIER1 = flags.DEFINE_string("tier1", "configs/hardware/t4.json", "Tier-1 accelerator profile JSON.")
_TIER2 = flags.DEFINE_string("tier2", "configs/hardware/cpu_vm.json", "Tier-2 CPU machine profile JSON.")
_RTT_MS = flags.DEFINE_float("rtt_ms", 1.0, "Round-trip time between tiers, ms (one way = half).")
_LINK_GBPS = flags.DEFINE_float("link_gbps", 0.0, "Cap on inter-tier bandwidth per direction; 0 = NICs.")
_WORKLOADS = flags.DEFINE_list("workloads", ["512:512", "3584:512"], "prompt:output token lengths.")
_KV_BYTES = flags.DEFINE_integer("tier2_kv_bytes", 4, "Bytes per KV element on tier 2 (4: fp32, 2: bf16).")
_DELAYS_MS = flags.DEFINE_list("delays_ms", ["0", "10", "25", "50", "100", "150", "200"],
                               "One-way delays of the latency-tolerance curve, ms.")
_MAX_NODES = flags.DEFINE_integer("max_tier2_nodes", 16, "Most tier-2 machines per tier-1 accelerator.")
_COMPARE = flags.DEFINE_list("compare_slices", ["10", "20", "40", "80"],
                              "Also compare both systems' best plans at these tier-1 accelerator counts.")
_TOP = flags.DEFINE_integer("verify_top", 8, "Closed-form best plans checked in the event model.")
_MAX_DEPTH = flags.DEFINE_integer("max_in_flight", 256, "Most micro-batches in flight.")
# Splitwise.
_MACHINE = flags.DEFINE_string("machine", "configs/hardware/dgx_h100.json", "Machine profile (splitwise).")
_TRACE = flags.DEFINE_enum("trace", "conv", sorted(traces.AZURE_TRACES), "Azure LLM trace 2023.")
_REQUESTS = flags.DEFINE_integer("requests", 1000, "First N requests of the trace.")
_MACHINES = flags.DEFINE_integer("machines", 6, "Machines in the cluster (equal cost for every split).")
_SLO_TTFT = flags.DEFINE_float("slo_ttft_p99_s", 1.0, "p99 time-to-first-token SLO, s.")
_SLO_TBT = flags.DEFINE_float("slo_tbt_p99_s", 0.05, "p99 time-between-tokens SLO, s.")
_ITERATIONS = flags.DEFINE_integer("bisections", 10, "Bisection steps of the max-rate search.")


def main(argv):
  del argv
  try:
    m = model_config(_CONFIG.value)
    os.makedirs(_OUT.value, exist_ok=True)
    report = plan_two_tier(m) if _SYSTEM.value == "two_tier" else plan_splitwise(m)
  except (ConfigError, ProfileError, ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  report.update(model=_CONFIG.value.name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command=" ".join(sys.argv))
  path = os.path.join(_OUT.value, "plan.json")
  write_json(path, report)
  print(f"wrote {path}")


def plan_two_tier(m):
  tier1, tier2 = profiles.load(_TIER1.value), profiles.load(_TIER2.value)
  network = Network(one_way_latency_s=_RTT_MS.value / 2000, bandwidth_gbps=_LINK_GBPS.value)
  space = planner.SearchSpace(depths=tuple(range(1, _MAX_DEPTH.value + 1)),
                              tier2_nodes=tuple(range(1, _MAX_NODES.value + 1)))
  report = {"tier1": tier1.to_dict(), "tier2": tier2.to_dict(), "rtt_ms": _RTT_MS.value, "workloads": []}
  for spec in _WORKLOADS.value:
    prompt, output = (int(x) for x in spec.split(":"))
    wl = planner.Workload(prompt, output)
    tt = planner.search_two_tier(m, tier1, tier2, network, wl, space, _KV_BYTES.value)
    pg = planner.search_paged(m, tier1, wl, space)
    if not tt or not pg:
      raise ValueError(f"workload {spec}: no feasible {'two-tier' if not tt else 'paged'} plan")
    best, best_sim = planner.best_simulated(m, tier1, tier2, network, wl, tt, _KV_BYTES.value, _TOP.value)
    base, base_sim = planner.best_simulated(m, tier1, tier1, network, wl, pg, 2, _TOP.value)
    same = planner.best_throughput_at(pg, best.slices)
    same_sim = planner.settle(m, tier1, tier1, network, wl, same, 2)[1] if same else None
    row = dict(workload=spec,
               two_tier=dict(best.to_dict(), simulated_tokens_per_s=best_sim),
               paged=dict(base.to_dict(), simulated_tokens_per_s=base_sim),
               paged_same_accelerators=dict(same.to_dict(), simulated_tokens_per_s=same_sim) if same else None,
               tokens_per_dollar_ratio=(best_sim / best.cost_per_hour) / (base_sim / base.cost_per_hour),
               throughput_per_accelerator_ratio=(best_sim / best.slices) / (base_sim / base.slices),
               throughput_ratio_same_accelerators=best_sim / same_sim if same else None,
               tokens_per_dollar_ratio_same_accelerators=(
                   (best_sim / best.cost_per_hour) / (same_sim / same.cost_per_hour) if same else None))
    row["at_slices"] = _compare_at_slices(m, tier1, tier2, network, wl, tt, pg)
    delays = [float(d) / 1000 for d in _DELAYS_MS.value]
    row["latency_curve"] = planner.latency_curve(m, tier1, tier2, best, wl, delays, _LINK_GBPS.value, space,
                                                 _KV_BYTES.value)
    report["workloads"].append(row)
    _print_two_tier(row)
    _plot_two_tier(row, tt, pg, spec.replace(":", "_"))
  return report


def _compare_at_slices(m, tier1, tier2, network, wl, tt, pg):
  """Each system's best simulated plan with exactly S tier-1 accelerators, for S in --compare_slices."""
  rows = []
  for slices in (int(x) for x in _COMPARE.value):
    two = [p for p in tt if p.slices == slices]
    paged = [p for p in pg if p.slices == slices]
    row = dict(slices=slices)
    if two:
      plan, sim = planner.best_simulated(m, tier1, tier2, network, wl, two, _KV_BYTES.value, _TOP.value)
      row["two_tier"] = dict(plan.to_dict(), simulated_tokens_per_s=sim)
    if paged:
      plan, sim = planner.best_simulated(m, tier1, tier1, network, wl, paged, 2, _TOP.value)
      row["paged"] = dict(plan.to_dict(), simulated_tokens_per_s=sim)
    rows.append(row)
  return rows


def _print_two_tier(row):
  print(f"\n== workload prompt:output = {row['workload']}")
  print(f"{'system':10} {'accel':>5} {'t2/acc':>6} {'batch':>5} {'depth':>5} {'tok/s':>9} {'sim':>9} "
        f"{'$/h':>7} {'$/Mtok':>8}  bottleneck")
  for name in ("two_tier", "paged", "paged_same_accelerators"):
    p = row[name]
    if p:
      per_million = p["cost_per_hour"] / 3600 / p["simulated_tokens_per_s"] * 1e6
      print(f"{name[:10]:10} {p['slices']:5d} {p['tier2_nodes_per_slice']:6d} {p['batch']:5d} "
            f"{p['in_flight']:5d} {p['tokens_per_s']:9.1f} {p['simulated_tokens_per_s']:9.1f} "
            f"{p['cost_per_hour']:7.2f} {per_million:8.2f}  {p['bottleneck']}")
  print("tok/s: closed form; sim: event model (used for the ratios and $/Mtok)")
  same, same_cost = row["throughput_ratio_same_accelerators"], row["tokens_per_dollar_ratio_same_accelerators"]
  print(f"vs the best paged plan: tokens/$ {row['tokens_per_dollar_ratio']:.2f}x, throughput per accelerator "
        f"{row['throughput_per_accelerator_ratio']:.2f}x")
  print("vs paged on the same accelerators: " + (f"throughput {same:.1f}x, tokens/$ {same_cost:.1f}x" if same
                                                  else "no paged plan fits"))
  print(f"{'accel':>5} {'two-tier tok/s':>15} {'$/Mtok':>7} {'paged tok/s':>12} {'$/Mtok':>7} "
        f"{'thr ratio':>9} {'cost ratio':>10}")
  for r in row["at_slices"]:
    cells = []
    for name in ("two_tier", "paged"):
      p = r.get(name)
      cells.append((p["simulated_tokens_per_s"], p["cost_per_hour"] / 3600 / p["simulated_tokens_per_s"] * 1e6)
                   if p else None)
    fmt = lambda c, w: f"{c[0]:{w}.1f} {c[1]:7.2f}" if c else f"{'-':>{w}} {'-':>7}"  # noqa: E731
    ratios = (f"{cells[0][0] / cells[1][0]:9.2f} {cells[1][1] / cells[0][1]:10.2f}" if all(cells)
              else f"{'-':>9} {'-':>10}")
    print(f"{r['slices']:5d} {fmt(cells[0], 15)} {fmt(cells[1], 12)} {ratios}")
  print("(cost ratio = paged $/Mtok / two-tier $/Mtok: above 1 means two-tier is cheaper)")
  print("one-way delay ms: " + "  ".join(f"{r['one_way_delay_s'] * 1000:.0f}:{r['fixed_relative']:.2f}/"
                                         f"{r['replanned_relative']:.2f}" for r in row["latency_curve"])
        + "   (fixed plan / re-planned, relative)")


def _plot_two_tier(row, tt, pg, tag):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for plans, label in ((tt, "two-tier"), (pg, "paged")):
    by_batch = {}
    for p in plans:
      by_batch[p.batch] = max(by_batch.get(p.batch, 0.0), p.tokens_per_dollar)
    xs = sorted(by_batch)
    a.plot(xs, [by_batch[x] for x in xs], marker="o", label=label)
  a.set(xscale="log", xlabel="sequences per micro-batch", ylabel="best tokens per dollar",
        title=f"Plan search, prompt:output {row['workload']}")
  a.legend()
  curve = row["latency_curve"]
  ms = [r["one_way_delay_s"] * 1000 for r in curve]
  b.plot(ms, [r["fixed_relative"] for r in curve], marker="o", label="plan for 0 ms held fixed")
  b.plot(ms, [r["replanned_relative"] for r in curve], marker="s", label="re-planned (tokens/$)")
  b.set(xlabel="one-way delay between tiers, ms", ylabel="relative to 0 ms", ylim=(0, 1.05),
        title="Latency tolerance")
  b.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, f"two_tier_{tag}.png"), dpi=110)
  plt.close(fig)


def plan_splitwise(m):
  hw = profiles.load(_MACHINE.value)
  requests = traces.load_azure(_TRACE.value, limit=_REQUESTS.value)
  rows = splitwise.plan_split(m, hw, requests, _MACHINES.value, _SLO_TTFT.value, _SLO_TBT.value,
                              iterations=_ITERATIONS.value)
  unsplit = rows[0]
  best = max(rows[1:], key=lambda r: r["goodput"]) if len(rows) > 1 else unsplit
  print(f"\n== {_TRACE.value} trace, {_REQUESTS.value} requests, {_MACHINES.value} x {hw.name}, "
        f"SLO p99 TTFT <= {_SLO_TTFT.value} s, p99 TBT <= {_SLO_TBT.value} s")
  print(f"{'pools':28} {'req/s':>7} {'goodput':>9} {'TTFT p99':>9} {'TBT p99':>8} {'$/Mtok':>7}")
  out = []
  for r in rows:
    res = r["result"]
    per_million = hw.price_per_hour * _MACHINES.value / 3600 / r["goodput"] * 1e6 if r["goodput"] else 0.0
    print(f"{json.dumps(r['pools']):28} {r['rate']:7.2f} {r['goodput']:9.1f} "
          + (f"{res.ttft['p99']:9.3f} {res.tbt['p99']:8.4f} {per_million:7.2f}" if res else "  (none)"))
    out.append(dict(pools=r["pools"], rate=r["rate"], goodput=r["goodput"], cost_per_million_tokens=per_million,
                    result=res.__dict__ if res else None))
  cost = hw.price_per_hour * _MACHINES.value
  ratio = splitwise.equal_cost_ratio(best["goodput"], cost, unsplit["goodput"], cost) \
      if unsplit["goodput"] else float("inf")
  print("goodput: output tokens/s sustained within the SLOs (max rate x mean output tokens)")
  print(f"best split {json.dumps(best['pools'])}: {ratio:.2f}x the unsplit goodput at equal cost")
  _plot_split(rows)
  return {"machine": hw.to_dict(), "trace": _TRACE.value, "requests": _REQUESTS.value,
          "machines": _MACHINES.value, "slo": {"ttft_p99_s": _SLO_TTFT.value, "tbt_p99_s": _SLO_TBT.value},
          "layouts": out, "best_split": best["pools"], "split_vs_unsplit_equal_cost": ratio}


def _plot_split(rows):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, a = plt.subplots(figsize=(6, 4))
  labels = ["unsplit" if "mixed" in r["pools"] else f"{r['pools']['prefill']}:{r['pools']['decode']}"
            for r in rows]
  a.bar(labels, [r["goodput"] for r in rows])
  a.set(xlabel="prefill:decode machines", ylabel="output tokens/s within SLO", title=f"{_TRACE.value} trace")
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "splitwise.png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
