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
import time
import uuid

import ray

from cosed.config import RunConfig
from cosed.distributed.actors import Directory, RemoteModelWorker
from cosed.distributed.dispatch import Membership
from cosed.distributed.costs import CostModel
from cosed.distributed.sizing import KINDS, ClusterPlan, PoolPlan, nodes_from_ray, plan_for_cluster, plan_pools, \
    rebalance_move

log = logging.getLogger("cosed")
INFO_TIMEOUT_S = 5.0


class Pools:
    def __init__(self, cfg: RunConfig, costs: CostModel | None = None, work: dict[str, float] | None = None,
                 drivers_hint: float | None = None):
        self.cfg = cfg
        self.costs = costs or CostModel.from_dict({})
        self.work = work or {}
        self.drivers_hint = drivers_hint
        self.cluster_plan: ClusterPlan | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.members: dict[str, dict[str, ray.actor.ActorHandle]] = {kind: {} for kind in KINDS}
        self.starting: dict[str, tuple[str, ray.actor.ActorHandle, float]] = {}  # name -> (kind, handle, since)
        self.draining: dict[str, tuple[str, ray.actor.ActorHandle, object, float]] = {}
        self.plan: dict[str, PoolPlan] = {}
        self.base_plan: dict[str, PoolPlan] = {}
        self.version = 0
        self.names = itertools.count()
        self.directory = Directory.remote()
        self.info: dict[str, dict] = {}  # last info per actor name (kept for retired actors too)
        self.unreachable_since: dict[str, float] = {}
        self.window: dict[str, tuple[float, float]] = {}  # kind -> (busy, alive) at the last rebalance
        self.moves: list[dict] = []
        self.hung_kills = 0
        self.settled_at = time.monotonic()  # no move until the busy fractions reflect the last one

    # -- the plan (pure planning lives in sizing.py) -----------------------------------------------
    def _cluster(self) -> tuple[float, float]:
        resources = ray.cluster_resources()
        return resources.get("GPU", 0.0), resources.get("CPU", 0.0)

    def _plan(self, fixed_gpus: dict[str, float] | None = None) -> dict[str, PoolPlan]:
        """The cost-aware plan (sizing.plan_cluster) on the nodes there now; at start, once the GPUs the
        run expects have joined. ``ray.policy: legacy`` keeps the even split to compare against."""
        if self.cfg.ray.policy == "legacy" and fixed_gpus:
            return plan_pools(self.cfg.ray, *self._cluster(), fixed_gpus=fixed_gpus)
        plan = plan_for_cluster(self.cfg.ray, lambda: nodes_from_ray(ray.nodes()), self.work, self.costs,
                                self.drivers_hint, wait=fixed_gpus is None)
        if fixed_gpus is None:
            self.cluster_plan = plan
        return plan.pools

    # -- actors --------------------------------------------------------------------------------------
    def _add(self, kind: str) -> None:
        plan = self.plan[kind]
        name = f"cosed-{self.run_id}-{kind}-{next(self.names)}"
        handle = RemoteModelWorker.options(
            name=name, num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=-1, max_task_retries=0,
        ).remote(kind, self.cfg)
        self.starting[name] = (kind, handle, time.monotonic())

    def start(self) -> dict[str, dict]:
        """Create every pool and wait until each model has loaded (so a bad model fails here)."""
        self.plan = self.base_plan = self._plan()
        for kind, plan in self.plan.items():
            for _ in range(plan.replicas):
                self._add(kind)
        refs = {handle.info.remote(): name for name, (_, handle, _) in self.starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.ray.start_timeout_s)
        if len(ready) < len(refs):
            gpus, cpus = self._cluster()
            raise TimeoutError(
                f"{len(refs) - len(ready)} model actors were not placed within {self.cfg.ray.start_timeout_s:.0f} s "
                f"on a cluster of {cpus:g} CPUs and {gpus:g} GPUs; pools asked for "
                + ", ".join(f"{k}: {p.replicas} x ({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for k, p in self.plan.items()))
        for ref in ready:
            self.info[refs[ref]] = ray.get(ref)
            kind, handle, _ = self.starting.pop(refs[ref])
            self.members[kind][refs[ref]] = handle
        self._request_gpus()
        self.publish()
        return self.describe()

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
        return Membership(self.version, {kind: dict(m) for kind, m in self.members.items()}, self.expected())

    def publish(self) -> None:
        self.version += 1
        self.directory.publish.remote(self.membership())

    def expected(self) -> dict[str, float]:
        """Mean seconds per call in each pool so far (seeds every dispatcher's timeouts)."""
        out = {}
        for kind in KINDS:
            items = [i for i in self.info.values() if i["kind"] == kind and i["calls"]]
            if items:
                out[kind] = sum(i["busy"] for i in items) / sum(i["calls"] for i in items)
        return out

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
        if self.cfg.ray.rebalance and not self.draining and \
                time.monotonic() - self.settled_at >= 3 * self.cfg.ray.rescale_seconds:
            changed |= self._rebalance()
        if changed:
            self.publish()
        else:  # cheap, and repopulates a directory that restarted
            self.directory.publish.remote(self.membership())

    def _watch(self) -> bool:
        ray_cfg = self.cfg.ray
        everyone = {name: (kind, h) for kind, m in self.members.items() for name, h in m.items()}
        everyone.update({name: (kind, h) for name, (kind, h, _) in self.starting.items()})
        refs = {handle.info.remote(): name for name, (_, handle) in everyone.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=INFO_TIMEOUT_S) if refs else ([], [])
        now = time.monotonic()
        expected = self.expected()
        changed = False
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
                slow_start = name in self.starting or restarting
                limit = ray_cfg.start_timeout_s if slow_start else ray_cfg.call_timeout_floor_s
                if now - since > limit:
                    log.warning("model actor %s unreachable for %.0f s; replacing it in the %s pool",
                                name, now - since, kind)
                    self.starting.pop(name, None)
                    self.unreachable_since.pop(name, None)
                    self._retire(name, handle)
                    self._add(kind)  # placed wherever (and whenever) the cluster has room
                    changed = True
                continue
            self.unreachable_since.pop(name, None)
            self.info[name] = info
            if name in self.starting:
                self.starting.pop(name)
                self.members[kind][name] = handle
                changed = True
            stall = max(ray_cfg.call_timeout_floor_s, ray_cfg.call_timeout_factor * expected.get(kind, 0.0))
            if info["running_for"] > stall:
                log.warning("model actor %s has run one call for %.0f s (limit %.0f s); restarting it",
                            name, info["running_for"], stall)
                self.hung_kills += 1
                ray.kill(handle, no_restart=False)
        return changed

    def rescale(self) -> bool:
        """Add actors where the cluster now holds room for more; never removes any."""
        grown = self._plan(fixed_gpus={kind: plan.num_gpus for kind, plan in self.plan.items()})
        added = False
        for kind in KINDS:
            for _ in range(max(0, grown[kind].replicas - self.base_plan[kind].replicas)):
                self._add(kind)
                added = True
        self.base_plan = grown
        return added

    def busy(self) -> dict[str, float]:
        """Busy fraction per pool since the last call (all of the run on the first)."""
        totals = {kind: [0.0, 0.0] for kind in KINDS}
        for name, info in self.info.items():
            if name in self.members[info["kind"]]:
                totals[info["kind"]][0] += info["busy"]
                totals[info["kind"]][1] += info["alive"]
        out = {}
        for kind, (busy, alive) in totals.items():
            last_busy, last_alive = self.window.get(kind, (0.0, 0.0))
            span = alive - last_alive
            out[kind] = (busy - last_busy) / span if span > 0 else 0.0
            self.window[kind] = (busy, alive)
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
        name = min(self.members[donor], key=lambda n: self.info.get(n, {}).get("busy", 0.0))
        handle = self.members[donor].pop(name)
        self.draining[name] = (target, handle, handle.drain.remote(), time.monotonic())
        self.moves.append({"from": donor, "to": target, "actor": name,
                           "busy": {k: round(v, 3) for k, v in busy.items()}})
        log.warning("rebalancing: draining %s (%s busy %.0f%%) for the %s pool (busy %.0f%%)",
                    name, donor, 100 * busy[donor], target, 100 * busy[target])
        return True

    def _finish_drains(self) -> bool:
        """Kill drained actors once drivers have seen them leave; start their replacements."""
        changed = False
        grace = 4.0  # > two dispatcher refresh periods: no stale caller picks the actor any more
        for name, (target, handle, ref, since) in list(self.draining.items()):
            done, _ = ray.wait([ref], timeout=0)
            if done and time.monotonic() - since >= grace:
                del self.draining[name]
                self._retire(name, handle)
                self._add(target)
                self.settled_at = time.monotonic()
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
        handles += [h for _, h, _ in self.starting.values()] + [h for _, h, _, _ in self.draining.values()]
        for handle in handles + [self.directory]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
