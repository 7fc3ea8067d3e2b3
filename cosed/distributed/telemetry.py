"""Ray metrics (`ray.util.metrics`) for the dashboard / Prometheus: where a cluster is short.

- ``cosed_scenes_done``: scenes chosen (counter)
- ``cosed_pool_busy_seconds{pool}``: model seconds spent per pool (counter; rate() = busy actors)
- ``cosed_pool_calls_in_flight{pool}``: calls sent and not yet answered, per sending process (gauge)
- ``cosed_tasks_queued``, ``cosed_tasks_running``: tasks waiting for / holding a driver (gauges)
- ``cosed_task_latency_s``: seconds from a task's start to its manifest (histogram)

Metrics are best effort: a process without a metrics agent records nothing.
"""

from __future__ import annotations

from functools import cache

from ray.util import metrics

LATENCY_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600]


@cache
def _metric(kind: str, name: str, description: str, tags: tuple[str, ...] = ()):
    cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}.get(kind)
    if cls is None:
        return metrics.Histogram(name, description, boundaries=LATENCY_BOUNDARIES, tag_keys=tags)
    return cls(name, description, tag_keys=tags)


def _record(fn) -> None:
    try:
        fn()
    except Exception:  # metrics must never break a run
        pass


def scene_done() -> None:
    _record(lambda: _metric("counter", "cosed_scenes_done", "scenes chosen").inc())


def busy_seconds(pool: str, seconds: float) -> None:
    _record(lambda: _metric("counter", "cosed_pool_busy_seconds", "model seconds per pool", ("pool",))
            .inc(seconds, tags={"pool": pool}))


def calls_in_flight(pool: str, count: int) -> None:
    _record(lambda: _metric("gauge", "cosed_pool_calls_in_flight", "calls sent, not answered", ("pool",))
            .set(count, tags={"pool": pool}))


def tasks(queued: int, running: int) -> None:
    _record(lambda: _metric("gauge", "cosed_tasks_queued", "tasks waiting for a driver").set(queued))
    _record(lambda: _metric("gauge", "cosed_tasks_running", "tasks holding a driver or a writer").set(running))


def task_latency(seconds: float) -> None:
    _record(lambda: _metric("histogram", "cosed_task_latency_s", "task start to manifest").observe(seconds))
