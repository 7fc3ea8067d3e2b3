"""Ray metrics (`ray.util.metrics`) for the dashboard / Prometheus: where a cluster is short.

Every metric cosed exports is declared once in `METRICS` (name -> kind, description,
tag keys); `cluster/grafana/cosed.json` charts them and a test checks that each
metric it uses is declared here. Ray exports user metrics to Prometheus with the
prefix ``ray_``, counters also with the suffix ``_total`` (``cosed_scenes_done`` is
scraped as ``ray_cosed_scenes_done_total``), histograms as ``_bucket``/``_sum``/``_count``.

Metrics are best effort: a process without a metrics agent records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

LATENCY_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600]
CALL_BOUNDARIES = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 45, 90, 180, 600]


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, Metric] = {
    "cosed_scenes_done": Metric("counter", "scenes chosen"),
    "cosed_tasks": Metric("gauge", "tasks of the run in each state (queued, captioning, sequencing, rendering, "
                                   "writing)", ("state",)),
    "cosed_tasks_finished": Metric("counter", "tasks finished, by outcome (done, failed)", ("outcome",)),
    "cosed_task_retries": Metric("counter", "task attempts started again (driver or writer lost, deadline)"),
    "cosed_task_latency_s": Metric("histogram", "task start to manifest", (), tuple(LATENCY_BOUNDARIES)),
    "cosed_pool_actors": Metric("gauge", "model actors serving in each pool", ("pool",)),
    "cosed_pool_busy_seconds": Metric("counter", "model seconds per pool (rate() = busy actors)", ("pool",)),
    "cosed_pool_calls_in_flight": Metric("gauge", "calls sent and not answered, per sending process", ("pool",)),
    "cosed_pool_call_seconds": Metric("histogram", "seconds from sending a model call to its answer, queueing "
                                                   "included", ("pool",), tuple(CALL_BOUNDARIES)),
    "cosed_call_retries": Metric("counter", "model calls sent again to another actor (actor lost, timeout)",
                                 ("pool",)),
}


@cache
def _metric(name: str):
    from ray.util import metrics

    spec = METRICS[name]
    if spec.kind == "counter":
        return metrics.Counter(name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)


def record(name: str, value: float = 1.0, **tags: str) -> None:
    """Add ``value`` to a counter, set a gauge or observe a histogram; never raises."""
    try:
        metric = _metric(name)
        kind = METRICS[name].kind
        if kind == "counter":
            metric.inc(value, tags=tags or None)
        elif kind == "gauge":
            metric.set(value, tags=tags or None)
        else:
            metric.observe(value, tags=tags or None)
    except Exception:  # metrics must never break a run
        pass
