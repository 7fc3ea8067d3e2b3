"""The model actors of one run, owned by the job process: start, watch, rebalance, publish.

The job process creates every model worker, so no actor's death takes the
workers with it. Workers restart on failure (``max_restarts=-1``); the job
polls each one's `info` every ``rescale_seconds`` (in a thread of its own, so
it answers while a call runs), kills one whose call hangs (it restarts and the
caller retries elsewhere), drops one that stays unreachable, moves capacity
from an idle pool to the bottleneck and publishes the members to the
`Directory`, where drivers and writers refresh their view.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import uuid

import ray

from cosed.config import RunConfig
from cosed.distributed.actors import Directory, RemoteModelWorker
from cosed.distributed.dispatch import Membership
from cosed.distributed.costs import CostModel, TaskWork, measured_factors
from cosed.distributed.sizing import KINDS, ClusterPlan, PoolPlan, grow_pools, nodes_from_ray, plan_for_cluster, \
    rebalance_move, rebalance_window_s

log = logging.getLogger("cosed")
INFO_TIMEOUT_S = 5.0
START_GRACE_S = 10.0  # the least time late actors get to join the first of their pools at start


def pool_totals(stats, *fields: str) -> dict[str, tuple[float, ...]]:
    """Per pool (each stat's ``kind``), the sums of ``fields`` over its actors' stats (`ModelWorker.info`)."""
    totals: dict[str, list[float]] = {}
    for item in stats:
        sums = totals.setdefault(item["kind"], [0.0] * len(fields))
        for i, name in enumerate(fields):
            sums[i] += item[name]
    return {kind: tuple(sums) for kind, sums in totals.items()}


class Pools:
    def __init__(self, cfg: RunConfig, costs: CostModel | None = None, expected: TaskWork | None = None):
        self.cfg = cfg
        self.costs = costs or CostModel.from_dict({})
        self.expected_work = expected
        self.work = dict(expected.seconds) if expected else {}
        self.drivers_hint = expected.critical_path / expected.total if expected and expected.total else None
        self.sized_for: tuple[float, float] = (0.0, 0.0)  # cluster (GPUs, CPUs) the pools were last sized for
        self.cluster_plan: ClusterPlan | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.members: dict[str, dict[str, ray.actor.ActorHandle]] = {kind: {} for kind in KINDS}
        # name -> (kind, handle, since, its first `info` call: done once the models have loaded)
        self.starting: dict[str, tuple[str, ray.actor.ActorHandle, float, ray.ObjectRef]] = {}
        self.draining: dict[str, tuple[str, ray.actor.ActorHandle, object, float]] = {}
        self.plan: dict[str, PoolPlan] = {}
        self.version = 0
        self.names = itertools.count()
        self.directory = Directory.remote()
        self.info: dict[str, dict] = {}  # last info per actor name (kept for retired actors too)
        self.unreachable_since: dict[str, float] = {}
        self.window: dict[str, tuple[float, float]] = {}  # kind -> (busy, alive) at the last rebalance
        self.moves: list[dict] = []
        self.hung_kills = 0
        self.window_at = time.monotonic()  # when the busy window began (after start, each move, each decision)

    # -- the plan (pure planning lives in sizing.py) -----------------------------------------------
    def _cluster(self) -> tuple[float, float]:
        resources = ray.cluster_resources()
        return resources.get("GPU", 0.0), resources.get("CPU", 0.0)

    def _plan(self) -> dict[str, PoolPlan]:
        """The plan (sizing.plan_cluster) on the nodes there once the GPUs the run expects have joined.
        ``ray.policy: legacy`` keeps the even split to compare against."""
        self.cluster_plan = plan_for_cluster(self.cfg.ray, lambda: nodes_from_ray(ray.nodes()), self.work, self.costs,
                                             self.drivers_hint)
        self.sized_for = self._cluster()
        return self.cluster_plan.pools

    # -- actors --------------------------------------------------------------------------------------
    def _add(self, kind: str) -> str:
        plan = self.plan[kind]
        name = f"cosed-{self.run_id}-{kind}-{next(self.names)}"
        handle = RemoteModelWorker.options(
            name=name, num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=-1, max_task_retries=0,
        ).remote(kind, self.cfg)
        self.starting[name] = (kind, handle, time.monotonic(), handle.info.remote())
        return name

    def start(self) -> dict[str, dict]:
        """Create every pool and wait until each has a loaded model (so a bad model fails here).

        Actors the cluster cannot place yet (another job holds the room, a node is still joining)
        do not hold the run back: once every pool has a member and the rest have had as long again
        as the first took, the run starts and they join when placed (see `_watch`).
        """
        self.plan = self._plan()
        for kind, plan in self.plan.items():
            for _ in range(plan.replicas):
                self._add(kind)
        refs = {ref: name for name, (_, _, _, ref) in self.starting.items()}
        began = time.monotonic()
        deadline = began + self.cfg.ray.start_timeout_s
        every_pool_at = None
        while refs:
            now = time.monotonic()
            if every_pool_at is not None:
                until = min(deadline, every_pool_at + max(START_GRACE_S, every_pool_at - began))
            else:
                until = deadline
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, until - now))
            if not ready:
                break
            for ref in ready:
                name = refs.pop(ref)
                self.info[name] = ray.get(ref)
                kind, handle, _, _ = self.starting.pop(name)
                self.members[kind][name] = handle
            if every_pool_at is None and all(self.members[kind] for kind in self.plan):
                every_pool_at = time.monotonic()
        missing = [kind for kind in self.plan if not self.members[kind]]
        if missing:
            gpus, cpus = self._cluster()
            raise TimeoutError(
                f"no {' or '.join(missing)} model actor was placed within {self.cfg.ray.start_timeout_s:.0f} s "
                f"on a cluster of {cpus:g} CPUs and {gpus:g} GPUs; pools asked for "
                + ", ".join(f"{k}: {p.replicas} x ({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for k, p in self.plan.items()))
        if refs:
            log.warning("%d of %d model actors are not placed yet (the cluster is busy or still growing); "
                        "the run starts without them and they join when placed",
                        len(refs), sum(p.replicas for p in self.plan.values()))
        self._request_gpus()
        self.publish()
        self.busy()  # the first rebalancing window starts with the run, not with model loading
        return self.describe()

    def begin(self) -> None:
        """The first task starts now: rebalancing windows count from here, not from the drivers' start-up
        (a window that began while no task ran reads as an idle pool, and would move an actor it needs)."""
        if self._watch():
            self.publish()
        self.busy()

    def _request_gpus(self) -> None:
        """Ask an autoscaling cluster for up to ``autoscale_max_gpus`` GPUs (a no-op elsewhere)."""
        wanted = self.cfg.ray.autoscale_max_gpus
        if wanted <= 0:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": 1.0}] * int(wanted))
        except Exception as exc:  # a cluster without an autoscaler
            log.info("autoscaler request skipped: %s", exc)

    def membership(self) -> Membership:
        return Membership(self.version, {kind: dict(m) for kind, m in self.members.items()}, self.expected(),
                          self.run_id)

    def publish(self) -> None:
        self.version += 1
        self.directory.publish.remote(self.membership())

    def expected(self) -> dict[str, float]:
        """Mean seconds per call in each pool so far (seeds every dispatcher's timeouts)."""
        return {kind: busy / calls for kind, (busy, calls) in pool_totals(self.info.values(), "busy", "calls").items()
                if calls}

    def call_seconds(self) -> dict[str, float]:
        """Seconds per call of each pool: measured, else modeled (a pool none of whose calls has ended yet
        must not make the rebalancing window short)."""
        modeled = self.expected_work.seconds_per_call() if self.expected_work else {}
        return {**modeled, **self.expected()}

    def _retire(self, name: str, handle) -> None:
        for kind in KINDS:
            self.members[kind].pop(name, None)
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass

    # -- the periodic check ----------------------------------------------------------------------
    def tick(self) -> None:
        """Watch every actor, finish drains, grow with the cluster, rebalance, publish."""
        changed = self._watch()
        changed |= self._finish_drains()
        changed |= self.rescale()
        if self.cfg.ray.rebalance and not self.draining and time.monotonic() - self.window_at >= \
                rebalance_window_s(self.cfg.ray.rescale_seconds, self.call_seconds(), self.cfg.ray.rebalance_window_calls):
            changed |= self._rebalance()
        if changed:
            self.publish()
        else:  # cheap, and repopulates a directory that restarted
            self.directory.publish.remote(self.membership())

    def _watch(self) -> bool:
        changed = self._promote_started()
        ray_cfg = self.cfg.ray
        everyone = {name: (kind, h) for kind, m in self.members.items() for name, h in m.items()}
        refs = {handle.info.remote(): name for name, (_, handle) in everyone.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=INFO_TIMEOUT_S) if refs else ([], [])
        now = time.monotonic()
        expected = self.expected()
        for ref, name in refs.items():
            kind, handle = everyone[name]
            info, restarting = None, False
            if ref in ready:
                try:
                    info = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    restarting = True  # Ray is bringing it back (reloading models can take minutes)
                except ray.exceptions.RayError:
                    pass
            if info is None:
                since = self.unreachable_since.setdefault(name, now)
                others = len(self.members[kind]) > 1
                # A restarting actor gets time to reload, unless its pool can serve without it (its node
                # may be gone for good): then it is replaced and the replacement joins when placed.
                limit = ray_cfg.start_timeout_s if restarting and not others else ray_cfg.call_timeout_floor_s
                if now - since > limit:
                    log.warning("model actor %s unreachable for %.0f s; replacing it in the %s pool",
                                name, now - since, kind)
                    self.unreachable_since.pop(name, None)
                    self._retire(name, handle)
                    self._add(kind)  # placed wherever (and whenever) the cluster has room
                    changed = True
                continue
            self.unreachable_since.pop(name, None)
            self.info[name] = info
            stall = max(ray_cfg.call_timeout_floor_s, ray_cfg.call_timeout_factor * expected.get(kind, 0.0))
            if info["running_for"] > stall:
                log.warning("model actor %s has run one call for %.0f s (limit %.0f s); restarting it",
                            name, info["running_for"], stall)
                self.hung_kills += 1
                ray.kill(handle, no_restart=False)
        return changed

    def _promote_started(self) -> bool:
        """Members for actors whose models have loaded; a fresh try for one not up within the start timeout."""
        changed = False
        now = time.monotonic()
        for name, (kind, handle, since, ref) in list(self.starting.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    self.info[name] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.warning("model actor %s failed to start (%s); trying again", name, type(exc).__name__)
                else:
                    del self.starting[name]
                    self.members[kind][name] = handle
                    changed = True
                    continue
            elif now - since <= self.cfg.ray.start_timeout_s:
                continue
            del self.starting[name]
            self._retire(name, handle)
            self._add(kind)
        return changed

    def measured_work(self) -> dict[str, float]:
        """Expected GPU-seconds per pool, each scaled by measured over modeled seconds per call."""
        if self.expected_work is None:
            return dict(self.work)
        factors = measured_factors(self.expected_work, pool_totals(self.info.values(), "busy", "calls"))
        return {kind: seconds * factors.get(kind, 1.0) for kind, seconds in self.work.items()}

    def rescale(self) -> bool:
        """When the cluster has grown, new actors for the pools that need them most; never removes any."""
        gpus, cpus = self._cluster()
        if (gpus, cpus) == self.sized_for:
            return False
        grew = gpus > self.sized_for[0] + 1e-6
        self.sized_for = (gpus, cpus)
        if not grew:
            return False
        now = {kind: dataclasses.replace(plan, replicas=len(self.members[kind]) + sum(
                   1 for k, _, _, _ in self.starting.values() if k == kind)) for kind, plan in self.plan.items()}
        used = sum(p.replicas * min(1.0, p.num_gpus) for p in now.values())
        fixed = {kind for kind in KINDS if getattr(self.cfg.ray, kind).replicas != "auto"}
        added = grow_pools(now, gpus - math.ceil(used - 1e-6), self.measured_work(), fixed)
        for kind, count in added.items():
            for _ in range(count):
                self._add(kind)
        if any(added.values()):
            log.warning("the cluster grew to %g GPUs: adding %s", gpus,
                        ", ".join(f"{n} {kind}" for kind, n in added.items() if n))
        return any(added.values())

    def busy(self) -> dict[str, float]:
        """Busy fraction per pool since the last call (all of the run on the first); starts a new window."""
        totals = pool_totals((info for name, info in self.info.items() if name in self.members[info["kind"]]),
                             "busy", "alive")
        out = {}
        for kind in KINDS:
            busy, alive = totals.get(kind, (0.0, 0.0))
            last_busy, last_alive = self.window.get(kind, (0.0, 0.0))
            span = alive - last_alive
            out[kind] = (busy - last_busy) / span if span > 0 else 0.0
            self.window[kind] = (busy, alive)
        self.window_at = time.monotonic()
        return out

    def _rebalance(self) -> bool:
        busy = self.busy()
        movable = {kind: value for kind, value in busy.items() if getattr(self.cfg.ray, kind).replicas == "auto"}
        now = ClusterPlan(pools={k: dataclasses.replace(p, replicas=len(self.members[k])) for k, p in self.plan.items()},
                          drivers=0, reason="")
        move = rebalance_move(movable, now, high=self.cfg.ray.busy_above, low=self.cfg.ray.idle_below,
                              margin=self.cfg.ray.rebalance_margin)
        if move is None:
            return False
        donor, target = move
        roomy = [n for n in self.members[donor] if self._room_without(n) >= self.plan[target].num_gpus - 1e-6]
        if not roomy:  # every donor shares its GPU: the replacement would not fit where it leaves
            return False
        name = min(roomy, key=lambda n: self.info.get(n, {}).get("busy", 0.0))
        handle = self.members[donor].pop(name)
        self.draining[name] = (target, handle, handle.drain.remote(), time.monotonic())
        self.moves.append({"from": donor, "to": target, "actor": name,
                           "busy": {k: round(v, 3) for k, v in busy.items()}})
        log.warning("rebalancing: draining %s (%s busy %.0f%%) for the %s pool (busy %.0f%%)",
                    name, donor, 100 * busy[donor], target, 100 * busy[target])
        return True

    def _room_without(self, name: str) -> float:
        """GPU share free on ``name``'s GPU once it has gone (0 when unknown)."""
        mine = self.info.get(name)
        if not mine or not mine["gpu_ids"]:
            return 0.0
        gpus = set(mine["gpu_ids"])
        used = sum(min(1.0, self.plan[kind].num_gpus) for kind, members in self.members.items() for other in members
                   if other != name and other in self.info and self.info[other]["node_id"] == mine["node_id"]
                   and gpus & set(self.info[other]["gpu_ids"]))
        return max(0.0, 1.0 - used)

    def _finish_drains(self) -> bool:
        """Kill drained actors once drivers have seen them leave; start their replacements."""
        changed = False
        grace = 4.0  # > two dispatcher refresh periods: no stale caller picks the actor any more
        for name, (target, handle, ref, since) in list(self.draining.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done and time.monotonic() - since >= grace:
                del self.draining[name]
                self._retire(name, handle)
                replacement = self._add(target)
                next(m for m in reversed(self.moves) if m["actor"] == name)["replacement"] = replacement
                self.busy()  # restart the busy window
                changed = True
        return changed

    # -- reporting -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, dict]:
        return {kind: {"replicas": len(self.members[kind]), "num_gpus": plan.num_gpus}
                for kind, plan in self.plan.items()}

    def stats(self) -> list[dict]:
        """Last known info of every actor that served in this run (including retired ones)."""
        self._watch()
        return list(self.info.values())

    def shutdown(self) -> None:
        handles = [h for m in self.members.values() for h in m.values()]
        handles += [h for _, h, _, _ in self.starting.values()] + [h for _, h, _, _ in self.draining.values()]
        for handle in handles + [self.directory]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
