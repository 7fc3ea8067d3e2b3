"""Throughput: scenes per minute on Ray vs in-process, same tasks and seeds, in one run.

    python ray_jobs/bench_throughput.py [--tasks FILE | --recipes N] [--profile tiny] [--address ADDR]

With no --tasks it takes the first N recipes of ../shared/data/recipes/dataset.json (the team's
data set, not shipped). Prints both rates, their ratio, and the Ray pools' busy fractions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cosed.cli import add_run_options, config_from_args
from cosed.distributed.job import run_on_ray
from cosed.runner import run_in_process

SHARED_RECIPES = Path(__file__).resolve().parents[2] / "shared" / "data" / "recipes" / "dataset.json"


def recipes_file(count: int, folder: Path) -> str:
    if not SHARED_RECIPES.is_file():
        raise SystemExit(f"no --tasks given and the shared recipes are not at {SHARED_RECIPES}")
    recipes = json.loads(SHARED_RECIPES.read_text())
    lines = [json.dumps({"id": key, **{k: recipes[key][k] for k in ("title", "steps")}})
             for key in sorted(recipes, key=int)[:count]]
    path = folder / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks")
    parser.add_argument("--recipes", type=int, default=8)
    parser.add_argument("--address")
    add_run_options(parser)
    args = parser.parse_args()
    cfg = config_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = args.tasks or recipes_file(args.recipes, Path(tmp))
        local = run_in_process(tasks, f"{tmp}/local", cfg, progress=False)
        on_ray = run_on_ray(tasks, f"{tmp}/ray", cfg, progress=False, address=args.address)
    print(f"{local.scenes} scenes from {len(local.done)} tasks (wall time includes model loading)")
    print(f"in-process: {local.scenes_per_minute:.1f} scenes/min ({local.seconds:.1f} s)")
    print(f"ray:        {on_ray.scenes_per_minute:.1f} scenes/min ({on_ray.seconds:.1f} s)")
    print(f"ray / in-process: {on_ray.scenes_per_minute / local.scenes_per_minute:.2f}x")
    print(f"pools: {on_ray.extra['pools']}")
    print(f"busy fraction: {on_ray.extra['busy_fraction']}")


if __name__ == "__main__":
    main()
