"""How many model actors of each kind, and what each asks for, from the cluster's resources.

`plan_cluster` sizes pools by what the work costs (`cosed.distributed.costs`) on the
nodes actually there; `plan_pools` is the earlier even split, kept as ``ray.policy: legacy``.
Everything here is pure: the Ray edge passes in ``ray.nodes()`` and measured busy fractions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from cosed.config import PoolResources, RayConfig
from cosed.distributed.costs import CAPTION, KINDS, CostModel

_EPS = 1e-6
_SHARE_DECIMALS = 4  # Ray keeps resource amounts to 1e-4


@dataclass(frozen=True)
class PoolPlan:
    """A pool's actors and what each asks of Ray.

    ``hosts`` of the ``replicas`` share their GPU with one actor of the ``partner``
    pool and ask ``host_gpus``; the others ask ``num_gpus``. A guest pool (CLIP and
    the selector, captions) names its host pool as ``partner``. What the plan counts
    is what the actors occupy: the GPUs in use are the sum of the asks.
    """

    replicas: int
    num_gpus: float
    num_cpus: float
    hosts: int = 0
    host_gpus: float = 0.0
    partner: str | None = None

    def asks(self) -> list[float]:
        """The GPU ask of each actor, hosts first."""
        return [self.host_gpus] * self.hosts + [self.num_gpus] * (self.replicas - self.hosts)

    @property
    def gpus(self) -> float:
        return round(sum(self.asks()), _SHARE_DECIMALS)

    @property
    def capacity(self) -> float:
        """GPU-seconds served per second (a pool planned without GPUs: one per actor)."""
        return self.gpus if self.gpus > 0 else float(self.replicas)


def plan_pools(ray_cfg: RayConfig, cluster_gpus: float, cluster_cpus: float,
               fixed_gpus: dict[str, float] | None = None) -> dict[str, PoolPlan]:
    """Pool sizes for a cluster. ``fixed_gpus`` keeps each pool's per-actor share once chosen.

    Fixed replica counts are honoured first; pools with ``replicas: auto`` share
    the GPUs left, text-to-image first since it runs the most denoising passes.
    On a CPU-only cluster an auto pool gets one actor per three CPU slots.
    """
    specs: dict[str, PoolResources] = {kind: getattr(ray_cfg, kind) for kind in KINDS}
    gpus = {kind: (fixed_gpus or {}).get(kind, _num_gpus(spec.num_gpus, cluster_gpus)) for kind, spec in specs.items()}
    cpus = {kind: _num_cpus(spec.num_cpus, cluster_cpus) for kind, spec in specs.items()}
    replicas = {kind: int(spec.replicas) for kind, spec in specs.items() if spec.replicas != "auto"}
    auto = [kind for kind in KINDS if kind not in replicas]
    gpu_auto = [k for k in auto if gpus[k] > 0]
    for kind in auto:
        if gpus[kind] == 0:
            replicas[kind] = max(1, int(cluster_cpus // (len(KINDS) * max(cpus[kind], _EPS))))
    if gpu_auto:
        left = cluster_gpus - sum(replicas[k] * gpus[k] for k in replicas if gpus[k] > 0)
        share = max(left, 0) / len(gpu_auto)
        for kind in gpu_auto:
            replicas[kind] = max(1, math.floor(share / gpus[kind] + _EPS))
        spare = left - sum(replicas[k] * gpus[k] for k in gpu_auto)
        first = gpu_auto[0]
        replicas[first] += max(0, math.floor(spare / gpus[first] + _EPS))
    return {kind: PoolPlan(replicas=replicas[kind], num_gpus=gpus[kind], num_cpus=cpus[kind]) for kind in KINDS}


def _num_gpus(value: float | str, cluster_gpus: float) -> float:
    if value != "auto":
        return float(value)
    if cluster_gpus <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= len(KINDS) else _share(cluster_gpus)


def _num_cpus(value: float | str, cluster_cpus: float) -> float:
    if value != "auto":
        return float(value)
    return 1.0 if cluster_cpus >= len(KINDS) else _share(cluster_cpus)


def _share(total: float) -> float:
    """A third of ``total``, rounded down so that three shares always fit."""
    return math.floor(total / len(KINDS) * 1e4) / 1e4


# --- Cost-aware planning -------------------------------------------------------------------------

def pool_kinds(work: dict[str, float]) -> tuple[str, ...]:
    """The pools a run needs: text-to-image, video and CLIP always; captions when there is caption work."""
    return KINDS + ((CAPTION,) if work.get(CAPTION, 0.0) > 0 else ())


_MAX_FRACTION = 0.5  # a model that would need more than half a GPU gets whole GPUs instead


class PlanError(RuntimeError):
    """No placeable plan exists on these nodes (the message says what is missing)."""


@dataclass(frozen=True)
class Node:
    """What one alive Ray node offers to model actors."""

    cpus: float
    gpus: float
    memory: float = 0.0
    node_id: str = ""


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """`Node`s from ``ray.nodes()`` (dead nodes dropped)."""
    return [Node(cpus=n.get("Resources", {}).get("CPU", 0.0), gpus=n.get("Resources", {}).get("GPU", 0.0),
                 memory=n.get("Resources", {}).get("memory", 0.0), node_id=n.get("NodeID", ""))
            for n in ray_nodes if n.get("Alive", True)]


@dataclass(frozen=True)
class ClusterPlan:
    """Actors per pool and what each asks of Ray, concurrent drivers, and why."""

    pools: dict[str, PoolPlan]
    drivers: int
    reason: str
    policy: str = "cost"
    work: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> float:
        return round(sum(p.gpus for p in self.pools.values()), _SHARE_DECIMALS)

    def capacity(self) -> dict[str, float]:
        """Per pool, the GPU-seconds it serves per second (a pool planned without GPUs: one per actor)."""
        return {kind: p.capacity for kind, p in self.pools.items()}

    def layout(self) -> dict[str, dict]:
        return {kind: {"replicas": p.replicas, "num_gpus": p.num_gpus} for kind, p in self.pools.items()}

    def describe(self) -> str:
        def pool(kind: str, p: PoolPlan) -> str:
            whole = f"{kind} {p.replicas - p.hosts} x ({p.num_gpus:g} GPU, {p.num_cpus:g} CPU)"
            return whole + (f" + {p.hosts} x ({p.host_gpus:g} GPU, hosting {p.partner})" if p.hosts else "")

        pools = ", ".join(pool(kind, p) for kind, p in self.pools.items())
        return f"pool plan ({self.policy}): {pools}; {self.drivers} concurrent tasks. {self.reason}"

    def to_dict(self) -> dict:
        return {"policy": self.policy, "reason": self.reason, "drivers": self.drivers, "gpus": self.gpus,
                "pools": {kind: {"replicas": p.replicas, "num_gpus": p.num_gpus, "num_cpus": p.num_cpus,
                                 **({"hosts": p.hosts, "host_gpus": p.host_gpus} if p.hosts else {}),
                                 **({"partner": p.partner} if p.partner else {})}
                          for kind, p in self.pools.items()},
                "expected_gpu_seconds": {k: round(v, 3) for k, v in self.work.items()}}


def plan_cluster(ray_cfg: RayConfig, nodes: list[Node], work: dict[str, float], costs: CostModel,
                 drivers_hint: float | None = None, leads: dict[str, float] | None = None) -> ClusterPlan:
    """Pools sized by expected GPU-seconds (``work`` per kind) on these nodes; always placeable.

    Models that need a whole GPU split the whole GPUs in proportion to their work
    (each pool gets the next GPU while its work per GPU is the largest); a small
    model (CLIP and the selector) takes a fractional share of a GPU of the pool
    with the most work, whose actors leave that share free. CPUs per actor are
    what the busiest node can give. ``drivers_hint`` is the mean task's critical
    path over its GPU-seconds (see `drivers_for`). ``leads`` are the seconds at one end of the run a pool
    cannot work (`costs.pool_leads`): whole GPUs go where work per GPU plus lead is largest, so that every
    pool can end together.
    """
    if ray_cfg.policy == "legacy":
        return _legacy_plan(ray_cfg, nodes, work)
    if ray_cfg.policy != "cost":
        raise ValueError(f"ray.policy must be cost or legacy, got {ray_cfg.policy!r}")
    kinds = pool_kinds(work)
    specs = {kind: getattr(ray_cfg, kind) for kind in kinds}
    weights = {k: max(work.get(k, 0.0), 0.0) for k in kinds}
    if sum(weights.values()) <= 0:
        weights, leads = dict.fromkeys(kinds, 1.0), None  # no work known: leads would mean nothing beside it
    whole_slots = sum(math.floor(n.gpus + _EPS) for n in nodes)
    whole = [k for k in kinds if costs.whole_gpu.get(k, True)
             or (specs[k].num_gpus != "auto" and float(specs[k].num_gpus) >= 1)]
    guests: dict[str, tuple[str, int]] = {}
    if sum(n.gpus for n in nodes) <= 0:
        replicas, gpus, reason = _cpu_split(specs, weights, nodes)
    elif whole_slots >= len(whole):
        replicas, gpus, reason, guests = _gpu_split(specs, weights, whole_slots, whole, leads or {})
    else:
        replicas, gpus, reason = _shared_gpu(specs, weights, nodes)
    pools, note = _fit(specs, weights, replicas, gpus, nodes, guests)
    share = {k: round(weights[k] / sum(weights.values()), 3) for k in kinds}
    reason = f"expected GPU-second shares {share}; {reason}{note}"
    plan = ClusterPlan(pools=pools, drivers=0, reason=reason, work=dict(work))
    return ClusterPlan(pools=pools, drivers=drivers_for(ray_cfg, plan, drivers_hint), reason=reason, work=dict(work))


def drivers_for(ray_cfg: RayConfig, plan: ClusterPlan, critical_over_work: float | None) -> int:
    """Concurrent tasks that keep every pool busy (Little's law, with 2x headroom for queueing).

    A pool of capacity C GPU-seconds per second finishes C / W tasks per second when
    a task costs W GPU-seconds; each task stays at least its critical path P, so
    C * P / W tasks must run at once.
    """
    if ray_cfg.max_concurrent_tasks != "auto":
        return int(ray_cfg.max_concurrent_tasks)
    capacity = sum(plan.capacity().values())
    if not critical_over_work:
        return max(2, 2 * plan.pools["sd"].replicas)
    return max(2, math.ceil(2.0 * capacity * critical_over_work))


def _gpu_split(specs, weights, whole_slots, whole, leads):
    total = sum(weights.values())
    hosts = [k for k in whole if specs[k].num_gpus == "auto"]
    for kind in [k for k in specs if k not in whole]:
        if (not hosts or weights[kind] / total * whole_slots > _MAX_FRACTION) and whole_slots > len(whole):
            whole = whole + [kind]  # too much work (or no pool) to share a GPU with
    gpus: dict[str, float] = {}
    replicas: dict[str, int] = {}
    for kind in whole:
        spec = specs[kind]
        gpus[kind] = 1.0 if spec.num_gpus == "auto" else float(spec.num_gpus)
        if spec.replicas != "auto":
            replicas[kind] = int(spec.replicas)
    auto = [k for k in whole if k not in replicas]
    used = sum(replicas[k] * math.ceil(gpus[k] - _EPS) for k in replicas)
    for kind in auto:
        replicas[kind] = 1
        used += math.ceil(gpus[kind] - _EPS)
    while auto:
        fits = [k for k in auto if used + math.ceil(gpus[k] - _EPS) <= whole_slots]
        if not fits:
            break
        kind = max(fits, key=lambda k: weights[k] / (replicas[k] * gpus[k]) + (leads.get(k, 0.0) if weights[k] else 0.0))
        replicas[kind] += 1
        used += math.ceil(gpus[kind] - _EPS)
    reason = f"{whole_slots} whole GPUs split by work among {', '.join(whole)}"
    hosts = [k for k in hosts if replicas[k] > 0]
    guests: dict[str, tuple[str, int]] = {}
    free_hosts = list(hosts)  # a host pool's actors share their GPU with one guest pool: one partner each
    for kind in sorted((k for k in specs if k not in whole), key=lambda k: -weights[k]):
        spec = specs[kind]
        load = weights[kind] / total * whole_slots  # GPUs this pool would keep busy
        if not free_hosts:
            replicas[kind], gpus[kind] = max(1, int(spec.replicas) if spec.replicas != "auto" else 1), 0.0
            reason += f"; {kind} on CPUs (no GPU pool left to share with)"
            continue
        host = max(free_hosts, key=lambda k: weights[k])
        free_hosts.remove(host)
        count = int(spec.replicas) if spec.replicas != "auto" else max(1, math.ceil(load / _MAX_FRACTION))
        count = max(1, min(count, replicas[host]))
        share = float(spec.num_gpus) if spec.num_gpus != "auto" else _ceil_share(min(_MAX_FRACTION, max(0.01, load / count)))
        replicas[kind], gpus[kind] = count, share
        guests[kind] = (host, count)
        reason += (f"; {kind} shares {count} {host} GPU{'s' if count > 1 else ''} ({share:g} each, "
                   f"those {host} actors ask {_floor_share(gpus[host] - share):g})")
    return replicas, gpus, reason, guests


def _shared_gpu(specs, weights, nodes):
    """Fewer GPUs than whole-GPU models: one actor per pool, GPU shares in proportion to work."""
    biggest = max(n.gpus for n in nodes)
    total = sum(max(weights[k], 0.05 * sum(weights.values())) for k in specs)
    replicas = {k: 1 if specs[k].replicas == "auto" else int(specs[k].replicas) for k in specs}
    gpus = {}
    for kind in specs:
        if specs[kind].num_gpus != "auto":
            gpus[kind] = float(specs[kind].num_gpus)
        else:
            part = max(weights[kind], 0.05 * sum(weights.values())) / total
            gpus[kind] = _floor_share(min(biggest, 1.0) * part / replicas[kind])
    return replicas, gpus, f"fewer GPUs ({biggest:g} on the largest node) than whole-GPU models: pools share them"


def _cpu_split(specs, weights, nodes):
    """A CPU-only cluster: one actor per pool, more where CPUs allow, by work."""
    cpus = sum(n.cpus for n in nodes)
    replicas = {k: 1 if specs[k].replicas == "auto" else int(specs[k].replicas) for k in specs}
    auto = [k for k in specs if specs[k].replicas == "auto"]
    while auto and sum(replicas.values()) + 1 <= cpus:
        kind = max(auto, key=lambda k: weights[k] / replicas[k])
        replicas[kind] += 1
    gpus = {k: 0.0 if specs[k].num_gpus == "auto" else float(specs[k].num_gpus) for k in specs}
    return replicas, gpus, "no GPUs: model actors on CPUs"


def _pool_plans(replicas: dict, gpus: dict, cpus: dict, guests: dict[str, tuple[str, int]]) -> dict[str, PoolPlan]:
    """PoolPlans where each guest actor sits on a host actor's GPU (the hosts ask what the guests leave)."""
    plans = {k: PoolPlan(replicas=replicas[k], num_gpus=gpus[k], num_cpus=cpus[k]) for k in replicas}
    for guest, (host, count) in guests.items():
        count = min(replicas[guest], replicas[host])
        plans[guest] = replace(plans[guest], replicas=count, partner=host)
        plans[host] = replace(plans[host], hosts=count, host_gpus=_floor_share(gpus[host] - gpus[guest]),
                              partner=guest)
    return plans


def _fit(specs, weights, replicas, gpus, nodes, guests=None):
    """PoolPlans with CPUs the nodes can give; drops actors (least work per actor first) until all place."""
    note = ""
    guests = dict(guests or {})
    replicas = dict(replicas)
    while True:
        trial = _pool_plans(replicas, gpus, dict.fromkeys(specs, 0.0), guests)
        placed = place(trial, nodes)
        if placed is not None:
            counts: dict[int, int] = {}
            for where in placed.values():
                for index in where:
                    counts[index] = counts.get(index, 0) + 1
            auto_cpus = min(1.0, min((_floor_share(nodes[i].cpus / c) for i, c in counts.items()), default=1.0))
            plan = _pool_plans(replicas, gpus, {k: auto_cpus if specs[k].num_cpus == "auto" else float(specs[k].num_cpus)
                                                for k in specs}, guests)
            if place(plan, nodes) is not None:
                if auto_cpus < 1.0:
                    note += f"; {auto_cpus:g} CPU per model actor (the busiest node has fewer CPUs than actors)"
                return plan, note
        shrinkable = [k for k in specs if replicas[k] > 1]
        if not shrinkable:
            raise PlanError(
                "no placeable pool plan on nodes " + ", ".join(f"({n.cpus:g} CPU, {n.gpus:g} GPU)" for n in nodes)
                + " for pools " + ", ".join(f"{k}: {replicas[k]} x ({gpus[k]:g} GPU, {specs[k].num_cpus} CPU)"
                                            for k in specs))
        kind = min(shrinkable, key=lambda k: weights[k] / replicas[k])
        replicas[kind] -= 1
        note += f"; one {kind} actor fewer so that every actor places"


def place(pools: dict[str, PoolPlan], nodes: list[Node]) -> dict[str, list[int]] | None:
    """Node index of every actor, as Ray could place them (largest GPU asks first), or None."""
    return _place(pools, nodes)[0]


def _place(pools: dict[str, PoolPlan], nodes: list[Node]) -> tuple[dict[str, list[int]] | None, list, list]:
    """(where, CPUs left per node, free share of each GPU per node) after placing every actor (None: some
    actor does not place)."""
    cpus = [n.cpus for n in nodes]
    gpu_free = [[1.0] * math.floor(n.gpus + _EPS) + ([n.gpus % 1] if n.gpus % 1 > _EPS else []) for n in nodes]
    actors = sorted(((k, ask, p.num_cpus) for k, p in pools.items() for ask in p.asks()), key=lambda a: -a[1])
    where: dict[str, list[int]] = {k: [] for k in pools}
    for kind, ask, num_cpus in actors:
        options = []
        for i, free in enumerate(gpu_free):
            if cpus[i] + _EPS < num_cpus:
                continue
            if ask >= 1 - _EPS:
                need = math.ceil(ask - _EPS)
                whole = [g for g, f in enumerate(free) if f >= 1 - _EPS]
                if len(whole) >= need:
                    options.append((0.0, i, whole[:need]))
            elif ask > 0:
                options += [(f, i, [g]) for g, f in enumerate(free) if f + _EPS >= ask]
            else:
                options.append((-cpus[i], i, []))
        if not options:
            return None, cpus, gpu_free
        _, i, taken = min(options, key=lambda o: (o[0], o[1]))
        cpus[i] -= num_cpus
        for g in taken:
            free = gpu_free[i]
            free[g] = round(free[g] - min(ask, 1.0), _SHARE_DECIMALS)
        where[kind].append(i)
    return where, cpus, gpu_free


def free_room(pools: dict[str, PoolPlan], nodes: list[Node]) -> list[Node]:
    """What each node has left once the pools' actors are placed: whole GPUs and CPUs (a GPU part-used by an
    actor, or a host's left-over share, is not room for a new actor). Actors that do not place take nothing."""
    placed = dict(pools)
    while _place(placed, nodes)[0] is None:  # the cluster shrank: count only the actors that still place
        kind = max((k for k, p in placed.items() if p.replicas - p.hosts > 0), key=lambda k: placed[k].replicas,
                   default=None)
        if kind is None:
            return [replace(n, gpus=0.0) for n in nodes]
        placed[kind] = replace(placed[kind], replicas=placed[kind].replicas - 1)
    _, cpus, gpu_free = _place(placed, nodes)
    return [replace(n, cpus=max(0.0, c), gpus=float(sum(1 for f in free if f >= 1 - _EPS)))
            for n, c, free in zip(nodes, cpus, gpu_free)]


def _legacy_plan(ray_cfg: RayConfig, nodes: list[Node], work: dict[str, float]) -> ClusterPlan:
    if ray_cfg.clip.replicas == "auto":  # the earlier runtime always had one CLIP actor
        ray_cfg = replace(ray_cfg, clip=replace(ray_cfg.clip, replicas=1))
    pools = plan_pools(ray_cfg, sum(n.gpus for n in nodes), sum(n.cpus for n in nodes))
    limit = ray_cfg.max_concurrent_tasks
    drivers = max(2, 2 * pools["sd"].replicas) if limit == "auto" else int(limit)
    return ClusterPlan(pools=pools, drivers=drivers, reason="even split of the GPUs (legacy policy)",
                       policy="legacy", work=dict(work))


def _floor_share(value: float) -> float:
    return math.floor(value * 10 ** _SHARE_DECIMALS + _EPS) / 10 ** _SHARE_DECIMALS


def _ceil_share(value: float) -> float:
    return math.ceil(value * 10 ** _SHARE_DECIMALS - _EPS) / 10 ** _SHARE_DECIMALS


def plan_for_cluster(ray_cfg: RayConfig, get_nodes: Callable[[], list[Node]], work: dict[str, float],
                     costs: CostModel, drivers_hint: float | None = None, leads: dict[str, float] | None = None,
                     *, wait: bool = True,
                     log: Callable[[str], None] = print,
                     sleep: Callable[[float], None] = time.sleep) -> ClusterPlan:
    """The plan on the nodes ``get_nodes`` reports (``nodes_from_ray(ray.nodes())``); at start
    (``wait``) once the GPUs the run expects have joined, bounded by ``ray.gpu_wait_s``."""
    nodes = get_nodes() if not wait else wait_for_gpus(
        get_nodes, expected_gpus(ray_cfg, costs), ray_cfg.gpu_wait_s, strict=ray_cfg.min_gpus > 0, log=log,
        sleep=sleep)
    return plan_cluster(ray_cfg, nodes, work, costs, drivers_hint, leads)


# --- Waiting for GPU workers, rebalancing, autoscaling -------------------------------------------

def expected_gpus(ray_cfg: RayConfig, costs: CostModel) -> float:
    """GPUs the run expects to find: ``ray.min_gpus``, or one when the profile is made for GPUs."""
    return max(float(ray_cfg.min_gpus), 1.0 if costs.needs_gpu else 0.0)


def gpu_wait_message(nodes: list[Node], expected: float) -> str | None:
    """Why to wait before planning (None: plan now)."""
    have = sum(n.gpus for n in nodes)
    if have + _EPS >= expected:
        return None
    return (f"waiting for GPU workers: the cluster has {have:g} GPUs on {len(nodes)} nodes, "
            f"the run expects at least {expected:g} (ray.min_gpus, or a profile made for GPUs)")


def wait_for_gpus(get_nodes: Callable[[], list[Node]], expected: float, timeout_s: float, *, strict: bool,
                  poll_s: float = 5.0, log: Callable[[str], None] = print,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> list[Node]:
    """The cluster's nodes once it has ``expected`` GPUs, waiting up to ``timeout_s``.

    Past the deadline a ``strict`` wait (``ray.min_gpus`` set) raises; otherwise the
    run goes on with what is there, and says so.
    """
    deadline = clock() + timeout_s
    said = None
    while True:
        nodes = get_nodes()
        message = gpu_wait_message(nodes, expected)
        if message is None:
            return nodes
        if clock() >= deadline:
            if strict:
                raise TimeoutError(f"{message}; gave up after {timeout_s:g} s (ray.gpu_wait_s)")
            log(f"{message}; planning for the {sum(n.gpus for n in nodes):g} GPUs there after {timeout_s:g} s")
            return nodes
        if message != said:
            log(f"{message}; waiting up to {timeout_s:g} s (ray.gpu_wait_s)")
            said = message
        sleep(min(poll_s, max(deadline - clock(), 0.0)))


def rebalance_move(busy: dict[str, float], plan: ClusterPlan, *, high: float = 0.85, low: float = 0.6,
                   margin: float = 0.15) -> tuple[str, str] | None:
    """(idle pool, bottleneck pool) when one actor should move between them, else None.

    ``busy`` is each pool's busy fraction over a recent window. Hysteresis: the
    bottleneck must be at least ``high`` busy, the donor at most ``low``, and
    after the move the donor (fewer actors, same work) must still be ``margin``
    less busy than the bottleneck (more actors), so a move is never undone by the
    next one. The donor's actor must free at least what the bottleneck's asks for;
    the runtime drains one whose GPU holds no other pool's actor.
    """
    gpu_pools = {k: p for k, p in plan.pools.items() if k in busy and p.replicas > 0 and p.gpus > 0}
    if len(gpu_pools) < 2:
        return None
    to = max(gpu_pools, key=lambda k: busy[k])
    if busy[to] < high:
        return None
    # A donor gives up one actor that has a GPU of its own (never a host: its GPU holds a guest too).
    donors = [k for k, p in gpu_pools.items()
              if k != to and p.replicas - p.hosts > 0 and p.replicas > 1 and busy[k] <= low
              and p.num_gpus >= 1 - _EPS and k != gpu_pools[to].partner]
    if not donors:
        return None
    frm = min(donors, key=lambda k: busy[k])
    target, donor = gpu_pools[to], gpu_pools[frm]
    # A guest pool gains the share its new actor takes; the donor keeps a host actor for what is left.
    gain = target.num_gpus if target.num_gpus < 0.5 else 1.0
    donor_after = busy[frm] * donor.capacity / max(donor.capacity - gain, _EPS)
    bottleneck_after = busy[to] * target.capacity / (target.capacity + gain)
    if donor_after > bottleneck_after - margin:
        return None
    return frm, to


def rebalance_window_s(rescale_seconds: float, call_seconds: dict[str, float], calls: int = 10) -> float:
    """How long busy fractions are measured before a rebalancing decision: three ticks, and ``calls``
    calls of the slowest pool (busy time is counted when a call ends: over a window of a few calls a
    pool of 45 s clips reads as 0 % or 100 % busy, and a move decided on that would be undone)."""
    return max(3 * rescale_seconds, calls * max(call_seconds.values(), default=0.0))


def grow_pools(pools: dict[str, PoolPlan], room: list[Node], work: dict[str, float],
               fixed: set[str] = frozenset()) -> dict[str, int]:
    """Actors to add per pool when GPUs join a running job: each whole free GPU (``room``: `free_room`) goes to
    the pool with the most expected work per GPU it holds, as long as an actor of that pool places there.

    Existing actors keep their place and shape. Whole-GPU pools grow by whole actors;
    a guest pool (CLIP) grows by a pair on one new GPU: its actor and a host actor of
    its partner pool asking what the guest leaves. Pools in ``fixed`` (replicas set in
    the config) never grow. Every actor added places on ``room`` (nothing is asked
    for that would wait forever, nor grow an autoscaling cluster for nothing).
    """
    capacity = {kind: plan.capacity for kind, plan in pools.items()}
    added = dict.fromkeys(pools, 0)
    slots = [[n.gpus, n.cpus] for n in room]
    growable = [k for k, p in pools.items() if k not in fixed and p.replicas > 0
                and (p.num_gpus >= 0.5 or (p.partner and p.num_gpus > 0 and p.hosts == 0 and p.partner not in fixed))]

    def need(kind: str) -> float:  # CPUs an addition of this pool takes on its one GPU
        plan = pools[kind]
        return plan.num_cpus + (pools[plan.partner].num_cpus if plan.num_gpus < 0.5 else 0.0)

    while growable:
        kind = max(growable, key=lambda k: (work.get(k, 0.0) / max(capacity[k], _EPS), -list(pools).index(k)))
        slot = next((s for s in slots if s[0] >= 1 - _EPS and s[1] + _EPS >= need(kind)), None)
        if slot is None:
            growable.remove(kind)
            continue
        slot[0] -= 1
        slot[1] -= need(kind)
        plan = pools[kind]
        added[kind] += 1
        if plan.num_gpus < 0.5:  # a guest with a new host of its partner pool
            added[plan.partner] += 1
            capacity[kind] += plan.num_gpus
            capacity[plan.partner] += 1 - plan.num_gpus
        else:
            capacity[kind] += plan.num_gpus
    return added


def with_added(pools: dict[str, PoolPlan], added: dict[str, int]) -> dict[str, PoolPlan]:
    """The pools after `grow_pools`: a guest pool's new actors came with as many new hosts of its partner."""
    out = {kind: replace(plan, replicas=plan.replicas + added.get(kind, 0)) for kind, plan in pools.items()}
    for kind, plan in pools.items():
        if plan.partner and plan.num_gpus < 0.5 and added.get(kind):
            out[plan.partner] = replace(out[plan.partner], hosts=out[plan.partner].hosts + added[kind])
    return out


def wanted_gpus(max_gpus: float, remaining_seconds: float, mean_critical_path: float, tasks_left: int,
                whole_gpu_pools: int = 2) -> int:
    """GPUs to ask the autoscaler for, up to ``max_gpus`` (0: do not ask): enough to run every remaining task at once.

    A task cannot keep more than its GPU-seconds over its critical path busy, so
    more GPUs than ``remaining_seconds / mean_critical_path`` would idle.
    """
    if max_gpus <= 0 or tasks_left <= 0:
        return 0
    useful = math.ceil(remaining_seconds / mean_critical_path) if mean_critical_path > 0 else whole_gpu_pools
    return int(min(math.floor(max_gpus), max(useful, whole_gpu_pools)))
