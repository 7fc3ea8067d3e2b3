"""Node preemptions for the simulator (`cosed plan --preemptions`): when nodes go, and what their loss cost.

Spot nodes disappear independently of each other: each live node is lost at a
constant rate (``5%/h``: one node in twenty per hour), so the next loss in the
cluster comes after an exponential wait whose rate grows with the nodes alive.
What runs on a lost node is then handled by the job's own failure rules, driven
by the simulator: its model calls fail and are sent elsewhere (`JobCore`,
`policies.give_up`), its drivers are lost and their tasks retried, and, on an
autoscaling cluster, a node of the same shape arrives after a delay and gets
the lost actors back. Seeded: the same seed gives the same losses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from cosed.distributed.core import DriverFailed, StartTask
from cosed.distributed.policies import give_up, needs_rescue, rescue_donor, retry_backoff, unreachable_limit
from cosed.errors import UserError


def parse_rate(text: str) -> float:
    """Node losses per node-hour from ``5%/h``, ``5%`` (per hour), ``0.05/h`` or ``20%/d``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*(?:/\s*([mhd]))?\s*", text)
    if not match:
        raise UserError(f"--preemptions takes a rate of nodes lost per hour, e.g. 5%/h, got {text!r}")
    value = float(match[1]) / (100.0 if match[2] else 1.0)
    return value * {"m": 60.0, "h": 1.0, "d": 1 / 24}[match[3] or "h"]


@dataclass(frozen=True)
class PreemptionModel:
    """``per_node_hour``: the loss rate of each node; ``replace_after_s``: when a lost node's replacement joins
    (the autoscaler's reaction and the node's boot; None: never, a fixed-size cluster)."""

    per_node_hour: float = 0.0
    replace_after_s: float | None = 600.0

    def next_loss(self, rng: random.Random, live_nodes: int) -> float | None:
        """Seconds until the next node in the cluster is lost (None: none will be)."""
        rate = self.per_node_hour * live_nodes / 3600.0
        return rng.expovariate(rate) if rate > 0 else None


@dataclass
class LostWork:
    """What the preemptions cost: nodes lost, calls cut short, attempts given up, GPU-seconds thrown away."""

    nodes: int = 0
    cut_calls: dict[str, int] = field(default_factory=dict)  # pool -> calls that failed with their node
    cut_gpu_s: float = 0.0  # GPU-seconds those calls had run
    drivers: int = 0  # task attempts given up with their driver's node
    redone_calls: dict[str, int] = field(default_factory=dict)  # pool -> calls of attempts given up
    redone_gpu_s: float = 0.0  # GPU-seconds of those calls (a retried task makes them again)
    absent_gpu_s: float = 0.0  # GPU-seconds nodes were gone before their replacement came

    def cut(self, kind: str, gpu_s: float) -> None:
        self.cut_calls[kind] = self.cut_calls.get(kind, 0) + 1
        self.cut_gpu_s += gpu_s

    def redone(self, kind: str, gpu_s: float) -> None:
        self.redone_calls[kind] = self.redone_calls.get(kind, 0) + 1
        self.redone_gpu_s += gpu_s

    @property
    def gpu_hours(self) -> float:
        """Work thrown away: calls cut short, and calls of given-up attempts that their retries make again."""
        return (self.cut_gpu_s + self.redone_gpu_s) / 3600.0

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "cut_calls": dict(self.cut_calls), "drivers": self.drivers,
                "redone_calls": dict(self.redone_calls), "lost_gpu_hours": round(self.gpu_hours, 3)}


class NodeLoss:
    """The `Simulation`'s part that loses nodes and applies the runtime's failure rules to what ran there.

    Its calls fail and go elsewhere (the core's rules for clip and caption calls, `_driver_call` for the
    drivers' calls); drivers lost with the node give their attempts up (`JobCore.on_driver_lost`); the pools
    notice the lost actors (`policies.unreachable_limit`) and start them again where they place, a pool
    left with no member takes a GPU from another (`needs_rescue`, `rescue_donor`), and the autoscaler's
    replacement node, if any, takes the actors that did not place.
    """

    def _driver_call(self, start: StartTask, gen: int, kind: str, seconds: float, then: Callable[[], None],
                     failures: int = 0, first: float | None = None) -> None:
        """One model call of a driver's attempt, with the dispatcher's failure rules: sent again elsewhere after
        a backoff, given up (the task fails) by `policies.give_up`; dropped once the attempt is given up."""
        slot, ray_cfg = start.driver, self.cfg.ray
        if self.driver_gen[slot] != gen:
            return
        if not self.members[kind]:  # every member is being replaced: wait for one, as the dispatcher does
            if first is not None and self.now - first > ray_cfg.start_timeout_s:
                self._core(lambda: self.core.on_driver_events(slot, [(start.key, DriverFailed(
                    "calls", f"no {kind} actor in the pool"))], self.now))
                return
            self.at(self.now + 1.0, lambda: self._driver_call(start, gen, kind, seconds, then, failures,
                                                              first if first is not None else self.now))
            return

        def done(gpu_s: float) -> None:
            if self.driver_gen[slot] != gen:
                self.lost.redone(kind, gpu_s)  # made for an attempt given up: its retry makes it again
                return
            self.attempt_work[slot].append((kind, gpu_s))
            then()

        def failed() -> None:
            if self.driver_gen[slot] != gen:
                return
            began = first if first is not None else self.now
            if give_up(failures + 1, ray_cfg.call_attempts, self.now - began, ray_cfg.call_timeout_floor_s):
                self._core(lambda: self.core.on_driver_events(slot, [(start.key, DriverFailed(
                    "calls", f"{kind} calls kept failing"))], self.now))
                return
            self.at(self.now + retry_backoff(failures + 1),
                    lambda: self._driver_call(start, gen, kind, seconds, then, failures + 1, began))

        self._dispatch(kind, seconds, done, failed)

    def _next_loss(self) -> None:
        wait = self.cluster.preemptions.next_loss(self.faults, len(self.nodes))
        if wait is not None:
            self.at(self.now + wait, self._preempt)

    def _preempt(self) -> None:
        """A node is lost with everything on it; the job's failure rules take it from there."""
        if self.core.finished or not self.nodes:
            return
        node = self.nodes[self.faults.randrange(len(self.nodes))]
        self.nodes = [n for n in self.nodes if n.node_id != node.node_id]
        del self.free[node.node_id]
        self.gone[node.node_id] = (self.now, node.gpus)
        self.lost.nodes += 1
        lost = [a for a in self.actors.values() if a.node == node.node_id and a.state != "retired"]
        floor = self.cfg.ray.call_timeout_floor_s
        for actor in lost:
            actor.state, actor.retired_at, actor.lost, actor.queued = "retired", self.now, True, 0
            cut, actor.inflight = actor.inflight, {}
            for start, seconds, failed in cut.values():
                self.lost.cut(actor.kind, min(max(0.0, self.now - start), seconds) * actor.num_gpus)
                if failed is not None:
                    self.at(self.now, failed)
            # The pools' probes find it unreachable, its node gone: replaced after the call floor.
            wait = unreachable_limit(False, len(self._members(actor.kind)) > 1, True, floor,
                                     self.cfg.ray.start_timeout_s)
            self.at(self.now + wait, lambda a=actor: self._restart(a.kind, a.num_gpus, self.now))
        self._members_changed()
        for slot in [d for d, where in self.driver_node.items() if where == node.node_id]:
            self.driver_node[slot] = self._driver_home(slot)
            key = self.driving.pop(slot, None)
            if key is not None and self.core.sequencing(slot, key):
                self.driver_gen[slot] += 1
                for kind, gpu_s in self.attempt_work.pop(slot, []):
                    self.lost.redone(kind, gpu_s)
                self.lost.drivers += 1
                self._core(lambda slot=slot, key=key: self.core.on_driver_lost(slot, key, "node preempted", self.now))
        replace_after = self.cluster.preemptions.replace_after_s
        if replace_after is not None:
            self.at(self.now + replace_after, lambda: self._replace(node))
        self._next_loss()

    def _restart(self, kind: str, num_gpus: float, since: float) -> None:
        """A lost actor started again where it places (loaded after the actor start time), else left waiting."""
        node = self._fit(num_gpus)
        if not node or self.free[node] < num_gpus - 1e-6:
            self.pending.append((kind, num_gpus, since))
            return
        up = self.now + self.overheads.actor_start_s
        self._add(kind, num_gpus, up, node=node)
        self.at(up, self._members_changed)

    def _rescue(self) -> None:
        """A pool with no member whose lost actors found no room for a call floor takes a GPU from another."""
        draining = any(a.state == "draining" for a in self.actors.values())
        for kind, plan in self.plan.pools.items():
            waiting = [p for p in self.pending if p[0] == kind]
            starting = [a for a in self.actors.values() if a.kind == kind and a.state == "member" and a.up_at > self.now]
            if starting or not needs_rescue(plan.replicas, len(self._members(kind)),
                                            self.now - min(p[2] for p in waiting) if waiting else None,
                                            draining, self.cfg.ray.call_timeout_floor_s):
                continue
            whole = {k: [a for a in self.actors.values() if a.kind == k and a.state == "member" and a.num_gpus >= 1
                         and a.up_at <= self.now] for k in self.plan.pools}
            donor = rescue_donor(kind, {k: len(self._members(k)) for k in self.plan.pools},
                                 {k: len(v) for k, v in whole.items()})
            if donor is None:
                continue
            actor = min(whole[donor], key=lambda a: a.busy)
            self._retire(actor)
            self.pending = [p for p in self.pending if p[0] != kind]
            up = self.now + self.overheads.actor_start_s
            if plan.partner and plan.num_gpus < 0.5:  # a guest: the donor keeps a host actor on that GPU
                self._add(donor, self.plan.pools[donor].host_gpus or actor.num_gpus - plan.num_gpus, up,
                          node=actor.node)
            self._add(kind, waiting[0][1], up, node=actor.node)
            self.at(up, self._members_changed)
            self._members_changed()
            self.moves.append({"at": round(self.now, 1), "from": donor, "to": kind, "reason": "no member"})

    def _replace(self, node) -> None:
        """The autoscaler's new node of the same shape: actors still waiting for room start there, and the
        pools grow on what is left (as when any node joins)."""
        when, gpus = self.gone.pop(node.node_id)
        self.lost.absent_gpu_s += gpus * (self.now - when)
        new = replace(node, node_id=f"r{self.lost.nodes}-{node.node_id}")
        self.nodes = self.nodes + [new]
        self.free[new.node_id] = new.gpus
        waiting, self.pending = self.pending, []
        for kind, num_gpus, since in waiting:
            self._restart(kind, num_gpus, since)
        self._grow()
