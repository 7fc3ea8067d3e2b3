"""Run a batch of tasks on a Ray cluster: the thin shell around `JobCore`.

The shell turns Ray into events for the core (a driver's scenes, a clip call's
answer, a writer's end, a tick) and the core's actions into Ray calls. Every
remote answer arrives through a callback on its object reference, so the loop
handles one event at a time and never scans what is in flight; it never waits
on one slow thing either (pool checks do not block, failure records are written
by a thread of their own). Storage gone past its budget, the output lease
lost, or the job API recording this Ray job as stopped, stops the run: no task
starts after that, and the run ends with the documented error (exit 1) once its
drivers are stopped. Storage that throttles pauses admission instead: a thread
probes the output prefix about once a second and the core hears when the
SlowDown answers begin and end.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cosed import storage
from cosed.calls import CaptionRequest
from cosed.config import RunConfig, resolve_autoscale_max_gpus
from cosed.distributed import telemetry
from cosed.distributed.actors import DriverTask, RayBackend, TaskDriver, node_gpu_memory, warm_writer, write_task
from cosed.distributed.core import (CancelClip, CancelWriter, CorePolicy, DriverFailed, JobCore,
                                    RecordFailure, ReplaceDriver, Retrying, SendCaptions, SendClip, Sequenced,
                                    StartTask, StartWriter, Stop)
from cosed.distributed.costs import CAPTION, PLAN_SAMPLE, CostModel, estimated_work, flow_order
from cosed.distributed.dispatch import RETRYABLE, CallPolicy, Dispatcher
from cosed.distributed.policies import (WORKER_RESOURCE, admission, driver_destination, host_node, host_nodes,
                                       process_resources)
from cosed.distributed.pools import AutoscaleRequest, Pools, busy_fractions, nodes_now
from cosed.distributed.sizing import expected_gpus, free_room, nodes_from_ray, wait_for_gpus, wanted_gpus
from cosed.distributed.submission import JobStopped, raise_if_stopped
from cosed.lease import LeaseLost, OutputLease
from cosed.models.profiles import ModelUnavailable
from cosed.rewrite import make_rewriter
from cosed.distributed.window import Window, task_window
from cosed.feed import TaskFeed
from cosed.runner import RunSummary, finish_run, prepare_run, profile_cache, write_failure
from cosed.runplan import plan_run
from cosed.storage import StorageUnavailable
from cosed.tasks import CAPTIONS, TaskError

log = logging.getLogger("cosed")
PROGRESS_SECONDS = 1.0
REPLACE_REFRESH_S = 0.5  # a replaced driver reads the node list this fresh (one read serves a node's many)
PROBE_SECONDS = 1.0  # how often the job asks the storage whether it still throttles


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start a local one: never, silently, a cluster some
    earlier ``ray start`` or crashed run left on this machine (``--address auto`` joins that one)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def start_pools(cfg: RunConfig, costs: CostModel | None = None, expected=None, nodes=None,
                before_start=None) -> Pools:
    """The run's pools, started; ``before_start(pools)`` runs once the plan is made, while the models load."""
    try:
        pools = Pools(cfg, costs, expected, nodes)
    except ValueError as exc:
        raise ModelUnavailable(f"no pool plan for this cluster: {exc}") from exc
    try:
        if before_start is not None:
            before_start(pools)
        pools.start()
    except (ray.exceptions.RayError, TimeoutError) as exc:
        pools.shutdown()
        raise ModelUnavailable(f"model actors could not start: {exc}") from exc
    except BaseException:
        pools.shutdown()
        raise
    return pools


@contextmanager
def pooled_backend(cfg: RunConfig, address: str | None = None):
    """A `RayBackend` over fresh model pools, for verbs that only need model calls (training)."""
    connect(address)
    pools = start_pools(cfg)
    try:
        yield RayBackend(Dispatcher(pools.membership(), CallPolicy.from_config(cfg.ray)))
    finally:
        pools.shutdown()


def smallest_gpu_gib(cfg: RunConfig) -> float | None:
    """The smallest GPU the pools may run on: ``ray.gpu_memory_gib``, else the smallest now in the cluster
    (nvidia-smi on each GPU node; None where no GPU answers, as on logical GPUs)."""
    if cfg.ray.gpu_memory_gib != "auto":
        return float(cfg.ray.gpu_memory_gib)
    # Only nodes whose GPUs Ray detected (it adds an accelerator_type resource): logical GPUs have no memory.
    detected = [n["NodeID"] for n in ray.nodes() if n.get("Alive", True)
                and any(key.startswith("accelerator_type:") for key in n.get("Resources", {}))]
    probes = [node_gpu_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
              for node in detected]
    if not probes:
        return None
    ready, _ = ray.wait(probes, num_returns=len(probes), timeout=60)
    sizes = [size for ref in ready for size in _quiet_get(ref, [])]
    return min(sizes) if sizes else None


def _quiet_get(ref, default):
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:
        return default


def run_on_ray(tasks_uri: str, out: str, cfg: RunConfig, *, overwrite: bool = False, progress: bool = True,
               address: str | None = None, lease: OutputLease | None = None, replan: bool = False) -> RunSummary:
    """Every task on the Ray cluster: the run's plan first (`cosed.runplan`: stored under the output, never
    from the GPUs up now), then the tasks left, the autoscaler's request, the pools and the job loop."""
    start = time.perf_counter()
    summary = None
    stopped: BaseException | None = None
    autoscale = AutoscaleRequest()
    try:
        connect(address)
        plan = plan_run(cfg, out, lambda: smallest_gpu_gib(cfg), replan,
                        say=lambda line: print(line, flush=True))
        profile, cfg = plan.profile, plan.cfg
        costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
        summary, feed = prepare_run(tasks_uri, out, plan, overwrite)
        sample = feed.peek(PLAN_SAMPLE)
        if sample:
            work = estimated_work([len(p.task.steps) for p in sample], feed.estimated_pending(), cfg, costs)
            sample = None
            max_gpus = resolve_autoscale_max_gpus(cfg.ray.autoscale_max_gpus)
            wanted = wanted_gpus(max_gpus, work.total, work.critical_path / work.tasks, work.tasks)
            autoscale.ask(wanted)
            nodes = wait_for_gpus(nodes_now, max(expected_gpus(cfg.ray, costs), wanted), cfg.ray.gpu_wait_s,
                                  strict=cfg.ray.min_gpus > 0, log=lambda line: print(f"[cosed] {line}", flush=True))
            # The lm rewriter's captions are made by the caption pool: its model never loads here.
            rewriter = None if cfg.rewriter == "lm" else make_rewriter(cfg.rewriter, model=cfg.rewriter_model,
                                                                        cache_dir=profile_cache(cfg))
            made = {}

            def while_models_load(pools: Pools) -> None:  # drivers and writer processes start meanwhile
                if progress:
                    print(f"[cosed] {pools.cluster_plan.describe()}", flush=True)
                made["job"] = RayJob(out, profile, cfg, pools, summary, feed, rewriter, lease, progress, autoscale,
                                     work)

            try:
                pools = start_pools(cfg, costs, work, nodes, before_start=while_models_load)
            except BaseException:
                if "job" in made:  # its drivers were started while the models loaded
                    made["job"].shutdown()
                raise
            try:
                job = made["job"]
                job.warmed()
                try:
                    job.run()
                finally:
                    stopped = job.stopped
                    job.shutdown()
                summary.actors = pools.stats()
                busy = busy_fractions(summary.actors)
                summary.extra = {"plan": pools.cluster_plan.to_dict(), "pools": pools.describe(),
                                 "busy_fraction": busy, "bottleneck": max(busy, key=busy.get) if busy else None,
                                 "moves": pools.moves, "hung_calls_restarted": pools.hung_kills, **job.report()}
            finally:
                pools.shutdown()
    finally:
        autoscale.clear()
        if summary is not None:
            summary.seconds = time.perf_counter() - start
            # With the storage gone, the records cannot wait for it as long as a task's writes would.
            with storage.budget(10.0 if isinstance(stopped, StorageUnavailable) else cfg.storage.retry_seconds):
                finish_run(out, summary)
    if stopped is not None:
        stopped.summary = summary  # for callers and tests: what the run did before it stopped
        raise stopped
    return summary


@dataclass
class Trace:
    """When tasks started and when the run stopped (monotonic), for the summary and the tests."""

    started: list[tuple[float, str]] = field(default_factory=list)
    stopped_at: float | None = None
    paused: list[list[float | None]] = field(default_factory=list)  # [from, to] while storage throttled


class RayJob:
    """One run's drivers, clip calls, writers and events around a `JobCore`."""

    def __init__(self, out, profile, cfg: RunConfig, pools: Pools, summary: RunSummary, feed: TaskFeed, rewriter,
                 lease: OutputLease | None, progress: bool, autoscale: AutoscaleRequest, work):
        self.out, self.profile, self.cfg, self.pools, self.summary = out, profile, cfg, pools, summary
        self.lease, self.progress, self.autoscale, self.work = lease, progress, autoscale, work
        self.feed, self.rewriter = feed, rewriter
        plan = pools.cluster_plan
        drivers = max(1, min(plan.drivers, work.tasks))
        ray_nodes = ray.nodes()
        self.hosts_at = -float("inf")
        self._refresh_hosts(ray_nodes)
        writers = None if cfg.ray.writers == "auto" else int(cfg.ray.writers)
        expected = pools.call_seconds()
        self.core = JobCore([], drivers, admission(drivers, writers, len(self.hosts)), CorePolicy(
            task_retries=cfg.ray.task_retries, sequence_deadline_s=cfg.ray.sequence_deadline_s,
            write_deadline_s=cfg.ray.write_deadline_s,
            call_attempts=cfg.ray.call_attempts, call_patience_s=cfg.ray.call_timeout_floor_s,
            restart_patience_s=cfg.ray.start_timeout_s,
            timeout_floor_s=cfg.ray.call_timeout_floor_s, timeout_factor=cfg.ray.call_timeout_factor,
            clip_seconds=expected.get("video", 1.0)), seed=hash(out) % 997, more=True)
        self.window = Window(self.core, lambda n: [(p.task, p.fingerprint) for p in feed.take(n)],
                             lambda chunk: flow_order(chunk, cfg, pools.costs, plan.capacity()),
                             (lambda task: None) if cfg.rewriter == "lm" else rewriter.captions,
                             task_window(self.core.admission), reject=self._reject)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.drivers: dict[int, object] = {}
        self.driver_nodes: dict[int, str | None] = {}
        self.clip_refs: dict[int, object] = {}
        self.writer_refs: dict[tuple, tuple[object, str | None]] = {}
        self.writes: list[dict] = []
        self.recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosed-errors")
        self.prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cosed-probe")
        self.probing = None
        self.probed = -PROBE_SECONDS
        self.trace = Trace()
        self.stopped: BaseException | None = None
        self.membership_ref = None
        self.total_tasks = work.tasks
        self.probes = [0, 0, 0, 0]
        self.started = time.monotonic()
        self.latency: dict[str, float] = {}
        self.driver_moves = self.writers_started = 0
        self.shapes = self._process_shapes(nodes_from_ray(ray_nodes), drivers)
        for driver in range(drivers):
            self._new_driver(driver)
        self.warming = self._warm_up()

    def _warm_up(self) -> list:
        """Start the drivers' processes, and a writer process on each node writers go to: a process start
        (imports, codecs) takes seconds, which no task should wait for in the middle of the run. The pools'
        models load meanwhile; `warmed` waits for what is left before the first task."""
        counts: dict[str, int] = {}
        warm = []
        for _ in range(self.core.admission.writers):
            node = host_node(self.hosts, counts)
            counts[node] = counts.get(node, 0) + 1
            warm.append(warm_writer.options(**self._placement("writer", node)).remote())
        return [handle.ready.remote() for handle in self.drivers.values()] + warm

    def warmed(self) -> None:
        ray.wait(self.warming, num_returns=len(self.warming), timeout=self.cfg.ray.start_timeout_s)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        self.pools.begin()  # rebalancing windows count from the first task, not from the start-up
        now = time.monotonic()
        self._push_membership(now)
        self.window.refill()
        self._execute(self.core.start(now))
        last_tick = last_progress = now
        shown = None
        while not self.core.finished and self.stopped is None:
            now = time.monotonic()
            wake = min(last_tick + self.cfg.ray.rescale_seconds, last_progress + PROGRESS_SECONDS,
                       self.core.next_timer() or now + PROGRESS_SECONDS)
            try:
                event = self.events.get(timeout=max(0.0, wake - now))
            except queue.Empty:
                event = None
            while event is not None and self.stopped is None:
                self._execute(self._handle(event, time.monotonic()))
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    event = None
            now = time.monotonic()
            self.window.refill()
            self._execute(self.core.on_tick(now))
            self._storage_pressure(now)
            if self.lease is not None and self.stopped is None:
                try:
                    self.lease.check()
                except LeaseLost as exc:
                    self._execute([Stop(exc)])
            if now - last_tick >= self.cfg.ray.rescale_seconds:
                try:
                    raise_if_stopped()
                except JobStopped as exc:
                    self._execute([Stop(exc)])
                changed = self.pools.tick()
                if self.pools.lend(self.window.exhausted, len(self.core.held), self.core.to_sequence):
                    changed = True
                if changed:
                    self._push_membership(now)
                self._autoscale()
                last_tick = now
            if now - last_progress >= PROGRESS_SECONDS:
                shown = self._report(shown)
                last_progress = now
        if self.progress:
            self._report(shown)

    def _storage_pressure(self, now: float) -> None:
        """Probe the output prefix (one call at a time) and tell the core when throttling begins or ends."""
        if (self.probing is None or self.probing.done()) and now - self.probed >= PROBE_SECONDS:
            self.probing = self.prober.submit(storage.probe, self.out)
            self.probed = now
        active = storage.under_pressure()
        if active != (self.core.pressure_since is not None):
            if active:
                self.trace.paused.append([now, None])
            elif self.trace.paused:
                self.trace.paused[-1][1] = now
            self._execute(self.core.on_storage_pressure(active, now))

    def _handle(self, event, now: float) -> list:
        kind, key, future = event
        if kind == "driver":
            driver, task_key = key
            try:
                events = future.result()
            except ray.exceptions.RayError as exc:
                return self.core.on_driver_lost(driver, task_key, f"driver lost ({type(exc).__name__})", now)
            for _, item in events:
                if isinstance(item, Sequenced):
                    self.probes = [a + b for a, b in zip(self.probes, item.probes)]
            # Poll again only while this attempt runs there: a given-up attempt's poll must never be renewed on
            # the slot's next driver (it would take the next task's events).
            if self.core.sequencing(driver, task_key) and not any(
                    isinstance(e, (Sequenced, DriverFailed)) for k, e in events if k == task_key):
                self._poll(driver, task_key)
            return self.core.on_driver_events(driver, events, now)
        if kind == "clip":
            self.clip_refs.pop(key, None)
            try:
                return self.core.on_clip_result(key, future.result(), None, "", now)
            except BaseException as exc:  # noqa: BLE001  (classified below)
                error, message = _classify(exc)
                if error in ("retry", "restarting"):
                    telemetry.record("cosed_call_retries", 1, pool="video")
                return self.core.on_clip_result(key, None, error, message, now)
        if kind == "writer":
            _, node = self.writer_refs.pop(key, (None, None))
            try:
                written = future.result()
            except BaseException as exc:  # noqa: BLE001
                error, message = _classify(exc, writer=True)
                return self.core.on_writer_result(key, error, message, now)
            self.writes.append(written)
            run = self.core.tasks.get(key[0]) if key in self.core.writing else None  # None: a stale writer
            actions = self.core.on_writer_result(key, None, "", now)
            if run is not None:
                self.summary.done.append(key[0])
                self.summary.scenes += len(run.task.steps)
                telemetry.record("cosed_tasks_finished", 1, outcome="done")
                telemetry.record("cosed_task_latency_s", now - run.started)
            return actions
        if kind == "captions":
            try:
                result = future.result()
            except BaseException as exc:  # noqa: BLE001
                error, message = _classify(exc)
                return self.core.on_captions(key, None, error, message, now)
            return self.core.on_captions(key, list(result.captions), None, "", now)
        raise ValueError(f"unknown event {kind!r}")

    # -- actions -----------------------------------------------------------------------------------------
    def _execute(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, StartTask):
                self._place_driver(action.driver)
                self.trace.started.append((time.monotonic(), action.task.id))
                policy = CallPolicy.from_config(self.cfg.ray, self.pools.expected())
                job = DriverTask(action.key, action.task, action.captions, action.fingerprint, self.out, self.cfg,
                                 policy)
                self.drivers[action.driver].start.remote(job)
                self._poll(action.driver, action.key)
            elif isinstance(action, SendClip):
                handle = self.pools.handle(action.actor)
                if handle is None:  # it left the pool a moment ago: answer for it
                    self.events.put(("clip", action.call, _failed(ray.exceptions.ActorDiedError())))
                    continue
                ref = handle.run.remote(f"clip-{action.call}", "animate", action.request)
                self.clip_refs[action.call] = ref
                self._watch("clip", action.call, ref)
            elif isinstance(action, CancelClip):
                ref = self.clip_refs.pop(action.call, None)
                if ref is not None:
                    _cancel(ref)
            elif isinstance(action, StartWriter):
                self._start_writer(action)
            elif isinstance(action, CancelWriter):
                ref, _ = self.writer_refs.pop(action.key, (None, None))
                if ref is not None:
                    _cancel(ref, force=True)
            elif isinstance(action, ReplaceDriver):
                _kill(self.drivers[action.driver])
                self._refresh_hosts(max_age=REPLACE_REFRESH_S)  # its node may have just left
                self._new_driver(action.driver)
            elif isinstance(action, SendCaptions):
                handle = self.pools.handle(action.actor)
                if handle is None:
                    self.events.put(("captions", action.batch, _failed(ray.exceptions.ActorDiedError())))
                    continue
                request = CaptionRequest(action.pairs, storage.join(self.out, CAPTIONS))
                self._watch("captions", action.batch, handle.run.remote(f"caption-{action.batch}", "caption", request))
            elif isinstance(action, RecordFailure):
                error = TaskError(source="generation", task_id=action.task_id, reason=action.reason)
                self.summary.failed.append(error)
                telemetry.record("cosed_tasks_finished", 1, outcome="failed")
                self.recorder.submit(write_failure, self.out, self.summary.run_id, error)
            elif isinstance(action, Retrying):
                log.warning("task %s: %s; retrying (attempt %d)", action.task_id, action.reason, action.attempt)
                telemetry.record("cosed_task_retries", 1)
            elif isinstance(action, Stop):
                if self.stopped is None:
                    self.stopped = action.reason
                    self.trace.stopped_at = time.monotonic()
                    log.error("stopping the run: %s", action.reason)

    def _watch(self, kind: str, key, ref) -> None:
        ref.future().add_done_callback(lambda future: self.events.put((kind, key, future)))

    def _poll(self, driver: int, key) -> None:
        self._watch("driver", (driver, key), self.drivers[driver].next_events.remote())

    # -- where drivers and writers run ---------------------------------------------------------------
    def _refresh_hosts(self, ray_nodes: list[dict] | None = None, max_age: float | None = None) -> None:
        """The nodes drivers and writers may use now (`policies.host_nodes`), read again when older than
        ``max_age`` (default ``rescale_seconds``): nodes that join get their share, nodes that left get none."""
        now = time.monotonic()
        if ray_nodes is None and now - self.hosts_at < (self.cfg.ray.rescale_seconds if max_age is None else max_age):
            return
        ray_nodes = ray.nodes() if ray_nodes is None else ray_nodes
        self.hosts, self.marked = host_nodes(ray_nodes, self.cfg.ray.writer_nodes)
        self.hosts_at = now

    def _process_shapes(self, nodes, drivers: int) -> dict[str, dict]:
        """Drivers' and writers' requests (CPUs, memory): as configured, lowered to what the host nodes have
        left once the plan's model actors are placed (`policies.process_resources`)."""
        room = {n.node_id: n for n in free_room(self.pools.cluster_plan.pools, nodes)}
        asks = [self.cfg.ray.driver_resources, self.cfg.ray.writer_resources]
        fitted = process_resources([(a.num_cpus, a.memory_gib * 2 ** 30) for a in asks],
                                   [drivers, self.core.admission.writers],
                                   [(room[h].cpus, room[h].memory) for h in self.hosts if h in room])
        return {kind: {"num_cpus": cpus, "memory": int(memory)} for kind, (cpus, memory) in zip(("driver", "writer"),
                                                                                               fitted)}

    def _placement(self, kind: str, node: str | None) -> dict:
        """Ray options of a driver or writer bound for ``node``: its requests, a soft affinity that spills
        (where the node is gone, or busy with the model actors grown onto it, Ray places it on another node
        with room now instead of waiting there), and on marked clusters the worker resource, which keeps
        that other node off the head."""
        options = dict(self.shapes[kind])
        if self.marked:
            options["resources"] = {WORKER_RESOURCE: 0.001}
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True,
                                                                            _spill_on_unavailable=True)
        return options

    def _new_driver(self, driver: int) -> None:
        self._refresh_hosts()
        node = host_node(self.hosts, _count(n for d, n in self.driver_nodes.items() if d != driver))
        self.drivers[driver] = TaskDriver.options(**self._placement("driver", node)).remote()
        self.driver_nodes[driver] = node
        if self.membership_ref is not None:
            self.drivers[driver].update.remote(self.membership_ref)

    def _place_driver(self, driver: int) -> None:
        """An idle driver about to take a task moves first when `policies.driver_destination` says so (its
        node left, or a node that joined has two drivers fewer): it has no task and no call outstanding."""
        self._refresh_hosts()
        if driver_destination(self.driver_nodes.get(driver), self.hosts, _count(self.driver_nodes.values())):
            _kill(self.drivers[driver])
            self._new_driver(driver)
            self.driver_moves += 1

    def _start_writer(self, action: StartWriter) -> None:
        self._refresh_hosts()
        self.writers_started += 1
        node = host_node(self.hosts, _count(node for _, node in self.writer_refs.values()), self.writers_started)
        options = self._placement("writer", node)
        started_wall = time.time() - (time.monotonic() - action.started)
        ref = write_task.options(max_retries=self.cfg.ray.task_retries + 1, retry_exceptions=False, **options).remote(
            self.out, action.task, action.fingerprint, self.profile, self.cfg,
            self.lease.fence if self.lease else None, started_wall)
        self.writer_refs[action.key] = (ref, node)
        self._watch("writer", action.key, ref)

    def _push_membership(self, now: float) -> None:
        """New members to every driver (one object, put once) and to the core (the pools the job calls)."""
        membership = self.pools.membership()
        self.membership_ref = ray.put(membership)
        for handle in self.drivers.values():
            handle.update.remote(self.membership_ref)
        for kind in ("video", CAPTION):
            if kind in self.pools.plan:
                self._execute(self.core.on_members(kind, list(membership.members.get(kind, {})), now))

    def _reject(self, task, exc: Exception) -> None:
        """A task whose captions cannot be made: failed before it starts, recorded like any failure."""
        error = TaskError(source="generation", task_id=task.id, reason=f"{type(exc).__name__}: {exc}")
        self.summary.failed.append(error)
        self.recorder.submit(write_failure, self.out, self.summary.run_id, error)

    def _autoscale(self) -> None:
        left = self.core.live + (0 if self.window.exhausted else self.feed.estimated_pending())
        if self.autoscale.gpus and left:
            share = left / max(1, self.work.tasks)
            self.autoscale.ask(wanted_gpus(resolve_autoscale_max_gpus(self.cfg.ray.autoscale_max_gpus),
                                           self.work.total * share,
                                           self.work.critical_path / self.work.tasks, left))

    # -- the end -----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop drivers, clip calls and writers still running (a stopped run); wait for failure records."""
        for handle in self.drivers.values():
            _kill(handle)
        for ref in self.clip_refs.values():
            _cancel(ref)
        for ref, _ in self.writer_refs.values():
            _cancel(ref, force=True)
        self.recorder.shutdown(wait=True)
        self.prober.shutdown(wait=False, cancel_futures=True)

    def report(self) -> dict:
        calls, probes, claims, releases = self.probes
        nodes = {w.get("node_id") for w in self.writes}
        return {"writer_peak_bytes": max((w["peak_bytes"] for w in self.writes), default=0),
                "writer_nodes": sorted(n for n in nodes if n),
                "driver_nodes": sorted({n for n in self.driver_nodes.values() if n}), "driver_moves": self.driver_moves,
                "process_resources": self.shapes,
                "dispatch_messages_per_call": round((probes + claims + releases) / calls, 3) if calls else 0.0,
                "job_events": self.core.events,
                "storage_pauses": self.core.storage_pauses,
                "storage_paused_s": round(self.core.storage_paused_s + (
                    0.0 if self.core.pressure_since is None else time.monotonic() - self.core.pressure_since), 1),
                "trace": {"started": [(round(t - self.started, 3), task) for t, task in self.trace.started],
                          "stopped_at": None if self.trace.stopped_at is None
                          else round(self.trace.stopped_at - self.started, 3),
                          "paused": [[round(t - self.started, 3) if t is not None else None for t in span]
                                     for span in self.trace.paused]}}

    def _report(self, shown):
        core = self.core
        for state, count in core.counts.items():
            telemetry.record("cosed_tasks", count, state=state)
        key = (core.scenes_chosen, core.counts["done"], core.counts["failed"])
        if self.progress and key != shown:
            after = core.past_sequencing
            print(f"[cosed] {core.scenes_chosen} scenes chosen, tasks: about {self.total_tasks} to do, "
                  f"{core.scenes_written} written; tasks: {core.counts['done']} done, {core.counts['failed']} failed, "
                  f"{after} rendering or writing", flush=True)
        return key


def _classify(exc: BaseException, writer: bool = False) -> tuple[str, str]:
    """(kind, message) of a remote failure: retry (the actor, its node or the call's delivery failed), lost
    (a writer's process kept dying), storage, lease, or fatal (the call itself failed)."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    message = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    if isinstance(cause, StorageUnavailable):
        return "storage", str(cause)
    if isinstance(cause, LeaseLost):
        return "lease", str(cause)
    if isinstance(exc, ray.exceptions.ActorUnavailableError) and not writer:
        return "restarting", message  # retried like ``retry``, with a model load's patience
    if isinstance(exc, RETRYABLE) or isinstance(exc, ray.exceptions.RayError) and \
            not isinstance(exc, ray.exceptions.RayTaskError):
        return ("lost" if writer else "retry"), message
    return "fatal", message


def _failed(exc: BaseException):
    from concurrent.futures import Future

    future: Future = Future()
    future.set_exception(exc)
    return future


def _count(nodes) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node] = counts.get(node, 0) + 1
    return counts


def _kill(handle) -> None:
    try:
        ray.kill(handle)
    except Exception:
        pass


def _cancel(ref, force: bool = False) -> None:
    try:
        ray.cancel(ref, force=force)
    except Exception:
        pass


