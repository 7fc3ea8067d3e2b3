"""Which actor to move between pools, from measured busy fractions (pure; the job executes it).

Placeholder decision until the cost-model planner (issue 7a) provides its own
`rebalance_move`; the job only needs ``(from pool, to pool) | None``.
"""

from __future__ import annotations


def rebalance_move(busy: dict[str, float], replicas: dict[str, int], gpus_per_actor: dict[str, float],
                   movable: set[str], busy_above: float, idle_below: float) -> tuple[str, str] | None:
    """Move one actor from the idlest movable pool to the busiest movable one, when one idles and one is short.

    A pool keeps at least one actor, and an actor's resources must fit one of the
    busy pool's actors (a 1-GPU SD actor can become a 1-GPU video actor, not a 2-GPU one).
    """
    busiest = max((kind for kind in busy if kind in movable), key=lambda kind: (busy[kind], kind), default=None)
    if busiest is None or busy[busiest] < busy_above:
        return None
    donors = [kind for kind in busy if kind != busiest and kind in movable and replicas.get(kind, 0) > 1
              and busy[kind] <= idle_below and gpus_per_actor.get(kind, 0.0) >= gpus_per_actor.get(busiest, 0.0)]
    if not donors:
        return None
    return min(donors, key=lambda kind: (busy[kind], kind)), busiest
