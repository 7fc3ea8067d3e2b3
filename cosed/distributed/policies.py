"""Scheduling decisions as pure functions of observed state: no Ray, no clock, no I/O.

The Ray runtime (`cosed.distributed.job`, `dispatch`, `pools`) and the virtual-time
simulator (`cosed.distributed.simulator`, `cosed plan`) import these same
functions, so what is simulated is what runs. Sizing, growth and rebalancing
live in `sizing`, task order in `costs`; this module holds the per-call and
per-event ones: which actor takes a call, how many tasks may be in flight,
where drivers and writers run and what they ask for, how busy a pool was over
a window whose members changed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

PROBES = 2  # queue probes per dispatched call: the power of two choices


def sample_candidates(members: Sequence[str], avoid: Callable[[str], bool], rng: random.Random,
                      k: int = PROBES) -> list[str]:
    """Up to ``k`` distinct members in random order; members ``avoid`` flags only when no other is left.

    Constant work per call: a few draws, not a pass over the pool (a pool of a
    thousand actors costs what a pool of three does), except when the draws found
    only flagged members, which happens while most of a pool is being replaced.
    """
    chosen = rng.sample(list(members), len(members)) if len(members) <= k else []
    draws = 0
    while len(chosen) < k and draws < 4 * k:
        draws += 1
        name = members[rng.randrange(len(members))]
        if name not in chosen:
            chosen.append(name)
    healthy = [name for name in chosen if not avoid(name)]
    if healthy:
        return healthy
    others = [name for name in members if not avoid(name)]
    return [rng.choice(others)] if others else chosen


def choose_actor(candidates: Sequence[str], queued: dict[str, int]) -> str:
    """Of the sampled candidates, the one with the fewest calls queued (an unanswered probe counts as
    infinitely busy); ties go to the first drawn, which is random."""
    return min(candidates, key=lambda name: queued.get(name, math.inf))


@dataclass(frozen=True)
class Admission:
    """How many tasks a run holds at once (a bound on memory and on in-flight work). While the storage pushes
    back (``pressure``: it answers SlowDown) no task starts and a single writer runs: the run slows down
    instead of adding load, and the work in flight finishes."""

    drivers: int  # tasks sequencing at once
    after_sequencing: int  # tasks past their driver: clips rendering, waiting to write, writing
    writers: int  # writer tasks running at once
    captions_ahead: int  # tasks captioned (or captioning) before a driver is free for them
    writers_under_pressure: int = 1

    def may_sequence(self, idle_drivers: int, after: int, pressure: bool = False) -> bool:
        return not pressure and idle_drivers > 0 and after < self.after_sequencing

    def may_write(self, writing: int, pressure: bool = False) -> bool:
        return writing < (min(self.writers, self.writers_under_pressure) if pressure else self.writers)

    def may_caption(self, captioning: int, pressure: bool = False) -> bool:
        return not pressure and captioning < self.captions_ahead


AFTER_SEQUENCING = 8  # tasks past their driver may number this many times the drivers (each is a record in the job:
# its scenes and clips are in storage), so text-to-image can run ahead while clips render


def admission(drivers: int, writers: int | None = None, nodes: int = 1) -> Admission:
    """The run's bounds: ``drivers`` sequencing, `AFTER_SEQUENCING` times that past sequencing (their clips
    render while the drivers choose the next scenes: the video pool never waits for a driver), writers
    as configured or two per node (they only copy parts and join clips), captions two drivers' worth ahead."""
    return Admission(drivers=drivers, after_sequencing=AFTER_SEQUENCING * drivers,
                     writers=writers if writers else max(2, 2 * nodes), captions_ahead=2 * drivers)


WORKER_RESOURCE = "cosed_worker"  # the custom resource worker nodes advertise: drivers and writers run there
HEAD_RESOURCE = "node:__internal_head__"  # what Ray puts on the head node only


def host_nodes(ray_nodes: Sequence[dict], where: str = "workers") -> tuple[list[str], bool]:
    """The alive nodes drivers and writers may run on now (from ``ray.nodes()``), and whether they are the
    nodes marked with `WORKER_RESOURCE`.

    Marked nodes when any node advertises it (the shipped cluster files mark their worker groups; the
    runtime then requires the resource, so Ray never falls back to the head); else every node but the head
    (a GPU-less head with 16 GiB must not take hundreds of torch-importing processes; Ray may still fall
    back to it when the workers are gone or full), unless the head is the only node (a laptop,
    ``ray.init``); every node when ``where`` is ``any``."""
    alive = [n for n in ray_nodes if n.get("Alive", True)]
    marked = [n["NodeID"] for n in alive if n.get("Resources", {}).get(WORKER_RESOURCE, 0) > 0]
    if marked and where != "any":
        return marked, True
    everyone = [n["NodeID"] for n in alive]
    workers = [n["NodeID"] for n in alive if HEAD_RESOURCE not in n.get("Resources", {})]
    return (everyone if where == "any" else workers or everyone), False


def host_node(nodes: Sequence[str], load: dict[str, int], turn: int = 0) -> str | None:
    """The node with the fewest of the run's drivers (or writers) now; ties go to the first from position
    ``turn`` on (a count of earlier choices spreads short-lived writers round the nodes); None: no node."""
    if not nodes:
        return None
    best = min(range(len(nodes)), key=lambda i: (load.get(nodes[i], 0), (i - turn) % len(nodes)))
    return nodes[best]


def driver_destination(node: str | None, nodes: Sequence[str], load: dict[str, int]) -> str | None:
    """Where an idle driver about to take a task should move (None: it stays).

    It moves to the least-loaded node when its own node is no longer one drivers may use (gone, or a
    worker node appeared beside the head), or holds at least two drivers more: so a node that joins
    receives drivers as they finish tasks, within the plan's driver count, and a balanced spread never
    moves (a move costs a process start)."""
    target = host_node(nodes, load)
    if target is None or node == target:
        return None
    if node not in nodes or load.get(node, 0) - load.get(target, 0) >= 2:
        return target
    return None


def process_resources(asks: Sequence[tuple[float, float]], counts: Sequence[int],
                      room: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(CPUs, memory bytes) each kind of process asks for: drivers, writers.

    ``asks`` as configured, ``counts`` how many of each kind the run holds at once, ``room`` (CPUs, memory
    bytes) each host node has left once the model actors are placed. The asks are lowered together, by one
    factor per resource, so that each node's share of every kind fits its room (as auto CPUs of model actors
    are lowered to what the busiest node can give): a request Ray could never grant would leave a driver
    unplaced. CPUs in hundredths, memory in MiB, rounded down."""
    if not room:
        return [tuple(ask) for ask in asks]
    share = [math.ceil(count / len(room)) for count in counts]
    fitted = []
    for resource, unit in ((0, 0.01), (1, 2.0 ** 20)):
        wanted = sum(n * ask[resource] for n, ask in zip(share, asks))
        scale = min([1.0] + [node[resource] / wanted for node in room if wanted > 0])
        fitted.append([math.floor(ask[resource] * scale / unit + 1e-9) * unit for ask in asks])
    return [(round(cpus, 2), memory) for cpus, memory in zip(*fitted)]


@dataclass(frozen=True)
class Sample:
    """One actor life's cumulative counters at one moment (`ModelWorker.info`); a restart is a new life."""

    kind: str
    busy: float  # seconds spent in calls since this life began
    alive: float  # seconds since this life began


def window_busy(start: dict[str, Sample], latest: dict[str, Sample]) -> dict[str, float]:
    """Per pool, busy seconds over member seconds between two snapshots, keyed by actor life.

    ``latest`` holds the latest sample of every life seen, whether it still serves
    or not; ``start`` is that map as it was when the window began. Each life counts
    for the part of the window it lived: one that began during the window from its
    start, one that ended (a replaced, retired or restarted actor) up to its last
    sample. A window over a replacement therefore reads the pool's true busy
    fraction, never 0 % because the actors that left took their history along.
    """
    busy: dict[str, float] = {}
    alive: dict[str, float] = {}
    for life, final in latest.items():
        first = start.get(life)
        base_busy, base_alive = (first.busy, first.alive) if first else (0.0, 0.0)
        span = final.alive - base_alive
        if span <= 0:
            continue
        busy[final.kind] = busy.get(final.kind, 0.0) + max(0.0, final.busy - base_busy)
        alive[final.kind] = alive.get(final.kind, 0.0) + span
    return {kind: busy[kind] / alive[kind] for kind in alive}


# -- failure rules: the one home of every give-up, retry, replace and kill decision ----------------------------
# The job core (clip and caption calls, tasks), the drivers' dispatcher (their model calls), the pools (actors)
# and the simulator (`cosed plan --preemptions`) decide with these same functions and numbers.

def call_timeout(floor_s: float, factor: float, expected_s: float, queued: int = 0) -> float:
    """How long to wait for a call with ``queued`` calls ahead of it on its actor."""
    return max(floor_s, factor * expected_s * (1 + queued))


def retry_backoff(failures: int) -> float:
    """Seconds before a failed call is sent again (to another actor): doubling from 0.4 s, at most 5 s."""
    return min(0.2 * 2 ** failures, 5.0)


def give_up(failures: int, attempts: int, failing_for_s: float, patience_s: float) -> bool:
    """A call is failed only after ``attempts`` failures *and* ``patience_s`` since its first one: a pool whose
    only actors are being replaced (a node lost) must not fail the task in the seconds that takes."""
    return failures >= attempts and failing_for_s >= patience_s


def call_patience(restarting: bool, floor_s: float, restart_wait_s: float) -> float:
    """How long a failing call is kept trying: the call floor, or a model load's time while its actor is only
    restarting (a pool of one actor that reloads must not fail its calls in the seconds that takes)."""
    return restart_wait_s if restarting else floor_s


def avoid_after_failure(tried: Sequence[str], members: int) -> set[str]:
    """The actors a resent call avoids: the last ones it failed on, all but one member's worth."""
    return set(tried[-members + 1:]) if members > 1 else set()


def unreachable_limit(restarting: bool, others: bool, node_gone: bool, floor_s: float,
                      start_timeout_s: float) -> float:
    """How long an actor may leave its probes unanswered before it is replaced: the call floor, or a model
    load's time when it is only restarting, is its pool's last member and its node is still there."""
    return start_timeout_s if restarting and not others and not node_gone else floor_s


def hung(running_for_s: float, floor_s: float, factor: float, expected_s: float) -> bool:
    """One call has run longer than any call's timeout: the actor is restarted (the call is retried elsewhere)."""
    return running_for_s > call_timeout(floor_s, factor, expected_s)


def needs_rescue(replicas: int, members: int, waiting_s: float | None, draining: bool, floor_s: float) -> bool:
    """A pool that should have actors has had none for a call floor (its node left, no room for a new one):
    it takes a GPU from another pool (`rescue_donor`)."""
    return bool(replicas) and not members and not draining and waiting_s is not None and waiting_s >= floor_s


def rescue_donor(kind: str, members: dict[str, int], whole_members: dict[str, int]) -> str | None:
    """The pool that gives the GPU: of the others with more than one whole-GPU member, the one with most members."""
    donors = [k for k in members if k != kind and whole_members.get(k, 0) > 1]
    return max(donors, key=lambda k: members[k]) if donors else None


LENDS = {"sd": "video"}  # placement shared: the pool whose actors also hold the other's model, and that model
# SD actors that one task still to sequence keeps busy near a run's end (`lend_to_video`): its steps alternate
# SD renders with CLIP scoring and queue waits. Measured in `cosed plan` (sd21-svd, 10,000 tasks, 1,024 GPUs):
# 0.3 -> 95.0 %, 0.5 -> 95.3 %, 1.0 -> 94.7 % (lends nothing in time); flux-ltx is unchanged by it.
LEND_CALLS_PER_TASK = 0.5


def serving_pool(kind: str, lent: bool) -> str:
    """The pool an actor of ``kind`` serves: its own, or the one it was lent to (`lend_to_video`)."""
    return LENDS[kind] if lent else kind


def lend_to_video(idle: Sequence[str], members: int, input_done: bool, clips_waiting: int, to_sequence: int,
                  calls_per_task: float = LEND_CALLS_PER_TASK) -> list[str]:
    """The idle SD actors that join the video pool now (``placement: shared``).

    Once no task is left to read, SD work only shrinks while the last clips still queue: an SD actor that
    the tasks still to sequence cannot keep busy takes clips instead of idling. Each such task keeps about
    ``calls_per_task`` SD actors busy (its steps run in order), so ``members`` beyond that many per task are
    spare; of those, the idle ones (``idle``: no call queued or running, longest idle first) go, one per
    clip waiting for a video actor, and the SD pool keeps a member (a retried task's steps). Before that
    point an idle SD actor is a moment's gap between calls, not spare capacity: lent then, the run would
    lose it (flux-ltx at 1,024 GPUs read 80 % instead of 91 % when any idle SD actor was lent)."""
    if not input_done or clips_waiting <= 0:
        return []
    spare = members - max(1, math.ceil(to_sequence * calls_per_task))
    return list(idle[:max(0, min(len(idle), clips_waiting, spare))])
