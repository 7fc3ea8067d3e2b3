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

With a preemption rate (`preemptions.PreemptionModel`) nodes are lost at random
(seeded) and the same failure rules the runtime uses handle what ran there:
their calls fail and are sent elsewhere (`JobCore` for clip and caption calls,
`policies.give_up` and `retry_backoff` for the drivers' calls), the tasks whose
drivers were there are retried, and a replacement node brings the lost actors
back after a delay. `LostWork` counts what that cost.

`cosed plan` runs it for capacity planning; `ray_jobs/bench_cluster.py` sets its
prediction beside the measured makespan.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from cosed.calls import ClipDone, ClipRequest
from cosed.config import RunConfig
from cosed.distributed.core import (CancelClip, CancelWriter, ClipFound, CorePolicy, JobCore, RecordFailure,
                                    ReplaceDriver, Retrying, SendCaptions, SendClip, Sequenced, StartTask, StartWriter,
                                    Stop)
from cosed.distributed.costs import (CAPTION, PLAN_SAMPLE, CostModel, batch_work, candidate_counts,
                                    estimated_work, flow_order, full_batch_seconds, pool_leads)
from cosed.distributed.policies import (LENDS, Sample, admission, choose_actor, host_node, lend_to_video,
                                       sample_candidates, serving_pool, window_busy)
from cosed.distributed.preemptions import LostWork, NodeLoss, PreemptionModel
from cosed.distributed.sizing import (ClusterPlan, Node, PoolPlan, free_room, grow_pools, place, plan_cluster,
                                      rebalance_move, rebalance_window_s)
from cosed.distributed.window import Window, task_window
from cosed.generate import batches
from cosed.tasks import Task
from cosed.transitions import clips_ready


@dataclass(frozen=True)
class Cluster:
    """The simulated cluster: GPU nodes now, and nodes that join later (time in seconds, GPUs)."""

    gpus: int
    gpus_per_node: int = 8
    cpus_per_node: float = 96.0
    joins: tuple[tuple[float, int], ...] = ()
    preemptions: PreemptionModel = PreemptionModel()

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
    node: str = ""
    lost: bool = False  # retired because its node was preempted
    lent: bool = False  # an SD actor that takes clips (placement shared, `policies.lend_to_video`)
    inflight: dict = field(default_factory=dict)  # call token -> (start, seconds, what to do if the node goes)

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
    preemption: dict = field(default_factory=dict)  # `LostWork.to_dict` (runs with a preemption rate)
    lent: dict = field(default_factory=dict)  # placement shared: SD actors that took clips, and from when

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


MORA_POLL_S = 0.2  # how often a mora driver looks for the previous clip (`RayBackend.animate`): half, on average
HORIZON_S = 365 * 86400.0  # a run that has not ended in a year of virtual time never will (a pool lost for good)


class Simulation(NodeLoss):
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
        self.work = batch_work(step_counts, cfg, costs)  # exact: the bound the result is measured against
        planned = estimated_work(step_counts[:PLAN_SAMPLE], len(step_counts), cfg, costs)  # as the runtime plans
        self.nodes = cluster.nodes(cluster.gpus)
        hint = planned.critical_path / planned.total if planned.total else None
        self.plan = plan_cluster(cfg.ray, self.nodes, planned.seconds, costs, hint, pool_leads(cfg, costs))
        self.kinds = tuple(self.plan.pools)
        self.actors: dict[str, SimActor] = {}
        self.names = itertools.count()
        self.free = {n.node_id: n.gpus for n in self.nodes}  # GPUs not taken by an actor, per live node
        asks = [(kind, ask) for kind, plan in self.plan.pools.items() for ask in plan.asks()]
        room = [(-n.gpus, i, n.node_id) for i, n in enumerate(self.nodes)]  # the node with most room first
        heapq.heapify(room)
        homes = {}
        for i in sorted(range(len(asks)), key=lambda i: -asks[i][1]):
            free, order, homes[i] = heapq.heappop(room) if room else (0.0, 0, "")
            if homes[i]:
                heapq.heappush(room, (free + asks[i][1], order, homes[i]))
        for i, (kind, ask) in enumerate(asks):  # placed largest first (as Ray could), named in plan order
            self._add(kind, ask, up_at=0.0, node=homes[i])
        drivers = max(1, min(self.plan.drivers, len(self.tasks)))
        captions = (lambda t: None) if cfg.rewriter == "lm" else (lambda t: ["c"] * len(t.steps))
        self.core = JobCore([], drivers,
                            admission(drivers, None, max(1, len(self.nodes))),
                            CorePolicy(task_retries=cfg.ray.task_retries, sequence_deadline_s=math.inf,
                                       write_deadline_s=math.inf, call_attempts=cfg.ray.call_attempts,
                                       call_patience_s=cfg.ray.call_timeout_floor_s,
                                       timeout_floor_s=math.inf, clip_seconds=costs.seconds("animate")),
                            seed=seed, more=True)
        pending = iter(self.tasks)  # fed through the runtime's window, in its per-chunk order
        self.tasks_in = Window(self.core, lambda n: [(t, t.id) for t in itertools.islice(pending, n)],
                             lambda chunk: flow_order(chunk, cfg, costs, self.plan.capacity()), captions,
                             task_window(self.core.admission))
        self.tasks_in.refill()
        self.faults = random.Random(seed * 7919 + 104729)
        self.lost = LostWork()
        self.gone: dict[str, tuple[float, float]] = {}  # lost node -> (when, GPUs), until replaced
        self.nominal_gpus = float(cluster.gpus)
        ids = [n.node_id for n in self.nodes]  # drivers spread evenly (`_driver_home` moves a lost one)
        self.driver_node: dict[int, str | None] = {d: ids[d % len(ids)] if ids else None for d in range(drivers)}
        self.driver_gen = dict.fromkeys(range(drivers), 0)  # bumped when a slot's attempt is given up
        self.driving: dict[int, tuple[str, int]] = {}  # slot -> the attempt it sequences
        self.attempt_work: dict[int, list[tuple[str, float]]] = {}  # slot -> (pool, GPU-s) of its calls done
        self.clip_sends = 0
        self.clips_done: dict[str, int] = {}  # clip URI -> calls that made it
        self.clip_waiters: dict[str, list[Callable[[], None]]] = {}  # clip URI -> drivers waiting for it (mora)
        self.wakes: set[float] = set()
        self.pending: list[tuple[str, float, float]] = []  # actors lost with their node, not placed: (pool, GPUs, since)
        self.counts = {n: candidate_counts(n, cfg.pool) for n in set(step_counts)}
        self.messages = {"calls": 0, "messages": 0}
        self.core_seconds = 0.0
        self.started: dict[str, float] = {}
        self.latency: list[float] = []
        self.calls: dict[int, tuple[str, ClipRequest]] = {}
        self.moves: list[dict] = []
        self.lent_at: dict = {}
        self.grown = dict.fromkeys(self.kinds, 0)
        self.unplaced = 0
        self.window: dict[str, Sample] = {}
        self.window_at = 0.0
        self.end = 0.0

    # -- the event loop ------------------------------------------------------------------------------
    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (when, next(self.seq), action))

    def run(self) -> SimResult:
        quiet, level = logging.getLogger("cosed"), logging.getLogger("cosed").level
        quiet.setLevel(logging.ERROR)  # the core's warnings (a clip sent elsewhere) are the runtime's log lines
        try:
            return self._run()
        finally:
            quiet.setLevel(level)

    def _run(self) -> SimResult:
        self._members_changed()
        self._core(lambda: self.core.start(self.now))
        tick = self.cfg.ray.rescale_seconds
        self.at(tick, self._tick)
        for when, gpus in self.cluster.joins:
            self.at(when, lambda gpus=gpus: self._join(gpus))
        self._next_loss()
        while self.heap and not self.core.finished and self.now < HORIZON_S:
            self.now, _, action = heapq.heappop(self.heap)
            action()
        return self._result()

    def _core(self, call: Callable[[], list]) -> None:
        started = time.perf_counter()
        actions = call()
        if self.tasks_in.refill():  # as the runtime tops its window up after each event
            actions += self.core.on_tick(self.now)
        self.core_seconds += time.perf_counter() - started
        for action in actions:
            self._act(action)
        wake = self.core.next_timer()  # the core's own timers (a resend's backoff) run when due
        if wake is not None and math.isfinite(wake) and wake not in self.wakes:
            self.wakes.add(wake)
            self.at(max(wake, self.now), lambda: self._core(lambda: self.core.on_tick(self.now)))

    def _act(self, action) -> None:
        if isinstance(action, StartTask):
            self.started.setdefault(action.task.id, self.now)
            self.driving[action.driver] = action.key
            self.attempt_work[action.driver] = []
            self._sequence(action)
        elif isinstance(action, SendClip):
            actor = self.actors.get(action.actor)
            self.calls[action.call] = (action.actor, action.request)
            self.clip_sends += 1
            self._serve(actor, self.costs.seconds("animate"),
                        lambda call=action.call: self._clip_made(call),
                        lambda call=action.call: self._core(lambda: self.core.on_clip_result(
                            call, None, "retry", "node preempted", self.now)))
        elif isinstance(action, StartWriter):
            self.at(self.now + self.overheads.writer_s, lambda key=action.key: self._written(key))
        elif isinstance(action, SendCaptions):
            self._serve(self.actors[action.actor], self.costs.seconds("caption", len(action.pairs)),
                        lambda a=action: self._core(lambda: self.core.on_captions(
                            a.batch, ["c"] * len(a.pairs), None, "", self.now)),
                        lambda a=action: self._core(lambda: self.core.on_captions(
                            a.batch, None, "retry", "node preempted", self.now)))
        elif isinstance(action, ReplaceDriver):
            self.driver_gen[action.driver] += 1  # what the old driver still had in flight is dropped
            self.driving.pop(action.driver, None)
            self.driver_node[action.driver] = self._driver_home(action.driver)
        elif isinstance(action, (CancelClip, CancelWriter, Retrying, RecordFailure, Stop)):
            pass  # a cancelled call's answer is ignored by the core; the rest is the runtime's bookkeeping

    def _clip_made(self, call: int) -> None:
        uri = self.calls.pop(call)[1].clip
        self.clips_done[uri] = self.clips_done.get(uri, 0) + 1
        for then in self.clip_waiters.pop(uri, []):  # mora drivers waiting for its last frame
            self.at(self.now + MORA_POLL_S / 2, then)
        self._core(lambda: self.core.on_clip_result(call, ClipDone(uri, 0, 0), None, "", self.now))

    def _written(self, key) -> None:
        self.latency.append(self.now - self.started[key[0]])
        self.end = self.now
        self._core(lambda: self.core.on_writer_result(key, None, "", self.now))

    # -- actors -----------------------------------------------------------------------------------------
    def _add(self, kind: str, num_gpus: float, up_at: float, node: str | None = None) -> SimActor:
        node = node or self._fit(num_gpus)
        self.free[node] = self.free.get(node, 0.0) - num_gpus
        actor = SimActor(f"{kind}-{next(self.names)}", kind, num_gpus, up_at=up_at, free_at=up_at, node=node)
        self.actors[actor.name] = actor
        return actor

    def _fit(self, num_gpus: float) -> str:
        """The live node with the most room (each pool spreads over the nodes, as the runtime spreads it)."""
        return max(self.free, key=self.free.get, default="")

    def _driver_home(self, moving: int | None = None) -> str | None:
        """Drivers spread over the live nodes as the runtime spreads them (`policies.host_node`)."""
        counts: dict[str, int] = {}
        for driver, node in self.driver_node.items():
            if driver != moving and node is not None:
                counts[node] = counts.get(node, 0) + 1
        return host_node([n.node_id for n in self.nodes], counts)

    def _members(self, kind: str) -> list[str]:
        return [a.name for a in self.actors.values() if a.state == "member" and a.up_at <= self.now
                and serving_pool(a.kind, a.lent) == kind]

    def _lend(self) -> None:
        """Placement shared: idle SD actors take the last clips once the input is used up (as `Pools.lend`)."""
        if self.cfg.ray.placement != "shared":
            return
        idle = sorted((a for a in self.actors.values() if a.kind in LENDS and not a.lent and a.state == "member"
                       and a.up_at <= self.now and not a.queued), key=lambda a: a.free_at)
        for actor in lend_to_video([a.name for a in idle], len(self._members("sd")), self.tasks_in.exhausted,
                                   len(self.core.held), self.core.to_sequence):
            self.actors[actor].lent = True
            self.lent_at.setdefault("first_s", round(self.now, 1))
            self.lent_at["actors"] = self.lent_at.get("actors", 0) + 1

    def _members_changed(self) -> None:
        """Members as the pools publish them: loaded, not leaving; the job's own pool goes to the core."""
        members = {kind: self._members(kind) for kind in self.kinds}
        before = getattr(self, "members", {})
        self.members = members
        for kind in ("video", CAPTION):
            if kind in members and members[kind] != before.get(kind):
                self._core(lambda kind=kind: self.core.on_members(kind, members[kind], self.now))

    def _serve(self, actor: SimActor, seconds: float, then: Callable[[], None],
               lost: Callable[[], None] | None = None) -> None:
        """FIFO on the actor: the call starts when the actor is free, plus the per-call overhead. ``lost`` runs
        instead of ``then`` if the actor's node is preempted first."""
        if actor.lost:  # it left a moment ago: the call fails at once, as a dead actor's would
            self.at(self.now + self.overheads.call_s, lost or then)
            return
        start = max(self.now + self.overheads.call_s, actor.free_at)
        actor.free_at = start + seconds
        actor.queued += 1
        token = next(self.seq)
        actor.inflight[token] = (start, seconds, lost)

        def done() -> None:
            if actor.inflight.pop(token, None) is None:
                return  # cut short with its node
            actor.queued -= 1
            actor.busy += seconds
            actor.calls += 1
            if actor.state == "draining" and not actor.queued:
                self._retire(actor)
            then()

        self.at(actor.free_at, done)

    def _dispatch(self, kind: str, seconds: float, then: Callable[[float], None],
                  lost: Callable[[], None]) -> None:
        """A driver's call: two members drawn, the shorter queue takes it (`policies`), as on Ray; ``then`` gets
        the call's GPU-seconds."""
        members = self.members[kind]
        candidates = sample_candidates(members, lambda _: False, self.rng)
        self.messages["calls"] += 1
        self.messages["messages"] += 1 + (len(candidates) if len(candidates) > 1 else 0)  # claim + probes
        queued = {name: self.actors[name].queued for name in candidates}
        actor = self.actors[choose_actor(candidates, queued)]
        self._serve(actor, seconds, lambda: then(seconds * actor.num_gpus), lost)

    # -- a driver's task, call by call (`engine.sequence_task`) -------------------------------------------------
    def _sequence(self, start: StartTask) -> None:
        """The calls the engine makes for the run's method: text-to-image steps (cosed, independent, chain and
        mora's first step), clips from captions (t2v), one generation per task (talc), or scenes that wait for
        the previous clip's last frame (mora)."""
        task, counts = start.task, self.counts[len(start.task.steps)]
        steps, method = len(task.steps), self.cfg.method
        gen = self.driver_gen[start.driver]

        def call(kind: str, seconds: float, then: Callable[[], None]) -> None:
            self._driver_call(start, gen, kind, seconds, then)

        def request(number: int) -> ClipRequest:
            return ClipRequest(task.id, number, "", 0, self.cfg.video, "", f"{task.id}/{number}")

        def report(events: list) -> None:
            if events:
                self._core(lambda: self.core.on_driver_events(start.driver, [(start.key, e) for e in events],
                                                              self.now))

        def sequenced() -> None:
            self.driving.pop(start.driver, None)
            self.attempt_work.pop(start.driver, None)
            report([Sequenced(steps)])

        def finish() -> None:  # CLIP-T of the chosen scenes
            call("clip", self.costs.seconds("embed_texts", steps), sequenced)

        if method == "talc":  # one video-pool generation for the task; its clips are stored with it
            def made() -> None:
                call("clip", self.costs.seconds("embed_images", steps),
                     lambda: (report([ClipFound(request(n)) for n in range(1, steps + 1)]), finish()))

            call("video", self.costs.seconds("animate", 1) * steps, made)
            return

        def step(number: int) -> None:
            if number > steps:
                finish()
                return
            if method == "t2v":  # the clip from the caption, made while sequencing: the job finds it stored
                call("video", self.costs.seconds("animate", 1), lambda: call(
                    "clip", self.costs.seconds("embed_images", 1),
                    lambda: (report([ClipFound(request(number))]), step(number + 1))))
                return
            if method == "mora" and number > 1:  # the previous clip's last frame, once the job has made it
                self._when_clip(request(number - 1).clip, lambda: call(
                    "clip", self.costs.seconds("embed_images", 1),
                    lambda: (report([request(number)]), step(number + 1))))
                return
            count = counts[number - 1]
            parts = batches(count, self.cfg.sd.batch_size)
            left = {"n": len(parts)}

            def rendered() -> None:
                left["n"] -= 1
                if left["n"]:
                    return
                then = scored if number == 1 else select
                if number == 1:  # the captions' embeddings are first needed to score step 1
                    call("clip", self.costs.seconds("embed_texts", steps),
                         lambda: call("clip", self.costs.seconds("embed_images", count), then))
                else:
                    call("clip", self.costs.seconds("embed_images", count), then)

            def select() -> None:
                call("clip", self.costs.seconds("selector_scores", count), scored)

            def scored() -> None:  # the clips this choice settles (under keyframe: the previous scene's)
                report([request(ready) for ready in clips_ready(number, steps, self.cfg.transitions)])
                step(number + 1)

            for rows in parts:
                call("sd", self.costs.seconds("render", len(rows)), rendered)

        step(1)

    def _when_clip(self, uri: str, then: Callable[[], None]) -> None:
        """Run ``then`` once the clip ``uri`` is made (a mora driver polls storage for it)."""
        if self.clips_done.get(uri):
            self.at(self.now + MORA_POLL_S / 2, then)
        else:
            self.clip_waiters.setdefault(uri, []).append(then)

    # -- the pools' periodic check: growth and rebalancing ----------------------------------------------
    def _tick(self) -> None:
        if self.core.finished:
            return
        self._lend()
        self._members_changed()
        self._core(lambda: self.core.on_tick(self.now))
        self._rescue()
        calls = {k: self.work.seconds_per_call().get(k, 0.0) for k in self.kinds}
        if self.cfg.ray.rebalance and self.now - self.window_at >= rebalance_window_s(
                self.cfg.ray.rescale_seconds, calls, self.cfg.ray.rebalance_window_calls) and \
                not any(a.state == "draining" or a.lent for a in self.actors.values()):
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
        if actor.node in self.free:
            self.free[actor.node] += actor.num_gpus

    def _join(self, gpus: int) -> None:
        """Nodes join: the actors that place on the room they bring (`sizing.free_room`, `grow_pools`)."""
        joined = self.cluster.nodes(gpus, prefix=f"j{len(self.nodes)}-")
        self.nodes = self.nodes + joined
        self.free.update({n.node_id: n.gpus for n in joined})
        self.nominal_gpus += gpus
        self._grow()

    def _grow(self) -> None:
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
        gpus = self.nominal_gpus
        makespan = self.end
        absent = self.lost.absent_gpu_s + sum(g * max(0.0, makespan - at) for at, g in self.gone.values())
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
            gpu_hours=round((gpus * makespan - absent) / 3600, 2),
            tasks_per_gpu_hour=round(done / (gpus * makespan / 3600), 3) if makespan else 0.0,
            mean_latency_s=round(sum(self.latency) / len(self.latency), 1) if self.latency else 0.0,
            busy=busy, bottleneck=max(busy, key=busy.get), plan=self.plan.to_dict(), drivers=self.core.admission.drivers,
            dispatch_messages_per_call=round(self.messages["messages"] / max(1, self.messages["calls"]), 3),
            core_events=self.core.events, core_us_per_event=round(1e6 * self.core_seconds / max(1, self.core.events), 2),
            moves=self.moves, grown={k: v for k, v in self.grown.items() if v}, unplaced_actors=self.unplaced,
            preemption=self.lost.to_dict() if self.cluster.preemptions.per_node_hour else {}, lent=dict(self.lent_at))


def simulate(step_counts: list[int], cfg: RunConfig, costs: CostModel, cluster: Cluster,
             overheads: Overheads = Overheads(), seed: int = 0) -> SimResult:
    """Simulate one run of tasks with these step counts on ``cluster`` (see `Simulation`)."""
    return Simulation(step_counts, cfg, costs, cluster, overheads, seed).run()

