"""Benchmark of the in-process engine: per-scene cost split and candidate batching.

Runs the same tasks twice on the same loaded models: with candidates batched
through the UNet (the configured ``sd.batch_size``) and with one candidate per
pipeline call (the baseline). Prints seconds per scene for each phase and the
speedup as a ratio measured in this run.

    python ray_jobs/bench_engine.py [--tasks FILE] [--profile tiny] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from cosed.backend import LocalBackend
from cosed.cli import add_run_options, config_from_args, example_tasks_path
from cosed.runner import resolve_run, run_in_process

PHASES = ("sd", "clip_select", "video", "stitch")


def run(tasks: str, cfg, backend, batch_size: int) -> dict:
    cfg = dataclasses.replace(cfg, sd=dataclasses.replace(cfg.sd, batch_size=batch_size))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_in_process(tasks, out, cfg, progress=False, backend=backend, overwrite=True)
        wall = time.perf_counter() - start
        totals = dict.fromkeys(PHASES, 0.0)
        candidates = 0
        for path in Path(out).glob("*/manifest.json"):
            manifest = json.loads(path.read_text())
            for phase in PHASES:
                totals[phase] += manifest["timings"].get(phase, 0.0)
            candidates += sum(len(s["candidates"]) for s in manifest["steps"])
    return {"wall": wall, "scenes": summary.scenes, "candidates": candidates, **totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=example_tasks_path())
    parser.add_argument("--batch-size", type=int, default=8)
    add_run_options(parser)
    args = parser.parse_args()
    profile, cfg = resolve_run(config_from_args(args))
    backend = LocalBackend(profile, cfg)
    backend.load_all()
    run(args.tasks, cfg, backend, args.batch_size)  # warm-up: first calls pay one-off costs
    batched = run(args.tasks, cfg, backend, args.batch_size)
    single = run(args.tasks, cfg, backend, 1)
    scenes = batched["scenes"]
    print(f"profile {profile.name} on {backend.device}: {scenes} scenes, {batched['candidates']} candidates")
    print(f"{'seconds per scene':<22}{'batched':>10}{'1 per call':>12}")
    for phase in PHASES + ("wall",):
        print(f"{phase:<22}{batched[phase] / scenes:>10.3f}{single[phase] / scenes:>12.3f}")
    print(f"candidate batching speedup (SD phase): {single['sd'] / batched['sd']:.2f}x")
    print(f"end-to-end speedup: {single['wall'] / batched['wall']:.2f}x")


if __name__ == "__main__":
    main()
