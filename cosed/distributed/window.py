"""The job's window of tasks: how the runtime and the simulator feed a `JobCore` from a streamed input.

The core holds the tasks that may sequence or render now, the captions made ahead, and one chunk
to order the next ones by; the rest of the dataset stays in its shards. Refills come a chunk at a
time, each chunk in Johnson's order (`flow_order`), so ordering works per window. The simulator
(and so `cosed plan`) feeds its core with this same class, so a plan models the runtime's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cosed.distributed.core import JobCore
from cosed.distributed.policies import Admission
from cosed.tasks import Task

ORDER_CHUNK = 64  # tasks ordered together (Johnson's rule) when the window is topped up


def task_window(admission: Admission) -> int:
    """Tasks the job holds at once: those that may sequence or render (drivers and after sequencing), the
    captions made ahead, and a chunk to order the next ones by."""
    return admission.drivers + admission.after_sequencing + admission.captions_ahead + ORDER_CHUNK


@dataclass
class Window:
    """Tops ``core`` up from ``take(n)`` (up to ``n`` (task, fingerprint), fewer only at the end of the input).

    ``order`` puts a chunk in the order to run it; ``captions`` gives a task's captions, or None where the
    caption pool makes them; a task whose captions cannot be made (``given`` captions missing, say) goes to
    ``reject`` instead of the core: that task's error, the run goes on."""

    core: JobCore
    take: Callable[[int], list[tuple[Task, str]]]
    order: Callable[[list[Task]], list[Task]]
    captions: Callable[[Task], list[str] | None]
    size: int
    reject: Callable[[Task, Exception], None] | None = None
    exhausted: bool = False

    def refill(self) -> int:
        """Add what the window has room for; returns how many tasks were added."""
        room = self.core.room(self.size)
        if room < min(self.size // 2, ORDER_CHUNK) and self.core.queue:
            return 0  # a chunk worth ordering at a time, unless the drivers are about to run dry
        added = 0
        while room > 0 and not self.exhausted:
            pulled = self.take(room)
            self.exhausted = len(pulled) < room
            fingerprints = {task.id: fingerprint for task, fingerprint in pulled}
            chunk = self.order([task for task, _ in pulled])
            pulled = None
            entries = []
            for task in chunk:
                try:
                    entries.append((task, fingerprints[task.id], self.captions(task)))
                except Exception as exc:  # noqa: BLE001  (one task's inputs: its own error)
                    if self.reject is None:
                        raise
                    self.reject(task, exc)
            self.core.add(entries)
            added += len(entries)
            room = self.core.room(self.size)
        if self.exhausted:
            self.core.end_of_input()
        return added
