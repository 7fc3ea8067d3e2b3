"""Cluster efficiency: the real Ray job on logical GPUs with latency-simulating models, vs the GPU-seconds bound.

    python ray_jobs/bench_cluster.py [--tasks FILE | --recipes 200] [--gpus 4 8 16] [--policies cost legacy]
                                     [--target-seconds 60] [--json PATH] [--single-task-steps 2]

Runs the `latency` profile (each model call sleeps for its modeled A100-class time, times a
scale factor) on a local Ray cluster declared with G logical GPUs, once per G and pool policy:
``cost`` (pools sized by expected GPU-seconds) and ``legacy`` (the earlier even split). Step
counts come from the tasks file, by default the first N of ../shared/data/recipes/dataset.json.

For each run it prints the pool plan, the makespan, the GPU-seconds bound (all modeled GPU work
with SD images in full batches, over G), efficiency = bound / makespan, mean task latency and
each pool's busy fraction, and beside the makespan the one `cosed plan` predicts for the same
tasks, cluster and policy (the runtime's policies in virtual time, `cosed.distributed.simulator`). Times are in modeled seconds (wall seconds / time scale); the time
scale is chosen per G so that the bound takes ``--target-seconds`` of wall time. The makespan
runs from the first task's start to the last manifest, so pool start-up is not counted.
``--single-task-steps N`` also runs one task of N steps alone (time scale ``--single-task-scale``, default 1)
with one actor per pool and compares it with the modeled critical path (what Ray adds to a task).
``--transitions keyframe`` runs everything with keyframe transitions (each clip waits for the next scene's
choice); with ``--gpus`` given no sizes only the single-task check runs, e.g. to measure the latency keyframe
transitions add against the run without::

    python ray_jobs/bench_cluster.py --tasks T.jsonl --gpus --single-task-steps 3 --single-task-scale 0.1
    python ray_jobs/bench_cluster.py --tasks T.jsonl --gpus --single-task-steps 3 --single-task-scale 0.1 \
        --transitions keyframe
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
from pathlib import Path

import ray

from cosed.config import PoolResources, RayConfig, RunConfig
from cosed.distributed.costs import CostModel, batch_work, full_batch_seconds, task_work
from cosed.distributed.job import run_on_ray
from cosed.distributed.simulator import Cluster, Overheads, simulate
from cosed.runner import read_tasks, resolve_run

# What the models leave out, in wall seconds on this machine (divided by the time scale for the prediction):
# a model call's Ray round trips, a replacement actor's process start, a writer assembling a small task.
CALL_WALL_S, START_WALL_S, WRITER_WALL_S = 0.003, 3.0, 0.3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import SHARED_RECIPES, recipes_file  # noqa: E402

KINDS = ("sd", "video", "clip")


def start_cluster(gpus: int, cpus: int, time_scale: float) -> None:
    ray.init(address="local", num_gpus=gpus, num_cpus=cpus, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"COSED_TIME_SCALE": repr(time_scale)}})


def task_times(out: Path) -> list[tuple[float, float]]:
    """(start, end) wall times of every finished task: manifest written last, its total timing."""
    spans = []
    for manifest in out.glob("*/manifest.json"):
        end = manifest.stat().st_mtime
        spans.append((end - json.loads(manifest.read_text())["timings"]["total"], end))
    return spans


def run_once(tasks: str, out: Path, cfg: RunConfig, gpus: int, cpus: int, time_scale: float,
             bound_s: float) -> dict:
    start_cluster(gpus, cpus, time_scale)
    try:
        summary = run_on_ray(tasks, str(out), cfg, progress=False)
    finally:
        ray.shutdown()
    spans = task_times(out)
    if not spans:
        raise SystemExit(f"G={gpus} {cfg.ray.policy}: no task finished ({len(summary.failed)} failed; see above)")
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    plan = summary.extra["plan"]
    busy = {}
    for kind in KINDS:
        actors = [a for a in summary.actors if a["kind"] == kind]
        # over the time each actor was up during the makespan (a moved actor counts only while it served)
        busy[kind] = round(sum(a["busy"] for a in actors) / sum(min(a["alive"], wall) for a in actors), 3) \
            if actors else 0.0
    makespan = wall / time_scale
    return {"gpus": gpus, "policy": cfg.ray.policy, "tasks": len(summary.done), "failed": len(summary.failed),
            "efficiency": round(bound_s / makespan, 4), "makespan_s": round(makespan, 1), "bound_s": round(bound_s, 1),
            "mean_latency_s": round(sum(e - s for s, e in spans) / len(spans) / time_scale, 1),
            "busy": busy, "time_scale": time_scale, "drivers": plan["drivers"],
            "moves": [f"{m['from']}->{m['to']}" for m in summary.extra["moves"]],
            "lent": summary.extra["pools"].get("video", {}).get("lent", 0),
            "plan": {k: [p["replicas"], p["num_gpus"]] for k, p in plan["pools"].items()}}


def single_task(tasks_file: str, steps: int, cpus: int, folder: Path, transitions: str = "cut",
                scale: float = 1.0) -> dict:
    """One task alone, one actor per pool: measured latency (modeled seconds) vs the modeled critical path."""
    chosen = next(t for t in read_tasks(tasks_file, RunConfig()).tasks if len(t.steps) == steps)
    path = folder / "single.jsonl"
    path.write_text(json.dumps({"id": chosen.id, "title": chosen.title, "steps": list(chosen.steps)}) + "\n")
    one = PoolResources(replicas=1)
    cfg = RunConfig(profile="latency", ray=RayConfig(sd=one, video=one, clip=one), transitions=transitions)
    profile, resolved = resolve_run(cfg)
    modeled = task_work(steps, resolved, CostModel.from_dict(profile.costs)).critical_path
    start_cluster(2, cpus, scale)
    try:
        run_on_ray(str(path), str(folder / "single"), cfg, progress=False)
    finally:
        ray.shutdown()
    (start, end), = task_times(folder / "single")
    measured = (end - start) / scale
    return {"steps": steps, "transitions": transitions, "time_scale": scale, "measured_s": round(measured, 2),
            "critical_path_s": round(modeled, 2), "overhead": round(measured / modeled - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help="tasks file (JSONL or recipes JSON); default: the shared recipes")
    parser.add_argument("--recipes", type=int, default=200, help="how many shared recipes, without --tasks")
    parser.add_argument("--gpus", type=int, nargs="*", default=[4, 8, 16], help="cluster sizes (none: skip them)")
    parser.add_argument("--policies", nargs="+", default=["cost", "legacy"], choices=["cost", "legacy"])
    parser.add_argument("--placements", nargs="+", default=["pooled"], choices=["pooled", "shared"],
                        help="ray.placement of each run (shared: idle SD actors take the last clips)")
    parser.add_argument("--tick-seconds", type=float, default=0.25,
                        help="wall seconds between the job's pool checks (ray.rescale_seconds; the prediction uses "
                             "the same tick in modeled seconds)")
    parser.add_argument("--target-seconds", type=float, default=60.0, help="wall seconds of the bound per run")
    parser.add_argument("--cpus", type=int, default=64, help="logical CPUs declared to Ray (actors mostly sleep)")
    parser.add_argument("--single-task-steps", type=int, default=0, help="also run the single-task check")
    parser.add_argument("--drivers", type=int, help="concurrent tasks (default: what the plan derives)")
    parser.add_argument("--transitions", default="cut", choices=["cut", "dissolve", "keyframe"])
    parser.add_argument("--single-task-scale", type=float, default=1.0, help="time scale of the single-task check")
    parser.add_argument("--json", help="write one record per G and policy here")
    args = parser.parse_args()

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.tasks and not SHARED_RECIPES.is_file():
            raise SystemExit(f"no --tasks given and the shared recipes are not at {SHARED_RECIPES}")
        tasks = args.tasks or recipes_file(args.recipes, folder)
        profile, resolved = resolve_run(RunConfig(profile="latency", transitions=args.transitions))
        costs = CostModel.from_dict(profile.costs)
        task_list = read_tasks(tasks, resolved).tasks
        work = batch_work((len(t.steps) for t in task_list), resolved, costs)
        gpu_seconds = full_batch_seconds(work, resolved, costs)
        print(f"{len(task_list)} tasks, {sum(len(t.steps) for t in task_list)} scenes; modeled GPU-seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in work.seconds.items())
              + f"; with full SD batches {gpu_seconds:.0f}", flush=True)
        for gpus in args.gpus:
            bound = gpu_seconds / gpus
            scale = args.target_seconds / bound
            for policy, placement in itertools.product(args.policies, args.placements):
                # The legacy policy is the earlier runtime's plan: fixed, never rebalanced.
                cfg = RunConfig(profile="latency", transitions=args.transitions, ray=dataclasses.replace(
                    RayConfig(), policy=policy, max_concurrent_tasks=args.drivers or "auto", rebalance=policy == "cost",
                    placement=placement, rescale_seconds=args.tick_seconds))
                record = run_once(tasks, folder / f"g{gpus}-{policy}-{placement}", cfg, gpus, args.cpus, scale, bound)
                record["placement"] = placement
                _, resolved_cfg = resolve_run(cfg)  # the runtime's tick, in modeled seconds
                resolved_cfg = dataclasses.replace(resolved_cfg, ray=dataclasses.replace(
                    resolved_cfg.ray, rescale_seconds=args.tick_seconds / scale))
                predicted = simulate([len(t.steps) for t in task_list], resolved_cfg, costs,
                                     Cluster(gpus=gpus, gpus_per_node=gpus, cpus_per_node=args.cpus),
                                     Overheads(call_s=CALL_WALL_S / scale, actor_start_s=START_WALL_S / scale,
                                               writer_s=WRITER_WALL_S / scale))
                record["predicted_makespan_s"] = predicted.makespan_s
                record["predicted_efficiency"] = predicted.efficiency
                record["prediction_error"] = round(predicted.makespan_s / record["makespan_s"] - 1, 4)
                records.append(record)
                print(f"G={gpus:>2} {policy:<6} {placement:<6} plan {record['plan']} drivers {record['drivers']}: "
                      f"makespan {record['makespan_s']:.0f} s (predicted {record['predicted_makespan_s']:.0f} s, "
                      f"{record['prediction_error']:+.1%}), bound {record['bound_s']:.0f} s, "
                      f"efficiency {record['efficiency']:.1%}, mean latency {record['mean_latency_s']:.0f} s, "
                      f"busy {record['busy']}, moves {record['moves'] or 'none'}, SD actors lent {record['lent']}, "
                      f"{record['tasks']} done {record['failed']} failed", flush=True)
        single = single_task(tasks, args.single_task_steps, args.cpus, folder, args.transitions,
                             args.single_task_scale) if args.single_task_steps else None

    print("\n| G | policy | placement | plan (replicas, GPUs each) | makespan s | predicted s | bound s | efficiency | tasks/GPU-h "
          "| mean latency s | busy sd / video / clip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        per_gpu_hour = r["tasks"] / (r["makespan_s"] * r["gpus"]) * 3600
        plan = ", ".join(f"{k} {n}x{g:g}" for k, (n, g) in r["plan"].items())
        print(f"| {r['gpus']} | {r['policy']} | {r['placement']} | {plan} | {r['makespan_s']:.0f} | "
              f"{r['predicted_makespan_s']:.0f} ({r['prediction_error']:+.1%}) | {r['bound_s']:.0f} | "
              f"{r['efficiency']:.1%} | {per_gpu_hour:.2f} | {r['mean_latency_s']:.0f} | "
              + " / ".join(f"{r['busy'][k]:.2f}" for k in KINDS) + " |")
    if single:
        print(f"\nsingle task ({single['steps']} steps, {single['transitions']}, one actor per pool, time scale "
              f"{single['time_scale']:g}): {single['measured_s']} s "
              f"vs modeled critical path {single['critical_path_s']} s: Ray adds {single['overhead']:+.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "single_task": single}, indent=2) + "\n")


if __name__ == "__main__":
    main()
