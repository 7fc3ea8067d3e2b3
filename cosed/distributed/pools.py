"""The model actors of one run, owned by the job process: start, watch, replace, grow, rebalance.

The job process creates every model worker, so no actor's death takes the
others with it. Each actor has the exact shape the plan gave it (a whole GPU,
or a host's or a guest's share): what the run counts as used is what its actors
occupy. Workers restart on failure (``max_restarts=-1``). `tick` never waits:
it reads whatever `info` answers came back, asks again, replaces an actor that
stays unreachable or fails to start (with backoff, elsewhere when possible),
restarts one whose call hangs, adds actors that place when the cluster grows,
and moves an actor from an idle pool to the bottleneck. The decisions are the
pure functions of `sizing` and `policies`, which the simulator runs too.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

from cosed.config import RunConfig
from cosed.distributed import telemetry
from cosed.distributed.actors import remote_worker
from cosed.distributed.costs import CostModel, TaskWork, measured_factors, pool_leads, pool_totals
from cosed.distributed.dispatch import Membership
from cosed.distributed.policies import (LENDS, Sample, call_timeout, hung, lend_to_video, needs_rescue, rescue_donor,
                                        serving_pool, unreachable_limit, window_busy)
from cosed.distributed.sizing import (ClusterPlan, Node, PoolPlan, free_room, grow_pools, plan_cluster,
                                      rebalance_move, rebalance_window_s)
from cosed.models.profiles import ModelUnavailable

log = logging.getLogger("cosed")
START_GRACE_S = 10.0  # the least time late actors get to join the first of their pools at start
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # before starting again an actor that failed to start


def busy_fractions(stats: list[dict]) -> dict[str, float]:
    """Per pool: busy seconds over alive seconds, summed over its actors' lives."""
    return {kind: round(busy / alive, 3) if alive else 0.0
            for kind, (busy, alive) in pool_totals(stats, "busy", "alive").items()}


def nodes_now() -> list[Node]:
    """The alive nodes with what they offer (the head too; the plan decides what goes where)."""
    return [Node(cpus=n["Resources"].get("CPU", 0.0), gpus=n["Resources"].get("GPU", 0.0),
                 memory=n["Resources"].get("memory", 0.0), node_id=n["NodeID"])
            for n in ray.nodes() if n.get("Alive", True)]


@dataclass
class Actor:
    """One model actor of the run, with the shape it was created with."""

    name: str
    kind: str
    num_gpus: float
    num_cpus: float
    shares: tuple[str, ...]  # the models on its GPU (its memory check)
    handle: Any
    created: float
    state: str = "starting"  # starting | member | draining
    ready: Any = None  # its first `info` while starting: done once its model has loaded
    probe: Any = None  # the `info` call outstanding
    probe_sent: float = 0.0
    unreachable_since: float | None = None
    info: dict | None = None
    drain: Any = None
    drain_since: float = 0.0
    restarting: bool = False  # its last probe found it restarting (reloading its model)
    target: str | None = None  # draining for this pool (a rebalance)
    lent: bool = False  # an SD actor that takes clips now (placement shared, `policies.lend_to_video`)

    @property
    def role(self) -> str:
        """The pool it serves: its own, or the one it was lent to."""
        return serving_pool(self.kind, self.lent)


@dataclass
class Pending:
    """An actor to start again after a failed start, not before ``at``, away from ``avoid`` if possible."""

    kind: str
    num_gpus: float
    shares: tuple[str, ...]
    at: float
    avoid: str | None
    failures: int


@dataclass
class StartFailures:
    count: int = 0
    last: str = ""


class Pools:
    def __init__(self, cfg: RunConfig, costs: CostModel | None = None, expected: TaskWork | None = None,
                 nodes: list[Node] | None = None):
        self.cfg = cfg
        self.costs = costs or CostModel.from_dict({})
        self.expected_work = expected
        self.work = dict(expected.seconds) if expected else {}
        self.drivers_hint = expected.critical_path / expected.total if expected and expected.total else None
        self.run_id = uuid.uuid4().hex[:8]
        self.names = itertools.count()
        self.actors: dict[str, Actor] = {}
        self.pending: list[Pending] = []
        nodes = nodes if nodes is not None else nodes_now()
        self.leads = pool_leads(cfg, self.costs)
        self.cluster_plan: ClusterPlan = plan_cluster(cfg.ray, nodes, self.work, self.costs, self.drivers_hint,
                                                      self.leads)
        self.plan: dict[str, PoolPlan] = self.cluster_plan.pools
        self.failures: dict[str, StartFailures] = {kind: StartFailures() for kind in self.plan}
        self.sized_for = self._cluster_key(nodes)  # nodes that join later, even during start, bring growth
        self.version = 0
        self.latest: dict[str, Sample] = {}  # actor life -> its latest sample (`policies.window_busy`)
        self.lives: dict[str, dict] = {}  # actor life -> its latest info, for the summary
        self.window: dict[str, Sample] = {}
        self.window_at = time.monotonic()
        self.moves: list[dict] = []
        self.hung_kills = 0

    # -- actors ----------------------------------------------------------------------------------------
    def _add(self, kind: str, num_gpus: float | None = None, shares: tuple[str, ...] | None = None,
             avoid: str | None = None) -> str:
        plan = self.plan[kind]
        num_gpus = plan.num_gpus if num_gpus is None else num_gpus
        if shares is None:
            shares = self._shares(kind, num_gpus)
        name = f"cosed-{self.run_id}-{kind}-{next(self.names)}"
        options = dict(name=name, num_gpus=num_gpus, num_cpus=plan.num_cpus, max_restarts=-1, max_task_retries=0)
        if avoid:  # a start failed there (a bad GPU, a full disk): elsewhere when the cluster allows
            options["scheduling_strategy"] = NodeLabelSchedulingStrategy({}, soft={"ray.io/node-id": NotIn(avoid)})
        handle = remote_worker(kind).options(**options).remote(kind, self.cfg, shares)
        self.actors[name] = Actor(name, kind, num_gpus, plan.num_cpus, shares, handle, time.monotonic(),
                                  ready=handle.info.remote())
        return name

    def _shares(self, kind: str, num_gpus: float) -> tuple[str, ...]:
        """The models that may be on an actor's GPU: its own, its partner's when it hosts or is a guest, all
        of them on a plan that shares every GPU."""
        plan = self.plan[kind]
        if num_gpus <= 0:
            return (kind,)
        if plan.partner and (num_gpus < 1 - 1e-6):
            return (kind, plan.partner, *self.lends(kind))
        if all(p.num_gpus < 1 - 1e-6 for p in self.plan.values() if p.replicas):
            return tuple(self.plan)
        return (kind, *self.lends(kind))

    def lends(self, kind: str) -> tuple[str, ...]:
        """The other model an actor of ``kind`` also loads: the video model in SD actors under placement
        shared, so that it can take clips at the end of the run without a load."""
        other = LENDS.get(kind)
        return (other,) if self.cfg.ray.placement == "shared" and other in self.plan else ()

    def _retire(self, actor: Actor) -> None:
        self.actors.pop(actor.name, None)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:
            pass

    def members(self, kind: str) -> list[Actor]:
        return [a for a in self.actors.values() if a.role == kind and a.state == "member"]

    def lend(self, input_done: bool, clips_waiting: int, to_sequence: int) -> bool:
        """Placement shared: the SD actors that are idle now take clips (`policies.lend_to_video`); True when
        some did (the membership changed). Idle means its last probe found no call queued or running."""
        if self.cfg.ray.placement != "shared":
            return False
        sd = self.members("sd")
        idle = [a.name for a in sd if a.info is not None and not a.info["queued"] and LENDS["sd"] in a.shares]
        lent = lend_to_video(idle, len(sd), input_done, clips_waiting, to_sequence)
        for name in lent:
            self.actors[name].lent = True
        if lent:
            self.version += 1
            log.warning("the input is used up: %d idle SD actor(s) take clips now (placement shared)", len(lent))
        return bool(lent)

    def start(self) -> dict[str, dict]:
        """Create every pool and wait until each has a loaded model.

        An actor that fails to start is started again with backoff, elsewhere when
        possible; a pool fails the run only when it gets no member within the start
        timeout, or when every one of ``ray.start_attempts`` starts in a row failed
        (a model that cannot load fails in seconds, not after the timeout). Actors
        the cluster cannot place yet do not hold the run back: once every pool has
        a member and the rest have had as long again as the first took, the run
        starts and they join when placed.
        """
        for kind, plan in self.plan.items():
            for ask in plan.asks():
                self._add(kind, ask)
        began = time.monotonic()
        deadline = began + self.cfg.ray.start_timeout_s
        every_pool_at = None
        while True:
            now = time.monotonic()
            self._start_pending(now)
            starting = {a.ready: a for a in self.actors.values() if a.state == "starting"}
            if every_pool_at is None and all(self.members(k) for k, p in self.plan.items() if p.replicas):
                every_pool_at = now
            until = deadline if every_pool_at is None else min(
                deadline, every_pool_at + max(START_GRACE_S, every_pool_at - began))
            if (not starting and not self.pending) or now >= until:
                break
            wake = min([until] + [p.at for p in self.pending])
            ready, _ = ray.wait(list(starting), num_returns=1, timeout=max(0.05, wake - now)) if starting \
                else (time.sleep(max(0.0, min(1.0, wake - now))) or ([], []))
            for ref in ready:
                self._started(starting[ref], ref, time.monotonic())
            self._give_up_if_hopeless()
        missing = [kind for kind, plan in self.plan.items() if plan.replicas and not self.members(kind)]
        if missing:
            gpus = sum(n.gpus for n in nodes_now())
            details = "; ".join(f"{k}: {self.failures[k].last}" for k in missing if self.failures[k].last)
            raise TimeoutError(
                f"no {' or '.join(missing)} model actor started within {self.cfg.ray.start_timeout_s:.0f} s "
                f"on a cluster of {gpus:g} GPUs; pools asked for "
                + ", ".join(f"{k}: {p.replicas} x ({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for k, p in self.plan.items())
                + (f"; last start errors: {details}" if details else ""))
        late = sum(1 for a in self.actors.values() if a.state == "starting") + len(self.pending)
        if late:
            log.warning("%d of %d model actors are not up yet (the cluster is busy or still growing, or a start "
                        "failed and is tried again); the run starts without them and they join when up",
                        late, sum(p.replicas for p in self.plan.values()))
        self.version += 1
        self.begin()
        return self.describe()

    def _started(self, actor: Actor, ref, now: float) -> bool:
        """Settle an actor's first `info`: a member, or a failed start (tried again with backoff)."""
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:
            reason = _reason(exc)
            failures = self.failures[actor.kind]
            failures.count += 1
            failures.last = reason
            previous = next((p.failures for p in self.pending if p.kind == actor.kind), 0)
            node = getattr(exc, "node_id", None) or (actor.info or {}).get("node_id")
            log.warning("model actor %s failed to start (%s); starting it again", actor.name, reason)
            self._retire(actor)
            self.pending.append(Pending(actor.kind, actor.num_gpus, actor.shares,
                                        now + BACKOFF_S[min(previous, len(BACKOFF_S) - 1)], node, previous + 1))
            return False
        actor.state, actor.ready, actor.info = "member", None, info
        self.failures[actor.kind].count = 0
        self._sampled(info)
        return True

    def _start_pending(self, now: float) -> None:
        for item in [p for p in self.pending if p.at <= now]:
            self.pending.remove(item)
            self._add(item.kind, item.num_gpus, item.shares, avoid=item.avoid)

    def _give_up_if_hopeless(self) -> None:
        attempts = self.cfg.ray.start_attempts
        for kind, plan in self.plan.items():
            failures = self.failures[kind]
            if plan.replicas and not self.members(kind) and failures.count >= max(attempts, plan.replicas):
                raise ModelUnavailable(f"model actors could not start: {failures.last} "
                                       f"({failures.count} {kind} starts in a row failed)")

    # -- membership ----------------------------------------------------------------------------------
    def membership(self) -> Membership:
        members = {kind: {a.name: a.handle for a in self.members(kind)} for kind in self.plan}
        return Membership(self.version, members, self.expected(), self.run_id)

    def handle(self, name: str):
        """The actor called ``name`` while it serves (None once it left or before it loaded)."""
        actor = self.actors.get(name)
        return actor.handle if actor is not None and actor.state != "starting" else None

    def expected(self) -> dict[str, float]:
        """Mean seconds per call in each pool so far (seeds every dispatcher's timeouts)."""
        return {kind: busy / calls for kind, (busy, calls) in pool_totals(self.lives.values(), "busy", "calls").items()
                if calls}

    def call_seconds(self) -> dict[str, float]:
        """Seconds per call of each pool: measured, else modeled (a pool none of whose calls has ended yet
        must not make the rebalancing window short)."""
        modeled = self.expected_work.seconds_per_call() if self.expected_work else {}
        return {**modeled, **self.expected()}

    # -- the periodic check: never waits -------------------------------------------------------------
    def tick(self) -> bool:
        """Read the answers that came, replace what is lost, grow, rebalance. True when the members changed."""
        now = time.monotonic()
        before = self._member_names()
        nodes = nodes_now()
        self._start_pending(now)
        self._collect(now, {n.node_id for n in nodes})
        self._probe(now)
        self._finish_drains(now)
        self._rescue(now)
        self.rescale(nodes)
        if self.cfg.ray.rebalance and not any(a.state == "draining" or a.lent for a in self.actors.values()) and \
                now - self.window_at >= rebalance_window_s(self.cfg.ray.rescale_seconds, self.call_seconds(),
                                                           self.cfg.ray.rebalance_window_calls):
            self._rebalance(now)
        changed = self._member_names() != before
        if changed:
            self.version += 1
        for kind in self.plan:
            telemetry.record("cosed_pool_actors", len(self.members(kind)), pool=kind)
        return changed

    def _member_names(self) -> frozenset:
        return frozenset(a.name for a in self.actors.values() if a.state == "member")

    def _collect(self, now: float, alive_nodes: set[str]) -> None:
        starting = {a.ready: a for a in self.actors.values() if a.state == "starting"}
        if starting:
            done, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
            for ref in done:
                self._started(starting[ref], ref, now)
        probes = {a.probe: a for a in self.actors.values() if a.probe is not None}
        done = ray.wait(list(probes), num_returns=len(probes), timeout=0)[0] if probes else []
        for ref in done:
            actor = probes[ref]
            actor.probe = None
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                actor.restarting = isinstance(exc, ray.exceptions.ActorUnavailableError)
                actor.unreachable_since = actor.unreachable_since or now
                continue
            actor.unreachable_since = None
            actor.restarting = False
            actor.info = info
            self._sampled(info)
            self._check_hung(actor, info)
        ray_cfg = self.cfg.ray
        for actor in [a for a in self.actors.values() if a.state == "member"]:
            if actor.probe is not None and now - actor.probe_sent > ray_cfg.call_timeout_floor_s / 4:
                actor.unreachable_since = actor.unreachable_since or actor.probe_sent
            if actor.unreachable_since is None:
                continue
            # A restarting actor gets time to reload, unless its pool can serve without it or its node is gone
            # (it would only wait to be placed): then it is replaced and the replacement joins when placed.
            if now - actor.unreachable_since > unreachable_limit(
                    actor.restarting, len(self.members(actor.kind)) > 1,
                    (actor.info or {}).get("node_id") not in alive_nodes, ray_cfg.call_timeout_floor_s,
                    ray_cfg.start_timeout_s):
                log.warning("model actor %s unreachable for %.0f s; replacing it in the %s pool",
                            actor.name, now - actor.unreachable_since, actor.kind)
                self._retire(actor)
                self._add(actor.kind, actor.num_gpus, actor.shares)
        for actor in [a for a in self.actors.values() if a.state == "starting"]:
            if now - actor.created > ray_cfg.start_timeout_s:  # never placed, or stuck loading: a fresh try
                self._retire(actor)
                self._add(actor.kind, actor.num_gpus, actor.shares)

    def _probe(self, now: float) -> None:
        for actor in self.actors.values():
            if actor.state != "starting" and actor.probe is None:
                actor.probe = actor.handle.info.remote()
                actor.probe_sent = now

    def _sampled(self, info: dict) -> None:
        life = f"{info['name']}#{info['life']}"
        self.latest[life] = Sample(info["kind"], info["busy"], info["alive"])
        self.lives[life] = info

    def _check_hung(self, actor: Actor, info: dict) -> None:
        ray_cfg = self.cfg.ray
        expected = max(self.expected().get(kind, 0.0) for kind in (actor.kind, actor.role))  # a lent one's clips
        stall = call_timeout(ray_cfg.call_timeout_floor_s, ray_cfg.call_timeout_factor, expected)
        if hung(info["running_for"], ray_cfg.call_timeout_floor_s, ray_cfg.call_timeout_factor, expected):
            log.warning("model actor %s has run one call for %.0f s (limit %.0f s); restarting it",
                        actor.name, info["running_for"], stall)
            self.hung_kills += 1
            ray.kill(actor.handle, no_restart=False)

    # -- growth ----------------------------------------------------------------------------------------
    @staticmethod
    def _cluster_key(nodes: list[Node]) -> tuple:
        return tuple(sorted((n.node_id, n.gpus, n.cpus) for n in nodes))

    def current_pools(self) -> dict[str, PoolPlan]:
        """The pools as they are (every actor that is not leaving, with its shape)."""
        pools = {}
        for kind, plan in self.plan.items():
            mine = [a for a in self.actors.values() if a.kind == kind and a.state != "draining"]
            mine += [Actor("", kind, p.num_gpus, plan.num_cpus, p.shares, None, 0.0) for p in self.pending
                     if p.kind == kind]
            hosts = [a for a in mine if plan.partner and 0 < a.num_gpus < plan.num_gpus - 1e-6]
            pools[kind] = dataclasses.replace(plan, replicas=len(mine), hosts=len(hosts),
                                              host_gpus=hosts[0].num_gpus if hosts else plan.host_gpus)
        return pools

    def _rescue(self, now: float) -> None:
        """A pool with no member whose new actor has not come up in a call timeout (its node left and the
        cluster has no room for it) takes a GPU from the pool with the most actors, so the run can go on."""
        for kind, plan in self.plan.items():
            waiting = [a for a in self.actors.values() if a.kind == kind and a.state == "starting"]
            if not needs_rescue(plan.replicas, len(self.members(kind)),
                                now - min(a.created for a in waiting) if waiting else None,
                                any(a.state == "draining" for a in self.actors.values()),
                                self.cfg.ray.call_timeout_floor_s):
                continue
            donor = rescue_donor(kind, {k: len(self.members(k)) for k in self.plan},
                                 {k: len([a for a in self.members(k) if a.num_gpus >= 1]) for k in self.plan})
            if donor is None:
                continue
            actor = min((a for a in self.members(donor) if a.num_gpus >= 1),
                        key=lambda a: (a.info or {}).get("busy", 0.0))
            log.warning("the %s pool has had no member for %.0f s and the cluster has no room for one: giving it "
                        "the GPU of %s (%s pool)", kind, now - min(a.created for a in waiting), actor.name, donor)
            for late in waiting:  # started again below, where the donor's GPU is now free
                self._retire(late)
            self._retire(actor)
            if plan.partner and plan.num_gpus < 0.5:  # a guest: the donor pool keeps a host actor on that GPU
                self._add(donor, self.plan[donor].host_gpus or actor.num_gpus - plan.num_gpus, (donor, kind))
            self._add(kind, waiting[0].num_gpus, waiting[0].shares)
            self.moves.append({"from": donor, "to": kind, "actor": actor.name, "reason": "no member"})

    def rescale(self, nodes: list[Node] | None = None) -> bool:
        """When nodes join, the actors that place on the room they bring, for the pools that need them most."""
        nodes = nodes if nodes is not None else nodes_now()
        key = self._cluster_key(nodes)
        if key == self.sized_for:
            return False
        self.sized_for = key
        pools = self.current_pools()
        room = free_room(pools, nodes)
        available = ray.available_resources()  # other jobs may hold some of it
        spare = math.floor(available.get("GPU", 0.0) + 1e-6)
        if sum(n.gpus for n in room) > spare:
            room = _trim(room, spare)
        fixed = {kind for kind in self.plan if getattr(self.cfg.ray, kind).replicas != "auto"}
        added = grow_pools(pools, room, self.measured_work(), fixed)
        if not any(added.values()):
            return False
        guests = {kind: plan.partner for kind, plan in self.plan.items() if plan.partner and plan.num_gpus < 0.5}
        hosts = {host: added.get(guest, 0) for guest, host in guests.items()}
        for kind, count in added.items():
            if kind in guests:  # a guest comes with a new host of its partner pool, on one new GPU
                for _ in range(count):
                    self._add(guests[kind], self.plan[guests[kind]].host_gpus, (guests[kind], kind))
                    self._add(kind)
            else:
                for _ in range(count - hosts.get(kind, 0)):
                    self._add(kind)
        log.warning("the cluster grew to %g GPUs: adding %s", sum(n.gpus for n in nodes),
                    ", ".join(f"{n} {kind}" for kind, n in added.items() if n))
        return True

    def measured_work(self) -> dict[str, float]:
        """Expected GPU-seconds per pool, each scaled by measured over modeled seconds per call."""
        if self.expected_work is None:
            return dict(self.work)
        factors = measured_factors(self.expected_work, pool_totals(self.lives.values(), "busy", "calls"))
        return {kind: seconds * factors.get(kind, 1.0) for kind, seconds in self.work.items()}

    # -- rebalancing -------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The first task starts now: rebalancing windows count from here, not from the actors' start-up
        (a window that began while no task ran reads as an idle pool, and would move an actor it needs)."""
        self.busy()

    def busy(self) -> dict[str, float]:
        """Busy fraction per pool since the window began (every actor life counted for its time in the
        window, `policies.window_busy`); starts a new window."""
        out = window_busy(self.window, self.latest)
        self.window = dict(self.latest)
        self.window_at = time.monotonic()
        return {kind: out.get(kind, 0.0) for kind in self.plan}

    def _rebalance(self, now: float) -> None:
        busy = self.busy()
        movable = {kind: value for kind, value in busy.items() if getattr(self.cfg.ray, kind).replicas == "auto"}
        move = rebalance_move(movable, ClusterPlan(pools=self.current_pools(), drivers=0, reason=""),
                              high=self.cfg.ray.busy_above, low=self.cfg.ray.idle_below,
                              margin=self.cfg.ray.rebalance_margin)
        if move is None:
            return
        donor, target = move
        whole = [a for a in self.members(donor) if a.num_gpus >= 1 - 1e-6]
        if not whole:
            return
        actor = min(whole, key=lambda a: (a.info or {}).get("busy", 0.0))
        actor.state, actor.target, actor.drain, actor.drain_since = "draining", target, actor.handle.drain.remote(), now
        self.moves.append({"from": donor, "to": target, "actor": actor.name,
                           "busy": {k: round(v, 3) for k, v in busy.items()}})
        log.warning("rebalancing: draining %s (%s busy %.0f%%) for the %s pool (busy %.0f%%)",
                    actor.name, donor, 100 * busy[donor], target, 100 * busy[target])

    def _finish_drains(self, now: float) -> None:
        """Kill drained actors once drivers have seen them leave; start their replacements."""
        grace = 4.0  # membership is pushed to drivers at once; their calls in flight end first
        for actor in [a for a in self.actors.values() if a.state == "draining"]:
            done, _ = ray.wait([actor.drain], timeout=0)
            if not done or now - actor.drain_since < grace:
                continue
            self._retire(actor)
            target = self.plan[actor.target]
            if target.partner and target.num_gpus < 0.5:  # a guest: the donor pool keeps a host actor
                self._add(actor.kind, self.plan[actor.kind].host_gpus or actor.num_gpus - target.num_gpus,
                          (actor.kind, actor.target))
            replacement = self._add(actor.target)
            next(m for m in reversed(self.moves) if m["actor"] == actor.name)["replacement"] = replacement
            self.busy()  # restart the busy window

    # -- reporting -----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, dict]:
        return {kind: {"replicas": len(self.members(kind)), "num_gpus": plan.num_gpus,
                       "gpus": round(sum(a.num_gpus for a in self.members(kind)), 4),
                       **({"lent": sum(1 for a in self.members(kind) if a.lent)} if kind in LENDS.values() else {})}
                for kind, plan in self.plan.items()}

    def stats(self, refresh_s: float = 5.0) -> list[dict]:
        """Latest info of every actor life that served in this run (retired and restarted ones too); the
        serving ones are asked once more (at the end of a run, waiting up to ``refresh_s``)."""
        serving = [a for a in self.actors.values() if a.state != "starting"]
        refs = [a.handle.info.remote() for a in serving]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=refresh_s) if refs else ([], [])
        for ref in ready:
            try:
                self._sampled(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        return list(self.lives.values())

    def shutdown(self) -> None:
        for actor in list(self.actors.values()):
            self._retire(actor)


def _trim(room: list[Node], whole: int) -> list[Node]:
    """At most ``whole`` free GPUs in all (Ray reports less free than our actors leave: other jobs hold some)."""
    out = []
    for node in room:
        take = min(node.gpus, whole)
        whole -= take
        out.append(dataclasses.replace(node, gpus=take))
    return out


def _reason(exc: BaseException) -> str:
    """The root cause of a failed actor start, in one line."""
    cause = exc
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause)
    for marker in ("ModelUnavailable: ", "InsufficientGPUMemory: ", "RuntimeError: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return " ".join(text.split())[:500] or type(cause).__name__


@dataclass
class AutoscaleRequest:
    """What this job asks an autoscaling cluster for; cleared when the job ends, however it ends."""

    gpus: int = 0
    asked: list[int] = field(default_factory=list)

    def ask(self, gpus: int) -> None:
        if gpus == self.gpus:
            return
        self.gpus = gpus
        self._send([{"GPU": 1.0}] * gpus)

    def clear(self) -> None:
        if self.gpus:
            self.gpus = 0
            self._send([])

    def _send(self, bundles: list[dict]) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
            self.asked.append(len(bundles))
        except Exception as exc:  # a cluster without an autoscaler
            log.info("autoscaler request skipped: %s", exc)
