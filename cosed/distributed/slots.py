"""Late binding of the job's clip calls to video actors.

The job is the only caller of the video pool, so it knows every actor's queue
exactly. Each actor holds at most ``depth`` of its calls (one running, the next
already there so the GPU never waits for a round trip); a clip that finds every
actor full waits in the job and goes to whichever actor frees first. A run's
last clips then start the moment any GPU is free, instead of queueing behind
others on an actor drawn while the pool was busy, and nothing a spot loss takes
with an actor's queue is more than ``depth`` calls.
"""

from __future__ import annotations

from typing import Iterable


class Slots:
    """Actors' open call slots, least-loaded first; among equals the one that freed longest ago."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError("an actor holds at least one call")
        self.depth = depth
        self.load: dict[str, int] = {}  # actor -> calls outstanding on it (members and actors that left)
        self.levels: list[dict[str, None]] = [{} for _ in range(depth)]  # load -> members with it, in order
        self.members: set[str] = set()

    def set_members(self, names: Iterable[str]) -> None:
        """The pool's live members now; the calls still out on actors that left are counted until answered."""
        self.members = set(names)
        self.levels = [{} for _ in range(self.depth)]
        for name in names:  # in the pool's order
            load = self.load.setdefault(name, 0)
            if load < self.depth:
                self.levels[load][name] = None

    @property
    def open(self) -> int:
        """Members with room for one more call."""
        return sum(len(level) for level in self.levels)

    def take(self, avoid: set[str] = frozenset()) -> str | None:
        """The member to send the next call to (None: all full, or only ``avoid`` has room)."""
        for level, members in enumerate(self.levels):
            for name in members:
                if name not in avoid:
                    del members[name]
                    if level + 1 < self.depth:
                        self.levels[level + 1][name] = None
                    self.load[name] = level + 1
                    return name
        return None

    def give(self, name: str) -> None:
        """A call on ``name`` ended (answered, failed or given up)."""
        load = self.load.get(name, 0)
        if load <= 0:
            return
        if name in self.members:
            if load < self.depth:
                del self.levels[load][name]
            self.levels[load - 1][name] = None
        self.load[name] = load - 1
