"""The ``cosed`` command: ``cosed demo`` and ``cosed generate``."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

from cosed.config import RunConfig, load_config
from cosed.models.profiles import ModelUnavailable, available_profiles

EXAMPLES = "examples/tasks.jsonl"


def example_tasks_path() -> str:
    return str(resources.files("cosed").joinpath(EXAMPLES))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every verb that generates: profile, seed, config and the common overrides."""
    parser.add_argument("--profile", help=f"{' | '.join(available_profiles())} | FOLDER (default: tiny)")
    parser.add_argument("--seed", type=int, help="run seed; every random draw derives from it (default 0)")
    parser.add_argument("--config", help="YAML file with RunConfig fields (sd:, pool:, video:, ...)")
    parser.add_argument("--rewriter", choices=["identity", "template", "lm"], help="caption rewriter (default template)")
    parser.add_argument("--rewriter-model", help="hub id or folder of the lm rewriter's model")
    parser.add_argument("--selector", help="trained selector checkpoint (.safetensors); default: untrained")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--cache-dir", help="where tiny models and caption caches live (default ~/.cache/cosed)")
    parser.add_argument("--overwrite", action="store_true", help="redo tasks whose manifest already exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, {
        "profile": args.profile, "seed": args.seed, "rewriter": args.rewriter,
        "rewriter_model": args.rewriter_model, "selector": args.selector, "device": args.device,
        "cache_dir": args.cache_dir,
    })


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosed", description="Coherent multi-scene videos from step-by-step tasks (CoSeD).")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="the bundled example tasks on the offline tiny profile")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    add_run_options(demo)
    generate = verbs.add_parser("generate", help="generate videos for a task file (JSONL or recipes JSON, local or s3://)")
    generate.add_argument("--tasks", required=True, help="tasks file: path or s3://bucket/key")
    generate.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    generate.add_argument("--no-ray", action="store_true", help="run in this process instead of on Ray")
    generate.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    add_run_options(generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from cosed.runner import run_in_process

    try:
        cfg = config_from_args(args)
        if args.verb == "demo":
            summary = run_in_process(example_tasks_path(), args.out, cfg, overwrite=args.overwrite,
                                     progress=not args.quiet)
        elif args.no_ray:
            summary = run_in_process(args.tasks, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
        else:
            from cosed.distributed.job import run_on_ray

            summary = run_on_ray(args.tasks, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet,
                                 address=args.address)
    except (ModelUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"cosed: error: {exc}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 1 if summary.failed or summary.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
