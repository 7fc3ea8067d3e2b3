"""`cosed plan`: capacity planning with the runtime's own policies in virtual time (`distributed.simulator`).

For each cluster size it prints the pool plan, the predicted makespan, GPU-hours,
tasks per GPU-hour, efficiency against the GPU-seconds bound, the bottleneck pool,
dispatch messages per model call and the job's work per event; with a deadline,
the fewest GPUs that finish in time; with a preemption rate, the same run with
nodes lost at that rate beside it (makespan, GPU-hours, work lost and redone). Costs come from the profile, with
``ray.costs`` on top, or from a previous run's measured call times (its
``summary.json``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cosed import storage
from cosed.config import RunConfig
from cosed.distributed.costs import CostModel, batch_work, measured_factors, pool_totals
from cosed.distributed.preemptions import PreemptionModel
from cosed.distributed.simulator import Cluster, Overheads, SimResult, simulate
from cosed.errors import UserError


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``45s``, ``30m``, ``8h`` or ``1d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise UserError(f"not a duration: {text!r} (use e.g. 8h, 30m, 90s)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def parse_join(text: str) -> tuple[float, int]:
    """``GPUS@WHEN``: GPUs that join the cluster at a time into the run (``8@30m``)."""
    gpus, _, when = text.partition("@")
    if not gpus.strip().isdigit() or not when:
        raise UserError(f"--join takes GPUS@WHEN (e.g. 8@30m), got {text!r}")
    return parse_duration(when), int(gpus)


def measured_costs(costs: CostModel, summary_uri: str, step_counts: list[int], cfg: RunConfig) -> CostModel:
    """The cost model scaled per pool by a previous run's measured seconds per call (its summary.json)."""
    try:
        summary = json.loads(storage.read_bytes(summary_uri))
    except FileNotFoundError as exc:
        raise UserError(f"no summary at {summary_uri}") from exc
    actors = summary.get("actors") or []
    if not actors:
        raise UserError(f"{summary_uri} records no model actors (was it a Ray run?)")
    factors = measured_factors(batch_work(step_counts, cfg, costs), pool_totals(actors, "busy", "calls"))
    return costs.scaled(factors)


@dataclass(frozen=True)
class PlanRequest:
    step_counts: list[int]
    cfg: RunConfig
    costs: CostModel
    gpus_per_node: int = 8
    cpus_per_node: float = 96.0
    joins: tuple[tuple[float, int], ...] = ()
    overheads: Overheads = Overheads()
    seed: int = 0

    def run(self, gpus: int, preemptions: PreemptionModel = PreemptionModel()) -> SimResult:
        cluster = Cluster(gpus=gpus, gpus_per_node=self.gpus_per_node, cpus_per_node=self.cpus_per_node,
                          joins=self.joins, preemptions=preemptions)
        return simulate(self.step_counts, self.cfg, self.costs, cluster, self.overheads, self.seed)


def fewest_gpus(request: PlanRequest, deadline_s: float, most: int = 8192) -> SimResult | None:
    """The smallest cluster (in whole nodes, the last one may be partial) whose predicted makespan meets the
    deadline; None when even ``most`` GPUs do not."""
    low, high = 1, most
    best = request.run(high)
    if best.makespan_s > deadline_s:
        return None
    while low < high:
        middle = (low + high) // 2
        result = request.run(middle)
        if result.makespan_s <= deadline_s:
            high, best = middle, result
        else:
            low = middle + 1
    return best if best.gpus == high else request.run(high)


def describe(result: SimResult) -> list[str]:
    plan = ", ".join(f"{kind} {p['replicas']}" + (f" ({p['hosts']} hosting {p.get('partner')})" if p.get("hosts") else "")
                     + ("" if p["num_gpus"] >= 1 else f" x {p['num_gpus']:g} GPU") for kind, p in result.plan["pools"].items())
    return [f"{result.gpus} GPUs: pools {plan}; {result.drivers} tasks sequencing at once",
            f"  makespan {_hours(result.makespan_s)}, {result.gpu_hours:.1f} GPU-hours, "
            f"{result.tasks_per_gpu_hour:.2f} tasks per GPU-hour, efficiency {result.efficiency:.1%} of the bound "
            f"({_hours(result.bound_s)}), bottleneck {result.bottleneck}, mean task latency "
            f"{_hours(result.mean_latency_s)}",
            "  busy " + " / ".join(f"{k} {v:.2f}" for k, v in result.busy.items())
            + f"; {result.dispatch_messages_per_call:.2f} dispatch messages per model call; "
              f"{result.core_us_per_event:.1f} µs of job work per event ({result.core_events} events)"
            + (f"; grew {result.grown}" if result.grown else "")
            + (f"; {result.unplaced_actors} actors could not place" if result.unplaced_actors else "")
            + (f"; placement shared: {result.lent['actors']} SD actors took clips from {_hours(result.lent['first_s'])}"
               if result.lent else "")]


def describe_preemptions(base: SimResult, hit: SimResult, rate: str, model: PreemptionModel) -> str:
    """The run with preemptions beside the same run without."""
    lost = hit.preemption
    cut = ", ".join(f"{kind} {n}" for kind, n in sorted(lost["cut_calls"].items())) or "none"
    redone = sum(lost["redone_calls"].values())
    after = "never replaced" if model.replace_after_s is None else f"replaced after {_hours(model.replace_after_s)}"
    return (f"  with preemptions {rate} (nodes {after}): {lost['nodes']} node{'' if lost['nodes'] == 1 else 's'} lost, makespan "
            f"{_hours(hit.makespan_s)} ({_change(hit.makespan_s, base.makespan_s)}), {hit.gpu_hours:.1f} GPU-hours "
            f"({hit.gpu_hours - base.gpu_hours:+.1f}); {lost['lost_gpu_hours']:.2f} GPU-hours of work lost "
            f"(calls cut: {cut}; {lost['drivers']} task attempts lost with their driver, {redone} of their model "
            f"calls made again); {hit.tasks} done, {hit.failed} failed")


def describe_transitions(cut: SimResult, keyed: SimResult) -> str:
    """Keyframe transitions beside the same run with cuts: each clip waits for the next scene's choice."""
    return (f"  keyframe transitions: mean task latency {_hours(keyed.mean_latency_s)} vs {_hours(cut.mean_latency_s)} "
            f"with cuts ({keyed.mean_latency_s - cut.mean_latency_s:+.0f} s: each clip waits one step for the next "
            f"scene), makespan {_hours(keyed.makespan_s)} ({_change(keyed.makespan_s, cut.makespan_s)}), "
            f"{keyed.gpu_hours:.1f} GPU-hours ({keyed.gpu_hours - cut.gpu_hours:+.1f})")


def _change(value: float, base: float) -> str:
    return f"{(value - base) / base:+.1%}" if base else "n/a"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def record(result: SimResult) -> dict:
    """One `--json` record: what the issue asks for first, then everything else the simulation measured."""
    data = result.to_dict()
    return {"gpus": data.pop("gpus"), "makespan_s": data.pop("makespan_s"), "gpu_hours": data.pop("gpu_hours"),
            "efficiency": data.pop("efficiency"), "bottleneck": data.pop("bottleneck"),
            "dispatch_messages_per_call": data.pop("dispatch_messages_per_call"), **data}
