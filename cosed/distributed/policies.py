"""Scheduling decisions as pure functions of observed state: no Ray, no clock, no I/O.

The Ray runtime (`cosed.distributed.job`, `dispatch`, `pools`) and the virtual-time
simulator (`cosed.distributed.simulator`, `cosed plan`) import these same
functions, so what is simulated is what runs. Sizing, growth and rebalancing
live in `sizing`, task order in `costs`; this module holds the per-call and
per-event ones: which actor takes a call, how many tasks may be in flight,
which node writes, how busy a pool was over a window whose members changed.
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


def writer_node(nodes: Sequence[str], head: str | None, writing: dict[str, int], where: str = "workers") -> str | None:
    """The node a writer runs on: the worker node with the fewest writers running (the head only when it is
    the only node, or when ``where`` is ``any``); None lets Ray choose."""
    candidates = [n for n in nodes if where == "any" or n != head] or list(nodes)
    if not candidates:
        return None
    return min(candidates, key=lambda n: (writing.get(n, 0), n))


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
