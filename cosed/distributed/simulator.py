"""The Ray runtime's policies in virtual time: a discrete-event simulator of one run.

What is simulated is what runs: the pool plan (`sizing.plan_cluster`), task order
(`costs.flow_order`), admission (`policies.admission`), the job's state machine
(`core.JobCore`, the same class the Ray shell drives), dispatch (`policies.
sample_candidates` and `choose_actor`, two choices per call), growth
(`sizing.free_room`, `grow_pools`) and rebalancing (`policies.window_busy`,
`sizing.rebalance_move`). Only the actors and the network are models: each actor
serves its calls one after another for the modeled GPU-seconds of each call
(`costs.CostModel`), plus a fixed per-call overhead; drivers make the calls the
engine makes, step by step (`costs.candidate_counts`, `generate.batches`).

`cosed plan` runs it for capacity planning; `ray_jobs/bench_cluster.py` sets its
prediction beside the measured makespan.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from cosed.calls import ClipDone, ClipRequest
from cosed.config import RunConfig
from cosed.distributed.core import (CancelClip, CancelWriter, CorePolicy, JobCore, RecordFailure, ReplaceDriver,
                                    Retrying, SendCaptions, SendClip, Sequenced, StartTask, StartWriter, Stop)
from cosed.distributed.costs import CAPTION, CostModel, batch_work, candidate_counts, flow_order, full_batch_seconds
from cosed.distributed.policies import Sample, admission, choose_actor, sample_candidates, window_busy
from cosed.distributed.sizing import (ClusterPlan, Node, PoolPlan, free_room, grow_pools, place, plan_cluster,
                                      rebalance_move, rebalance_window_s)
from cosed.generate import batches
from cosed.tasks import Task


@dataclass(frozen=True)
class Cluster:
    """The simulated cluster: GPU nodes now, and nodes that join later (time in seconds, GPUs)."""

    gpus: int
    gpus_per_node: int = 8
    cpus_per_node: float = 96.0
    joins: tuple[tuple[float, int], ...] = ()

    def nodes(self, gpus: int, prefix: str = "n") -> list[Node]:
        whole, rest = divmod(gpus, self.gpus_per_node)
        sizes = [self.gpus_per_node] * whole + ([rest] if rest else [])
        return [Node(cpus=self.cpus_per_node, gpus=float(g), node_id=f"{prefix}{i}") for i, g in enumerate(sizes)]


@dataclass(frozen=True)
class Overheads:
    """What the models do not cover, in the same (modeled) seconds as the costs."""

    call_s: float = 0.002  # per model call: dispatch round trips, argument transfer
    actor_start_s: float = 30.0  # a new actor (growth, rebalancing) loads its model
    writer_s: float = 1.0  # a writer assembles a task from storage


@dataclass
class SimActor:
    name: str
    kind: str
    num_gpus: float
    up_at: float  # loaded and serving from then on
    free_at: float = 0.0
    queued: int = 0  # calls waiting or running (what a queue probe answers)
    busy: float = 0.0
    calls: int = 0
    state: str = "member"  # member | draining | retired
    retired_at: float | None = None

    def sample(self, now: float) -> Sample:
        end = self.retired_at if self.retired_at is not None else now
        return Sample(self.kind, self.busy, max(0.0, end - self.up_at))


@dataclass
class SimResult:
    gpus: int
    tasks: int
    failed: int
    makespan_s: float
    bound_s: float
    efficiency: float
    gpu_hours: float
    tasks_per_gpu_hour: float
    mean_latency_s: float
    busy: dict[str, float]
    bottleneck: str
    plan: dict
    drivers: int
    dispatch_messages_per_call: float
    core_events: int
    core_us_per_event: float
    moves: list[dict] = field(default_factory=list)
    grown: dict[str, int] = field(default_factory=dict)
    unplaced_actors: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class Simulation:
    """One run in virtual time (see the module docstring)."""

    def __init__(self, step_counts: list[int], cfg: RunConfig, costs: CostModel, cluster: Cluster,
                 overheads: Overheads = Overheads(), seed: int = 0):
        self.cfg, self.costs, self.cluster, self.overheads = cfg, costs, cluster, overheads
        self.rng = random.Random(seed)
        self.now = 0.0
        self.heap: list = []
        self.seq = itertools.count()
        self.tasks = [Task(id=f"t{i:06d}", title="", steps=tuple("s" for _ in range(n)))
                      for i, n in enumerate(step_counts)]
        self.work = batch_work(step_counts, cfg, costs)
        self.nodes = cluster.nodes(cluster.gpus)
        hint = self.work.critical_path / self.work.total if self.work.total else None
        self.plan = plan_cluster(cfg.ray, self.nodes, self.work.seconds, costs, hint)
        self.kinds = tuple(self.plan.pools)
        self.actors: dict[str, SimActor] = {}
        self.names = itertools.count()
        for kind, plan in self.plan.pools.items():
            for ask in plan.asks():
                self._add(kind, ask, up_at=0.0)
        drivers = max(1, min(self.plan.drivers, len(self.tasks)))
        order = flow_order(self.tasks, cfg, costs, self.plan.capacity())
        captions = (lambda t: None) if cfg.rewriter == "lm" else (lambda t: ["c"] * len(t.steps))
        self.core = JobCore([(t, t.id, captions(t)) for t in order], drivers,
                            admission(drivers, None, max(1, len(self.nodes))),
                            CorePolicy(task_retries=cfg.ray.task_retries, sequence_deadline_s=math.inf,
                                       write_deadline_s=math.inf,
                                       timeout_floor_s=math.inf, clip_seconds=costs.seconds("animate")),
                            seed=seed)
        self.counts = {n: candidate_counts(n, cfg.pool) for n in set(step_counts)}
        self.messages = {"calls": 0, "messages": 0}
        self.core_seconds = 0.0
        self.started: dict[str, float] = {}
        self.latency: list[float] = []
        self.calls: dict[int, tuple[str, ClipRequest]] = {}
        self.moves: list[dict] = []
        self.grown = dict.fromkeys(self.kinds, 0)
        self.unplaced = 0
        self.window: dict[str, Sample] = {}
        self.window_at = 0.0
        self.end = 0.0

    # -- the event loop ------------------------------------------------------------------------------
    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (when, next(self.seq), action))

    def run(self) -> SimResult:
        self._members_changed()
        self._core(lambda: self.core.start(self.now))
        tick = self.cfg.ray.rescale_seconds
        self.at(tick, self._tick)
        for when, gpus in self.cluster.joins:
            self.at(when, lambda gpus=gpus: self._join(gpus))
        while self.heap and not self.core.finished:
            self.now, _, action = heapq.heappop(self.heap)
            action()
        return self._result()

    def _core(self, call: Callable[[], list]) -> None:
        started = time.perf_counter()
        actions = call()
        self.core_seconds += time.perf_counter() - started
        for action in actions:
            self._act(action)

    def _act(self, action) -> None:
        if isinstance(action, StartTask):
            self.started.setdefault(action.task.id, self.now)
            self._sequence(action)
        elif isinstance(action, SendClip):
            actor = self.actors.get(action.actor)
            self.calls[action.call] = (action.actor, action.request)
            self._serve(actor, self.costs.seconds("animate"),
                        lambda call=action.call: self._core(lambda: self.core.on_clip_result(
                            call, ClipDone(self.calls.pop(call)[1].clip, 0, 0), None, "", self.now)))
        elif isinstance(action, StartWriter):
            self.at(self.now + self.overheads.writer_s, lambda key=action.key: self._written(key))
        elif isinstance(action, SendCaptions):
            self._serve(self.actors[action.actor], self.costs.seconds("caption", len(action.pairs)),
                        lambda a=action: self._core(lambda: self.core.on_captions(
                            a.batch, ["c"] * len(a.pairs), None, "", self.now)))
        elif isinstance(action, (CancelClip, CancelWriter, ReplaceDriver, Retrying, RecordFailure, Stop)):
            pass  # nothing fails in the simulation: these do not arise

    def _written(self, key) -> None:
        self.latency.append(self.now - self.started[key[0]])
        self.end = self.now
        self._core(lambda: self.core.on_writer_result(key, None, "", self.now))

    # -- actors -----------------------------------------------------------------------------------------
    def _add(self, kind: str, num_gpus: float, up_at: float) -> SimActor:
        actor = SimActor(f"{kind}-{next(self.names)}", kind, num_gpus, up_at=up_at, free_at=up_at)
        self.actors[actor.name] = actor
        return actor

    def _members(self, kind: str) -> list[str]:
        return [a.name for a in self.actors.values() if a.kind == kind and a.state == "member" and a.up_at <= self.now]

    def _members_changed(self) -> None:
        """Members as the pools publish them: loaded, not leaving; the job's own pool goes to the core."""
        members = {kind: self._members(kind) for kind in self.kinds}
        before = getattr(self, "members", {})
        self.members = members
        for kind in ("video", CAPTION):
            if kind in members and members[kind] != before.get(kind):
                self._core(lambda kind=kind: self.core.on_members(kind, members[kind], self.now))

    def _serve(self, actor: SimActor, seconds: float, then: Callable[[], None]) -> None:
        """FIFO on the actor: the call starts when the actor is free, plus the per-call overhead."""
        start = max(self.now + self.overheads.call_s, actor.free_at)
        actor.free_at = start + seconds
        actor.queued += 1

        def done() -> None:
            actor.queued -= 1
            actor.busy += seconds
            actor.calls += 1
            if actor.state == "draining" and not actor.queued:
                self._retire(actor)
            then()

        self.at(actor.free_at, done)

    def _dispatch(self, kind: str, seconds: float, then: Callable[[], None]) -> None:
        """A driver's call: two members drawn, the shorter queue takes it (`policies`), as on Ray."""
        members = self.members[kind]
        candidates = sample_candidates(members, lambda _: False, self.rng)
        self.messages["calls"] += 1
        self.messages["messages"] += 1 + (len(candidates) if len(candidates) > 1 else 0)  # claim + probes
        queued = {name: self.actors[name].queued for name in candidates}
        self._serve(self.actors[choose_actor(candidates, queued)], seconds, then)

    # -- a driver's task, call by call (`engine.sequence_task`) -------------------------------------------------
    def _sequence(self, start: StartTask) -> None:
        task, counts = start.task, self.counts[len(start.task.steps)]
        steps = len(task.steps)

        def step(number: int) -> None:
            if number > steps:
                self._dispatch("clip", self.costs.seconds("embed_texts", steps), lambda: self._core(
                    lambda: self.core.on_driver_events(start.driver, [(start.key, Sequenced(steps))], self.now)))
                return
            count = counts[number - 1]
            parts = batches(count, self.cfg.sd.batch_size)
            left = {"n": len(parts)}

            def rendered() -> None:
                left["n"] -= 1
                if left["n"]:
                    return
                self._dispatch("clip", self.costs.seconds("embed_images", count), scored if number == 1 else select)

            def select() -> None:
                self._dispatch("clip", self.costs.seconds("selector_scores", count), scored)

            def scored() -> None:
                request = ClipRequest(task.id, number, "", 0, self.cfg.video, "", f"{task.id}/{number}")
                self._core(lambda: self.core.on_driver_events(start.driver, [(start.key, request)], self.now))
                step(number + 1)

            for rows in parts:
                self._dispatch("sd", self.costs.seconds("render", len(rows)), rendered)

        self._dispatch("clip", self.costs.seconds("embed_texts", steps), lambda: step(1))

    # -- the pools' periodic check: growth and rebalancing ----------------------------------------------
    def _tick(self) -> None:
        if self.core.finished:
            return
        self._members_changed()
        self._core(lambda: self.core.on_tick(self.now))
        calls = {k: self.work.seconds_per_call().get(k, 0.0) for k in self.kinds}
        if self.cfg.ray.rebalance and self.now - self.window_at >= rebalance_window_s(
                self.cfg.ray.rescale_seconds, calls, self.cfg.ray.rebalance_window_calls) and \
                not any(a.state == "draining" for a in self.actors.values()):
            self._rebalance()
        self.at(self.now + self.cfg.ray.rescale_seconds, self._tick)

    def _current(self) -> dict[str, PoolPlan]:
        pools = {}
        for kind, plan in self.plan.pools.items():
            mine = [a for a in self.actors.values() if a.kind == kind and a.state != "retired"
                    and a.state != "draining"]
            hosts = [a for a in mine if plan.partner and 0 < a.num_gpus < plan.num_gpus - 1e-6]
            pools[kind] = replace(plan, replicas=len(mine), hosts=len(hosts))
        return pools

    def _latest(self) -> dict[str, Sample]:
        return {name: actor.sample(self.now) for name, actor in self.actors.items() if actor.up_at <= self.now}

    def _rebalance(self) -> None:
        latest = self._latest()
        busy = window_busy(self.window, latest)
        self.window, self.window_at = latest, self.now
        busy = {kind: busy.get(kind, 0.0) for kind in self.kinds}
        ray_cfg = self.cfg.ray
        move = rebalance_move(busy, ClusterPlan(pools=self._current(), drivers=0, reason=""),
                              high=ray_cfg.busy_above, low=ray_cfg.idle_below, margin=ray_cfg.rebalance_margin)
        if move is None:
            return
        donor, target = move
        whole = [a for a in self.actors.values() if a.kind == donor and a.state == "member" and a.num_gpus >= 1]
        if not whole:
            return
        actor = min(whole, key=lambda a: a.busy)
        actor.state = "draining"
        self._members_changed()
        if not actor.queued:
            self._retire(actor)
        up = self.now + self.overheads.actor_start_s
        plan = self.plan.pools[target]
        if plan.partner and plan.num_gpus < 0.5:
            self._add(donor, self.plan.pools[donor].host_gpus, up)
        self._add(target, plan.num_gpus, up)
        self.at(up, self._members_changed)
        self.moves.append({"at": round(self.now, 1), "from": donor, "to": target,
                           "busy": {k: round(v, 3) for k, v in busy.items()}})

    def _retire(self, actor: SimActor) -> None:
        actor.state, actor.retired_at = "retired", self.now

    def _join(self, gpus: int) -> None:
        """Nodes join: the actors that place on the room they bring (`sizing.free_room`, `grow_pools`)."""
        self.nodes = self.nodes + self.cluster.nodes(gpus, prefix=f"j{len(self.nodes)}-")
        pools = self._current()
        added = grow_pools(pools, free_room(pools, self.nodes), self._measured_work())
        up = self.now + self.overheads.actor_start_s
        guests = {k: p.partner for k, p in self.plan.pools.items() if p.partner and p.num_gpus < 0.5}
        hosts = {guests[g]: n for g, n in added.items() if g in guests}
        for kind, count in added.items():
            self.grown[kind] += count
            plan = self.plan.pools[kind]
            for _ in range(count - hosts.get(kind, 0)):
                self._add(kind, plan.num_gpus, up)
            for _ in range(hosts.get(kind, 0)):
                self._add(kind, plan.host_gpus, up)
        if place(self._current(), self.nodes) is None:
            self.unplaced += sum(added.values())
        self.at(up, self._members_changed)

    def _measured_work(self) -> dict[str, float]:
        return dict(self.work.seconds)

    # -- the result ----------------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        gpus = sum(n.gpus for n in self.nodes)
        makespan = self.end
        bound = full_batch_seconds(self.work, self.cfg, self.costs) / gpus if gpus else math.inf
        busy: dict[str, float] = {}
        for kind in self.kinds:
            lives = [a.sample(makespan) for a in self.actors.values() if a.kind == kind]
            alive = sum(s.alive for s in lives)
            busy[kind] = round(sum(s.busy for s in lives) / alive, 3) if alive else 0.0
        done = self.core.counts["done"]
        return SimResult(
            gpus=int(gpus), tasks=done, failed=self.core.counts["failed"], makespan_s=round(makespan, 1),
            bound_s=round(bound, 1), efficiency=round(bound / makespan, 4) if makespan else 0.0,
            gpu_hours=round(gpus * makespan / 3600, 2),
            tasks_per_gpu_hour=round(done / (gpus * makespan / 3600), 3) if makespan else 0.0,
            mean_latency_s=round(sum(self.latency) / len(self.latency), 1) if self.latency else 0.0,
            busy=busy, bottleneck=max(busy, key=busy.get), plan=self.plan.to_dict(), drivers=self.core.admission.drivers,
            dispatch_messages_per_call=round(self.messages["messages"] / max(1, self.messages["calls"]), 3),
            core_events=self.core.events, core_us_per_event=round(1e6 * self.core_seconds / max(1, self.core.events), 2),
            moves=self.moves, grown={k: v for k, v in self.grown.items() if v}, unplaced_actors=self.unplaced)


def simulate(step_counts: list[int], cfg: RunConfig, costs: CostModel, cluster: Cluster,
             overheads: Overheads = Overheads(), seed: int = 0) -> SimResult:
    """Simulate one run of tasks with these step counts on ``cluster`` (see `Simulation`)."""
    return Simulation(step_counts, cfg, costs, cluster, overheads, seed).run()

