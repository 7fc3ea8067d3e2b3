"""Benchmark of captioning: `Captioner.caption_pairs` in process at batch sizes 1 and 8, and the Ray caption pool.

Every run captions the same pairs into a fresh cache root, so every caption is generated. Prints
captions per second and seconds per generate call for each batch size, and the fit of seconds
per call as ``fixed + per_item x captions`` (the layout of a profile's ``costs.caption``). With
``--ray N`` it also starts a local Ray cluster with N caption actors (the run's caption pool:
`ModelWorker` of kind ``caption``) and sends the pairs as the job does, eight to a `CaptionRequest`,
all at once: captions per second of the pool, beside the in-process figure.
Ratios are measured within one run; a machine shared with other work makes them noisy.

    python ray_jobs/bench_captions.py [--pairs captions_eval.json] [--limit 64] [--ray 2] \
        [--rewriter-model tiny:captioner|FOLDER|ID] [--profile tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cosed import storage
from cosed.captioner import Captioner, CaptionerConfig
from cosed.caption_eval import parse_pairs
from cosed.cli import add_run_options, config_from_args, example_tasks_path
from cosed.models.loaders import resolve_device
from cosed.runner import profile_cache, resolve_run


def example_pairs() -> list[tuple[str, str]]:
    """(previous step, step) windows from the bundled example tasks, when no pairs file is given."""
    pairs = []
    for line in Path(example_tasks_path()).read_text(encoding="utf-8").splitlines():
        steps = json.loads(line)["steps"]
        pairs += list(zip([""] + steps[:-1], steps))
    return pairs


def run(source: str, pairs: list[tuple[str, str]], batch_size: int, device, cache_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as root:
        captioner = Captioner(source, device=device, cache_dir=cache_dir, cache_root=root,
                              config=CaptionerConfig(batch_size=batch_size)).load()
        captioner._generate(pairs[:1])  # warm-up: the first call pays one-off costs
        captioner.generate_calls = captioner.generated = 0
        start = time.perf_counter()
        captioner.caption_pairs(pairs)
        seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "captions": captioner.generated, "calls": captioner.generate_calls,
            "seconds": seconds, "per_second": captioner.generated / seconds,
            "per_call": seconds / captioner.generate_calls}


def on_ray(cfg, pairs: list[tuple[str, str]], actors: int) -> dict:
    """Captions per second of a caption pool of ``actors`` on a local Ray cluster, fed as the job feeds it."""
    import os

    import ray

    from cosed.calls import CaptionRequest
    from cosed.distributed.actors import remote_worker

    ray.init(address="local", num_cpus=max(2, actors), logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"COSED_CACHE": os.environ.get("COSED_CACHE", "")}} if "COSED_CACHE" in os.environ
             else None)
    try:
        pool = [remote_worker("caption").options(num_cpus=1).remote("caption", cfg, ("caption",))
                for _ in range(actors)]
        ray.get([a.info.remote() for a in pool])  # loaded
        with tempfile.TemporaryDirectory() as root:
            warm = [a.run.remote("warm", "caption", CaptionRequest(tuple(pairs[:1]), root + "/warm")) for a in pool]
            ray.get(warm)
            start = time.perf_counter()
            batches = [tuple(pairs[i:i + 8]) for i in range(0, len(pairs), 8)]
            done = ray.get([pool[i % actors].run.remote(f"c{i}", "caption", CaptionRequest(batch, root + "/run"))
                            for i, batch in enumerate(batches)])
            seconds = time.perf_counter() - start
        generated = sum(d.generated for d in done)
        return {"actors": actors, "captions": generated, "seconds": seconds, "per_second": generated / seconds}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help="Alpaca-format pairs (default: windows of the bundled example tasks)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--ray", type=int, default=0, metavar="N", help="also time a Ray caption pool of N actors")
    add_run_options(parser)
    args = parser.parse_args()
    profile, cfg = resolve_run(config_from_args(args))
    source = cfg.rewriter_model or profile.caption_model
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)  # as every in-process run and actor does
    pairs = ([(p, c) for p, c, _ in parse_pairs(storage.read_bytes(args.pairs))] if args.pairs else example_pairs())
    pairs = list(dict.fromkeys(pairs))[: args.limit]
    results = [run(source, pairs, size, device, profile_cache(cfg)) for size in (1, 8)]
    print(f"captioner {source} on {device} ({torch.get_num_threads()} CPU threads), {len(pairs)} pairs")
    print(f"{'batch':>5}{'captions/s':>12}{'s per call':>12}{'calls':>7}")
    for r in results:
        print(f"{r['batch_size']:>5}{r['per_second']:>12.2f}{r['per_call']:>12.3f}{r['calls']:>7}")
    one, eight = results
    per_item = max(0.0, (eight["per_call"] - one["per_call"]) / 7)
    print(f"cost entry: {{\"fixed\": {one['per_call'] - per_item:.3f}, \"per_item\": {per_item:.4f}}} "
          f"(seconds per generate call; batch 8 is {eight['per_second'] / one['per_second']:.2f}x batch 1)")
    if args.ray:
        import dataclasses

        pool = on_ray(dataclasses.replace(cfg, rewriter="lm", rewriter_model=source), pairs, args.ray)
        print(f"Ray caption pool of {pool['actors']}: {pool['per_second']:.2f} captions/s "
              f"({pool['captions']} captions in {pool['seconds']:.1f} s; in process at batch 8: "
              f"{eight['per_second']:.2f}/s)")


if __name__ == "__main__":
    main()
