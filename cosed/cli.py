"""The ``cosed`` command: ``cosed demo`` and ``cosed generate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

from cosed.config import RunConfig, load_config
from cosed.errors import UserError
from cosed.models.profiles import ModelUnavailable, available_profiles

# Problems found before any work: one line, exit 2 (README, *Failure model*).
USER_ERRORS = (UserError, ModelUnavailable, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError, ValueError)

EXAMPLES = "examples/tasks.jsonl"
METHODS = ("cosed", "independent", "chain", "previous", "mora", "t2v", "talc")  # `cosed.evaluate.METHOD_POOLS`, and chain's old name


def example_tasks_path() -> str:
    return str(resources.files("cosed").joinpath(EXAMPLES))


PROFILE_HELP = f"{' | '.join(available_profiles())} | FOLDER"
TASKS_HELP = ("tasks: a file, or a folder or s3:// prefix of .jsonl, .json and .parquet shards "
              "(Parquet: pip install 'cosed[parquet]')")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where its help does not already say it (and it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_model_options(parser: argparse.ArgumentParser, profile_default: str = "tiny") -> None:
    """Which models, from where: every verb that loads or checks models."""
    parser.add_argument("--profile", help=f"{PROFILE_HELP} (default: {profile_default})")
    parser.add_argument("--config", help="YAML file with RunConfig fields (sd:, pool:, video:, ...)")
    parser.add_argument("--cache-dir", help="where tiny models and caption caches live (default ~/.cache/cosed)")


def add_run_options(parser: argparse.ArgumentParser, profile_default: str = "tiny", outputs: bool = True) -> None:
    """Options of every verb that generates: models, seed, captions, selector, device; with ``outputs``, how
    existing outputs are treated and progress."""
    add_model_options(parser, profile_default)
    parser.add_argument("--seed", type=int, help="run seed; every random draw derives from it (default 0)")
    parser.add_argument("--preset", choices=["paper", "legacy"],
                        help="bundle of settings under --config and flags: paper (the authors' reference: negative "
                             "prompt, fresh image as selector key, pool iterations 2-4, ...; README 'Presets') or "
                             "legacy (before the paper preset). Default: paper for generate, evaluate and "
                             "reproduce, legacy elsewhere")
    parser.add_argument("--rewriter", choices=["identity", "template", "given", "lm"],
                        help="caption rewriter (default template; train-selector and evaluate default to given "
                             "when every task carries captions)")
    parser.add_argument("--rewriter-model", help="the lm rewriter's captioner: hub id, folder (e.g. trained by "
                                                 "train-captioner) or tiny:captioner; default: the profile's")
    parser.add_argument("--selector", help="trained selector checkpoint (.safetensors); default: untrained")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--transitions", choices=["cut", "dissolve", "keyframe"],
                        help="how scenes meet: cut (default), dissolve (a cross-fade of --transition-frames), keyframe "
                             "(each clip also ends on the next scene's image; LTX-Video profiles)")
    parser.add_argument("--transition-frames", type=int, help="frames of each dissolve (default 4)")
    if outputs:
        parser.add_argument("--overwrite", action="store_true", help="redo tasks whose manifest already exists")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


PAPER_PRESET_VERBS = ("generate", "evaluate", "reproduce")  # where --preset defaults to paper (cosed.presets)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from cosed.presets import DEFAULT_PRESET

    return load_config(getattr(args, "config", None), {
        name.replace("-", "_"): getattr(args, name, None)
        for name in ("preset", "profile", "seed", "rewriter", "rewriter_model", "selector", "device", "cache_dir",
                     "transitions", "transition_frames")},
        default_preset=DEFAULT_PRESET if getattr(args, "verb", None) in PAPER_PRESET_VERBS else None)


def verb(verbs, name: str, help: str) -> argparse.ArgumentParser:
    return verbs.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                            formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosed", description="Coherent multi-scene videos from step-by-step tasks "
                                                               "(CoSeD).", formatter_class=HelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verb(verbs, "demo", "the bundled example tasks on the offline tiny profile")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    add_run_options(demo)
    generate = verb(verbs, "generate", "generate videos for a task file (JSONL or recipes JSON, local or s3://)")
    generate.add_argument("--tasks", required=True, help=TASKS_HELP)
    generate.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    generate.add_argument("--replan", action="store_true",
                          help="plan memory savers for this cluster's GPUs instead of the output's stored run plan "
                               "(redoes the tasks whose bytes that changes)")
    generate.add_argument("--method", choices=list(METHODS),
                          help="cosed (the paper), independent (a fresh seed per step: SD + SVD), chain (Bordalo et "
                               "al.'s latent chaining; previous: its old name) or mora (each scene starts from the "
                               "previous clip's last frame) or t2v (each caption straight to the profile's text-to-video model, "
                               "LTX-Video; SVD has none) or talc (one LTX-Video generation per task, scene i's frames attending "
                               "to caption i only); default: cosed, with --config's pool settings")
    add_ray_options(generate)
    add_run_options(generate, profile_default="tiny; required where GPUs are present")
    train = verb(verbs, "train-selector", "train the contrastive selector (in-batch contrastive, Eq. 9)")
    train.add_argument("--tasks", required=True, help="tasks with step_images, or any tasks with --generate-missing")
    train.add_argument("--out", required=True, help="folder or s3:// prefix for selector.safetensors + selector.json")
    train.add_argument("--generate-missing", action="store_true", help="render step images for tasks that have none")
    train.add_argument("--epochs", type=int, default=10, help="passes over the training tasks")
    train.add_argument("--batch-size", type=int, default=500, help="step queries per in-batch contrastive batch")
    train.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    train.add_argument("--temperature", type=float, default=1.0,
                       help="divides Eq. 7 logits in training and, saved in the checkpoint, at scoring (default 1)")
    train.add_argument("--holdout", type=float, default=0.2,
                       help="fraction of tasks held out (whole title groups); ids saved in split.json")
    add_ray_options(train)
    add_run_options(train)
    evaluate = verb(verbs, "evaluate", "compare independent / chain / cosed on the same tasks and seeds")
    evaluate.add_argument("--tasks", required=True, help=TASKS_HELP)
    evaluate.add_argument("--out", required=True, help="run folder: METHOD/<task>/..., metrics.csv, summary.json, "
                                                       "measures.md, plots/, report.html; with scene images also "
                                                       "METHOD-no-scene-image/ (each method without them)")
    evaluate.add_argument("--methods", default="independent,chain,cosed",
                          help="comma list of pool policies (previous: the old name of chain)")
    evaluate.add_argument("--variants", help="selector variants to ablate, comma list of untrained, trained "
                                             "(needs --selector), clip, text, image; default: the configured one")
    evaluate.add_argument("--refuse-trained-tasks", action="store_true",
                          help="stop (exit 2) when --selector was trained on any of these tasks (its split.json)")
    add_ray_options(evaluate)
    add_run_options(evaluate)
    captions = verb(verbs, "eval-captions", "score caption rewriters against reference captions")
    captions.add_argument("--pairs", required=True, help="Alpaca-format pairs (captions_eval.json layout)")
    captions.add_argument("--rewriters", default="identity,template", help="comma list of identity, template, lm")
    captions.add_argument("--limit", type=int, help="only the first N pairs")
    captions.add_argument("--out", help="write the scores as JSON here")
    add_model_options(captions)
    captions.add_argument("--rewriter-model", help="the lm rewriter's captioner (default: the profile's)")
    captions.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    add_train_captioner(verbs)
    reproduce = verb(verbs, "reproduce", "every method on the same tasks and seeds, then the paper's Table 1 and "
                                         "Table 3 layouts with its published numbers beside each row")
    reproduce.add_argument("--tasks", required=True, help=TASKS_HELP)
    reproduce.add_argument("--out", required=True, help="run folder: METHOD/<task>/..., reproduce.md, reproduce.json, "
                                                        "metrics.csv, summary.json, report.html")
    reproduce.add_argument("--methods", help="comma list (default: cosed,independent,chain,mora,t2v,talc; t2v and "
                                             "talc only where the profile's video model takes text alone)")
    reproduce.add_argument("--tally", help="a `cosed annotate` study folder: its side-by-side preferences fill the "
                                           "human column of the two runs it compared")
    add_ray_options(reproduce)
    add_run_options(reproduce)
    annotate = verb(verbs, "annotate", "a blind side-by-side study of two runs: static HTML pages, then a tally")
    annotate.add_argument("--a", help="run folder A (a generate output or an evaluate method folder)")
    annotate.add_argument("--b", help="run folder B")
    annotate.add_argument("--out", help="study folder to write: index.html, pages/, media/, blind.json, answers/")
    annotate.add_argument("--seed", type=int, default=0, help="seed of the left/right draw (recorded in blind.json)")
    annotate.add_argument("--tally", metavar="DIR", help="unblind the answers in DIR/answers and print preferences")
    plan = verb(verbs, "plan", "capacity planning: the runtime's own policies in virtual time, per cluster size "
                               "(pool plan, makespan, GPU-hours, efficiency, bottleneck)")
    plan.add_argument("--tasks", required=True, help=TASKS_HELP + ": their step counts")
    plan.add_argument("--gpus", default="16,64,256", help="comma list of cluster sizes (default 16,64,256)")
    plan.add_argument("--deadline", help="e.g. 8h: also print the fewest GPUs that finish in time")
    plan.add_argument("--json", help="write one record per size here (local path or s3://)")
    plan.add_argument("--tasks-total", type=int, help="plan for this many tasks with the file's mix of step counts")
    plan.add_argument("--costs-from", help="a previous Ray run's summary.json: scale the costs by its measured calls")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--join", action="append", default=[], metavar="GPUS@WHEN",
                      help="GPUs that join during the run, e.g. --join 8@10m (repeatable)")
    plan.add_argument("--preemptions", metavar="RATE",
                      help="also simulate nodes lost at this rate, e.g. 5%%/h (of the nodes, per hour), beside the run "
                           "without: makespan, GPU-hours and work lost to preemption")
    plan.add_argument("--replace-after", default="10m",
                      help="with --preemptions: when a lost node's replacement joins (the autoscaler), e.g. 10m, or "
                           "never (a fixed-size cluster; default 10m)")
    add_model_options(plan)
    plan.add_argument("--transitions", choices=["cut", "dissolve", "keyframe"],
                      help="keyframe: also predict the latency each clip adds by waiting for the next scene")
    plan.add_argument("--method", choices=list(METHODS),
                      help="plan a run of this method (as `cosed generate --method`; default: cosed)")
    plan.add_argument("--placement", choices=["pooled", "shared"],
                      help="where the models live (ray.placement): pooled (default: each model on GPUs of its own) or "
                           "shared (SD actors also load the video model and take the last clips; GPUs that hold both)")
    add_setup_verbs(verbs)
    return parser


def add_train_captioner(verbs) -> None:
    """``cosed train-captioner``: fine-tune the lm rewriter's captioner on Alpaca-format caption pairs."""
    train = verb(verbs, "train-captioner", "fine-tune a caption LM on Alpaca-format pairs (method.md §1)")
    train.add_argument("--pairs", required=True, help="Alpaca-format pairs (captions_train.json layout), path or s3://")
    train.add_argument("--out", required=True, help="folder (or s3:// prefix) for the safetensors checkpoint, "
                                                    "tokenizer and captioner.json")
    train.add_argument("--base", help="hub id, folder or tiny:captioner to start from (default: the profile's captioner)")
    train.add_argument("--recipe", choices=["full", "paper"], default="full",
                       help="paper: the authors' LoRA recipe (r 8, alpha 32, q/v projections, 10 epochs, lr 1e-5 "
                            "cosine, weight decay 0.01, batch 2 x 4, max length 400, Alpaca prompt; saves the "
                            "adapters); full: full fine-tuning on the chat template")
    train.add_argument("--eval-pairs", help="the eval pairs file (captions_eval.json layout): held out whole, and "
                                            "training pairs of any recipe it touches are dropped (zero overlap)")
    train.add_argument("--recipes", help="recipes file (dataset.json layout): split by recipe instead of by caption "
                                         "chain, and report how many of its recipes each side touches")
    train.add_argument("--epochs", type=float, help="default: the profile's captioner train settings, else 3")
    train.add_argument("--lr", type=float, help="default: the profile's captioner train settings, else 2e-5")
    train.add_argument("--batch-size", type=int, help="default: the profile's captioner train settings, else 8")
    train.add_argument("--holdout", type=float, default=0.1,
                       help="fraction of pairs held out (whole caption chains) and scored (default 0.1)")
    train.add_argument("--limit", type=int, help="only the first N usable pairs")
    train.add_argument("--profile", help=f"{' | '.join(available_profiles())} | FOLDER (default: tiny)")
    train.add_argument("--seed", type=int, help="training seed (default 0)")
    train.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    train.add_argument("--cache-dir", help="where tiny models, caption and embedding caches live")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def add_setup_verbs(verbs) -> None:
    """Verbs for getting a GPU machine ready: profiles, models fetch, doctor, and `tasks convert`."""
    verb(verbs, "profiles", "list every profile: models, licences and gates, GPU memory, tiny twin")
    models = verb(verbs, "models", "model weights: `cosed models fetch --profile P`")
    fetch = models.add_subparsers(dest="models_verb", required=True).add_parser(
        "fetch", help="download the profile's weights (safetensors only) into the Hugging Face cache",
        formatter_class=HelpFormatter)
    add_model_options(fetch)
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    doctor = verb(verbs, "doctor", "check GPUs, weights, output storage, H.264 and Ray before a run")
    doctor.add_argument("--address", help="Ray cluster address to check (default: RAY_ADDRESS)")
    doctor.add_argument("--out", help="output folder or s3:// prefix to probe with a write and a delete")
    add_model_options(doctor)
    tasks = verb(verbs, "tasks", "task files: `cosed tasks convert IN OUT`")
    convert = tasks.add_subparsers(dest="tasks_verb", required=True).add_parser(
        "convert", help="convert between task layouts, chosen by extension: .jsonl (one task a line), .json (the "
                        "recipes layout) and .csv (one step a row: id,title,step[,caption])",
        formatter_class=HelpFormatter)
    convert.add_argument("source", help="task file to read: .jsonl, .json or .csv (local or s3://)")
    convert.add_argument("target", help="task file to write: .jsonl, .json or .csv (local or s3://)")
    convert.add_argument("--max-steps", type=int, default=1000, help="reject tasks with more steps")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-ray", action="store_true", help="run in this process instead of on Ray")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster; "
                                          "auto: join the one `ray start` started here)")


def main(argv: list[str] | None = None) -> int:
    """Exit 0: every task done; 1: some task failed or was rejected, or storage stayed away;
    2: a usage, config, model or storage-access problem found before any work; 3: an internal error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from cosed.distributed.submission import JobStopped
    from cosed.lease import LeaseLost
    from cosed.storage import StorageUnavailable

    try:
        return run_command(args)
    except USER_ERRORS as exc:
        print(f"cosed: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (StorageUnavailable, LeaseLost, JobStopped) as exc:
        print(f"cosed: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cosed: interrupted; finished tasks are kept: run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: the traceback goes to a file, the console gets one line
        path = write_crash_log(argv, exc)
        print(f"cosed: internal error: {type(exc).__name__}: {_one_line(exc)} (traceback in {path})", file=sys.stderr)
        return 3


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def write_crash_log(argv: list[str] | None, exc: BaseException) -> str:
    from cosed.runner import keep_locally

    text = (f"cosed {' '.join(sys.argv[:1] + list(argv if argv is not None else sys.argv[1:]))}\n"
            + "".join(traceback.format_exception(exc)))
    return keep_locally(f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log", text)


def output_lease(out: str, cfg: RunConfig, args: argparse.Namespace):
    """The output's lease. A Ray run joins its cluster first and takes no lease for a job already stopped."""
    from cosed.lease import OutputLease

    if not getattr(args, "no_ray", True):
        from cosed.distributed.job import connect
        from cosed.distributed.submission import raise_if_stopped

        connect(args.address)
        raise_if_stopped()
    return OutputLease(out, cfg.storage.lease_seconds)


def run_command(args: argparse.Namespace) -> int:
    from cosed import storage
    from cosed.runner import run_in_process

    cfg = config_from_args(args)
    storage.configure(cfg.storage.retry_seconds, cfg.storage.throttle_seconds)
    if getattr(args, "tasks", None):
        cfg = tasks_rewriter(args, cfg)
    if not getattr(args, "no_ray", True) and getattr(args, "out", None):
        from cosed.distributed.outputs import require_shared_output

        require_shared_output(args.out)
    if args.verb in COMMANDS:
        return COMMANDS[args.verb](args, cfg)
    if args.verb == "generate":
        require_profile(args)
        if args.method:
            from cosed.evaluate import method_config

            cfg = method_config(cfg, args.method)
            require_text_to_video(cfg)
    with output_lease(args.out, cfg, args) as lease:
        if args.verb == "demo":
            summary = run_in_process(example_tasks_path(), args.out, cfg, overwrite=args.overwrite,
                                     progress=not args.quiet, lease=lease)
        elif args.no_ray:
            summary = run_in_process(args.tasks, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet,
                                     lease=lease, replan=args.replan)
        else:
            from cosed.distributed.job import run_on_ray

            summary = run_on_ray(args.tasks, args.out, cfg, overwrite=args.overwrite, progress=not args.quiet,
                                 address=args.address, lease=lease, replan=args.replan)
    for line in summary.lines():
        print(line)
    return 1 if summary.failed or summary.rejected else 0


def require_text_to_video(cfg: RunConfig) -> None:
    """The t2v method needs a video model that takes text alone: one line before any work where it has none."""
    if cfg.method not in ("t2v", "talc"):
        return
    from cosed.models.adapters import TEXT_TO_VIDEO
    from cosed.runner import resolve_run

    profile, _ = resolve_run(cfg)
    pipeline = profile.spec("video").pipeline
    if pipeline not in TEXT_TO_VIDEO:
        raise UserError(f"profile {profile.name} has no text-to-video model ({pipeline} takes an image): the "
                        f"{cfg.method} method needs one whose video model takes text alone (LTX-Video, e.g. tiny-flux-ltx, flux-ltx)")


REAL_PROFILES = ("sd21-svd", "flux-ltx")


def require_profile(args: argparse.Namespace) -> None:
    """Where GPUs are present, `cosed generate` takes no default profile: the default, tiny, would render
    random-weight noise for hours without a word. A profile named in --config counts as explicit."""
    import yaml

    if args.profile or (args.config and "profile" in (yaml.safe_load(open(args.config, encoding="utf-8")) or {})):
        return
    gpus = present_gpus(args)
    if gpus:
        raise UserError(f"{gpus} present but no --profile given: the default profile, tiny, has random weights and "
                        f"renders noise; pass --profile {' or '.join(REAL_PROFILES)} (or a weights folder) for real "
                        "videos, or --profile tiny to test the plumbing")


def present_gpus(args: argparse.Namespace) -> str | None:
    """'N GPU(s)' on this machine (--no-ray) or in the Ray cluster (it joins it first, or the cluster may
    autoscale to GPUs), None where there are none."""
    from cosed.config import resolve_autoscale_max_gpus

    if args.no_ray:
        import torch

        return f"{torch.cuda.device_count()} GPU(s) on this machine" if torch.cuda.is_available() else None
    import ray

    from cosed.distributed.job import connect

    connect(args.address)
    count = ray.cluster_resources().get("GPU", 0) or resolve_autoscale_max_gpus("auto")
    return f"{count:g} GPU(s) in the Ray cluster" if count else None


def tasks_rewriter(args: argparse.Namespace, cfg: RunConfig) -> RunConfig:
    """Choose ``given`` for train-selector / evaluate when no rewriter was set and every task carries captions;
    refuse ``given`` up front, naming the tasks, when some task carries none."""
    import dataclasses

    import yaml

    from cosed.rewrite import default_rewriter
    from cosed.runner import read_tasks

    explicit = getattr(args, "rewriter", None) is not None or (args.config and "rewriter" in (
        yaml.safe_load(open(args.config, encoding="utf-8")) or {}))
    if (explicit and cfg.rewriter != "given") or args.verb not in ("train-selector", "evaluate"):
        return cfg  # `generate` streams its input (never read whole here): under `given`, a task without captions is its own error
    tasks = read_tasks(args.tasks, cfg).tasks
    if not explicit:
        cfg = dataclasses.replace(cfg, rewriter=default_rewriter(tasks))
    missing = [task.id for task in tasks if not task.captions]
    if cfg.rewriter == "given" and missing:
        raise ValueError(f"--rewriter given: {len(missing)} task(s) carry no captions (e.g. {', '.join(missing[:3])}); "
                         "add 'captions' (JSONL) or 'steps_generated' (recipes layout), one per step")
    return cfg


def train_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.backend import LocalBackend
    from cosed.runner import resolve_run
    from cosed.train import TrainConfig, run_training

    profile, cfg = resolve_run(cfg)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                     holdout=args.holdout, seed=cfg.seed)
    if args.no_ray:
        backend_context = nullcontext(LocalBackend(profile, cfg))
    else:
        from cosed.distributed.job import pooled_backend

        backend_context = pooled_backend(cfg, args.address)
    with backend_context as backend:
        report = run_training(args.tasks, args.out, cfg, tc, backend=backend, profile=profile,
                              generate_missing=args.generate_missing, progress=not args.quiet)
    held = report["held_out"]
    print(f"selector: {report['parameters']:,} trainable parameters, {report['train_tasks']} training tasks, "
          f"{report['held_out_tasks']} held out")
    print(f"loss: {report['loss_per_epoch'][0]:.4f} -> {report['loss_per_epoch'][-1]:.4f}")
    for name, metrics in held.items():
        print(f"held-out {name:<9} top-1 {interval(metrics['top1'])}  MRR {interval(metrics['mrr'])}  "
              f"({metrics['queries']} step queries)")
    if report["random_weights"]:
        print("note: random-weight tiny models; these numbers test the pipeline, not quality")
    print(f"checkpoint: {args.out}/selector.safetensors (use with --selector), report: {args.out}/selector.json, "
          f"split: {args.out}/split.json")
    return 0


def interval(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def evaluation_backend(cfg: RunConfig):
    """The profile's `LocalBackend` (models load on first use): it runs the methods with --no-ray, and embeds
    the stored frames `cosed.measures` reads after generation (on Ray, only its CLIP loads, here)."""
    from cosed.backend import LocalBackend
    from cosed.runner import resolve_run

    return LocalBackend(*resolve_run(cfg))


def run_methods(args: argparse.Namespace, cfg: RunConfig, runs, backend=None, tasks: str | None = None) -> bool:
    """Each evaluation run (method x selector variant) into ``out/<run name>``, in process (on ``backend``) or
    on Ray, on ``tasks`` (default --tasks); True when some task failed or was rejected."""
    from cosed.evaluate import run_config
    from cosed.runner import run_in_process
    from cosed.storage import join

    if args.no_ray and backend is None:
        backend = evaluation_backend(cfg)
    tasks = tasks or args.tasks
    failed = False
    for run in runs:
        print(f"== {run.name}", flush=True)
        if args.no_ray:
            summary = run_in_process(tasks, join(args.out, run.name), run_config(cfg, run),
                                     overwrite=args.overwrite, progress=not args.quiet,
                                     backend=backend.for_run(run_config(backend.cfg, run)))
        else:
            from cosed.distributed.job import run_on_ray

            summary = run_on_ray(tasks, join(args.out, run.name), run_config(cfg, run),
                                 overwrite=args.overwrite, progress=not args.quiet, address=args.address)
        failed |= bool(summary.failed or summary.rejected)
        print(summary.lines()[0])
    return failed


def reproduce_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Every method on the same tasks and seeds, then Table 1 and Table 3 with the paper's numbers beside."""
    import dataclasses

    from cosed.evaluate import plan_runs, write_evaluation
    from cosed.measures import ClipMeasures, backend_embed
    from cosed.report import write_report
    from cosed.reproduce import REPRODUCE_METHODS, write_tables
    from cosed.runner import resolve_run
    from cosed.storage import join

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(REPRODUCE_METHODS)
    profile, _ = resolve_run(cfg)
    from cosed.models.adapters import TEXT_TO_VIDEO

    if profile.spec("video").pipeline not in TEXT_TO_VIDEO:
        for method in [m for m in methods if m in ("t2v", "talc")]:
            print(f"note: {method} skipped: profile {profile.name}'s video model takes no text alone")
        methods = [m for m in methods if m not in ("t2v", "talc")]
    runs = plan_runs(methods, None, cfg)
    cfg = dataclasses.replace(cfg, save_candidates=True)
    backend = evaluation_backend(cfg)
    with output_lease(args.out, cfg, args):
        failed = run_methods(args, cfg, runs, backend)
        results = write_evaluation(args.out, runs, seed=cfg.seed, measure=ClipMeasures(args.out, backend_embed(backend)))
        write_report(args.out, [run.name for run in runs], results)
        text = write_tables(args.out, results, [run.name for run in runs], profile, args.tally)
    print(text)
    print(f"tables: {join(args.out, 'reproduce.md')}, {join(args.out, 'reproduce.json')}; "
          f"report: {join(args.out, 'report.html')}")
    return 1 if failed else 0


def evaluate_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    import dataclasses

    from cosed import storage
    from cosed.evaluate import BASELINE_TASKS, plan_runs, scene_image_baselines, without_scene_images, write_evaluation
    from cosed.measures import ClipMeasures, backend_embed
    from cosed.report import write_report
    from cosed.runner import read_tasks
    from cosed.scene_image import with_checked_images
    from cosed.storage import join

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    runs = plan_runs(methods, variants, cfg)
    if cfg.selector and not selector_held_out(args, cfg):
        return 2
    cfg = dataclasses.replace(cfg, save_candidates=True)
    backend = evaluation_backend(cfg)
    baseline_tasks = without_scene_images(with_checked_images(read_tasks(args.tasks, cfg)).tasks)
    baselines = scene_image_baselines(runs) if baseline_tasks else []
    with output_lease(args.out, cfg, args):
        failed = run_methods(args, cfg, runs, backend)
        if baselines:  # the same runs on the tasks with a scene image, the image dropped
            print("scene images: each method again without them (CLIP-I to the image, with and without)", flush=True)
            storage.write_text(join(args.out, BASELINE_TASKS), baseline_tasks)
            failed |= run_methods(args, cfg, baselines, backend, tasks=join(args.out, BASELINE_TASKS))
        measure = ClipMeasures(args.out, backend_embed(backend), {b.name: b.baseline_of for b in baselines})
        results = write_evaluation(args.out, runs, seed=cfg.seed, measure=measure, baselines=baselines)
        report = write_report(args.out, [run.name for run in runs], results)
    print(f"{'method':<12}{'selector':<11}{'tasks':>6}{'CLIP-I':>9}{'CLIP-T':>9}{'video s':>9}{'s/scene':>9}"
          f"{'back':>7}")
    for row in results["ablation"]:
        ci, ct, seconds, per_scene, back = (str(v if v is None else round(v, 2)) for v in (
            row["clip_i"]["mean"], row["clip_t"]["mean"], row["video_seconds"]["mean"],
            row["seconds_per_scene"]["mean"], row["mean_steps_back"]))
        print(f"{row['method']:<12}{row['variant']:<11}{row['tasks']:>6}{ci:>9}{ct:>9}{seconds:>9}{per_scene:>9}"
              f"{back:>7}")
    for row in results["scene_image"]:
        with_, without = (str(v if v is None else round(v, 2)) for v in (row["with"]["mean"], row["without"]["mean"]))
        print(f"CLIP-I to the scene image, {row['run']}: {with_} with it, {without} without ({row['tasks']} tasks)")
    print(f"metrics: {join(args.out, 'metrics.csv')}, {join(args.out, 'summary.json')}, "
          f"ablation: {join(args.out, 'ablation.md')}, continuity: {join(args.out, 'measures.md')}, "
          f"plots: {join(args.out, 'plots')}")
    print(f"report: {report}")
    return 1 if failed else 0


def selector_held_out(args: argparse.Namespace, cfg: RunConfig) -> bool:
    """Warn (or, with --refuse-trained-tasks, refuse) when the selector was trained on tasks being evaluated."""
    from cosed.heldout import trained_on
    from cosed.runner import read_tasks

    task_ids = [task.id for task in read_tasks(args.tasks, cfg).tasks]
    overlap = trained_on(task_ids, cfg.selector)
    if overlap is None:
        print(f"warning: no split.json beside {cfg.selector}; cannot tell which of these {len(task_ids)} tasks "
              "the selector was trained on", flush=True)
        return True
    if overlap:
        print(f"warning: the selector was trained on {len(overlap)} of these {len(task_ids)} tasks "
              f"(e.g. {', '.join(overlap[:3])}); their results are not held-out", flush=True)
        if args.refuse_trained_tasks:
            print("cosed: error: --refuse-trained-tasks: evaluate on the held-out ids of split.json", file=sys.stderr)
            return False
    else:
        print(f"selector: none of these {len(task_ids)} tasks is in its training split (split.json)", flush=True)
    return True


def eval_captions_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    import json

    from cosed import storage
    from cosed.backend import LocalBackend
    from cosed.caption_eval import parse_pairs, rewrite_pairs, score_captions
    from cosed.embed import EmbeddingCache
    from cosed.rewrite import make_rewriter
    from cosed.runner import profile_cache, resolve_run

    profile, cfg = resolve_run(cfg)
    pairs = parse_pairs(storage.read_bytes(args.pairs))[: args.limit]
    backend = LocalBackend(profile, cfg)
    cache = EmbeddingCache(backend, profile.model_names()["clip"], profile_cache(cfg) / "embeddings")
    references = [reference for _, _, reference in pairs]
    scores = {}
    for name in [r.strip() for r in args.rewriters.split(",") if r.strip()]:
        rewriter = make_rewriter(name, model=cfg.rewriter_model or profile.caption_model,
                                 cache_dir=profile_cache(cfg), device=backend.device)
        start = time.perf_counter()
        outputs = rewrite_pairs(rewriter, [(previous, current) for previous, current, _ in pairs])
        seconds = time.perf_counter() - start
        scores[name] = score_captions(outputs, references, cache.texts)
        print(f"{name:<10} BLEU {scores[name]['bleu']:6.2f}  chrF {scores[name]['chrf']:6.2f}  "
              f"CLIP text sim {scores[name]['clip_text_similarity']:6.2f}  ({len(pairs)} pairs)")
        captioner = getattr(rewriter, "captioner", None)
        if captioner is not None:
            scores[name]["captioner"] = {"source": captioner.source, "checksum": captioner.checksum,
                                         "generated": captioner.generated, "generate_calls": captioner.generate_calls,
                                         "seconds": round(seconds, 3)}
            print(f"{'':<10} {captioner.source} ({captioner.checksum[:12]}): {captioner.generated} of {len(pairs)} "
                  f"captions generated in {captioner.generate_calls} generate calls, {seconds:.1f} s")
    if profile.random_weights:
        print("note: CLIP text similarity comes from random-weight tiny CLIP; BLEU and chrF do not depend on it")
    if args.out:
        storage.write_text(args.out, json.dumps({"profile": profile.name, "scores": scores}, indent=2) + "\n")
    return 0


def train_captioner_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    import dataclasses

    from cosed.backend import LocalBackend
    from cosed.embed import EmbeddingCache
    from cosed.models.profiles import CAPTION
    from cosed.runner import profile_cache, resolve_run
    from cosed.train_captioner import PAPER_RECIPE, CaptionerTrainConfig, LoraSettings, train_captioner

    profile, cfg = resolve_run(cfg)
    base = args.base or profile.caption_model
    if not base:
        raise UserError(f"profile {profile.name} names no captioner: pass --base ID|FOLDER")
    spec = profile.specs.get(CAPTION)
    if args.recipe == "paper":
        defaults = {**dataclasses.asdict(CaptionerTrainConfig()), **PAPER_RECIPE, "recipe": "paper",
                    "lora": LoraSettings()}
    else:
        defaults = {**dataclasses.asdict(CaptionerTrainConfig()),
                    **(spec.train if spec and base == profile.caption_model else {})}
    chosen = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed}
    tc = CaptionerTrainConfig(**{**defaults, **{k: v for k, v in chosen.items() if v is not None},
                                 "holdout": args.holdout, "limit": args.limit})
    backend = LocalBackend(profile, cfg)
    embeddings = EmbeddingCache(backend, profile.model_names()["clip"], profile_cache(cfg) / "embeddings")
    report = train_captioner(args.pairs, args.out, base, tc, device=backend.device, cache_dir=profile_cache(cfg),
                             embed_texts=embeddings.texts, progress=not args.quiet,
                             random_weights=profile.random_weights and base == profile.caption_model,
                             eval_pairs_uri=args.eval_pairs, recipes_uri=args.recipes)
    data, losses = report["data"], [entry["loss"] for entry in report["loss"]]
    split, params = report["split"], report["parameters"]
    print(f"captioner: {base} fine-tuned ({tc.recipe}: {params['trainable']:,} of {params['total']:,} parameters "
          f"trained) on {data['train']} pairs ({data['held_out']} held out by {split['by']}, "
          f"{len(data['skipped_malformed'])} malformed skipped), {tc.epochs:g} epoch(s), {report['train_seconds']:.1f} s")
    if "recipe_overlap" in split:
        print(f"split: {split['train_recipes']} training recipes, {split['eval_recipes']} eval recipes, overlap "
              f"{split['recipe_overlap']}; {split['dropped_train_pairs']} training pairs dropped (their recipe is in "
              f"the eval file); of the recipes file's {split['recipes_file']}, {split['recipes_file_in_train']} "
              f"have training pairs")
    if losses:
        head, tail = losses[:5], losses[-5:]
        print(f"loss (mean of the first / last {len(head)} steps): {sum(head) / len(head):.4f} -> "
              f"{sum(tail) / len(tail):.4f} over {len(losses)} steps")
    for name, scores in report.get("held_out", {}).items():
        print(f"held-out {name:<9} BLEU {scores['bleu']:6.2f}  chrF {scores['chrf']:6.2f}  "
              f"CLIP text sim {scores['clip_text_similarity']:6.2f}  ({scores['pairs']} pairs)")
    if report["random_weights"] or profile.random_weights:
        print("note: the tiny twin started from random weights and CLIP text similarity uses random-weight tiny "
              "CLIP: these numbers check the pipeline, not caption quality")
    print(f"checkpoint: {args.out} (use with --rewriter lm --rewriter-model {args.out}), checksum "
          f"{report['checksum'][:16]}, report: {args.out}/captioner.json")
    return 0


def profiles_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.models.profiles import profile_data

    for name in available_profiles():
        data = profile_data(name)
        twin = data.get("tiny_twin") or (f"twin of {data['twin_of']}" if data.get("twin_of") else "-")
        weights = ("no models: simulated call times" if data.get("backend") == "simulated"
                   else "random weights, built locally" if data.get("random_weights") else "hub weights")
        print(f"{name}  ({weights}; tiny twin: {twin})")
        for kind, model in data["models"].items():
            model = {"source": model} if isinstance(model, str) else model
            gate = "GATED: accept the licence on its hub page + HF_TOKEN" if model.get("gated") else "not gated"
            memory = model.get("memory_gib", {})
            need = ", ".join(f"{level} {value:g}" for level, value in memory.items())
            print(f"  {kind:<5} {model['source']:<50} {model.get('pipeline') or 'open_clip':<30} "
                  f"{model.get('licence') or '-'}; {gate}" + (f"; GPU GiB {need}" if need else ""))
    print("GPU GiB: expected peak per model at the profile's settings for the memory plans plain / savers / offload")
    return 0


def models_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.models.fetch import fetch_profile
    from cosed.runner import resolve_run

    profile, _ = resolve_run(cfg)
    folders = fetch_profile(profile, progress=not args.quiet)
    if not folders:
        print(f"{profile.name}: nothing to download (random-weight or local models)")
    for folder in folders:
        print(folder)
    return 0


def doctor_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.doctor import FAIL, format_table, run_checks
    from cosed.runner import resolve_run

    profile, cfg = resolve_run(cfg)
    checks = run_checks(profile, cfg.memory, address=args.address, out=args.out)
    for line in format_table(checks):
        print(line)
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"doctor: {'cannot run: ' + ', '.join(failed) if failed else 'ready'}")
    return 1 if failed else 0


def plan_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    import json

    from cosed import storage
    from cosed.distributed.costs import CostModel
    from cosed.distributed.preemptions import PreemptionModel, parse_rate
    from cosed.plan import (PlanRequest, describe, describe_preemptions, describe_transitions, fewest_gpus,
                            measured_costs, parse_duration, parse_join, record)
    from cosed.runner import resolve_run
    from cosed.shards import count_tasks

    if args.method:
        from cosed.evaluate import method_config

        cfg = method_config(cfg, args.method)
        require_text_to_video(cfg)
    if args.placement:
        cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, placement=args.placement))
    profile, cfg = resolve_run(cfg)
    counts = list(count_tasks(args.tasks, cfg.max_steps).steps)
    if not counts:
        raise ValueError(f"{args.tasks} holds no valid task")
    if args.tasks_total:
        counts = (counts * (args.tasks_total // len(counts) + 1))[:args.tasks_total]
    costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
    if args.costs_from:
        costs = measured_costs(costs, args.costs_from, counts, cfg)
    try:
        sizes = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError as exc:
        raise ValueError(f"--gpus takes a comma list of GPU counts, got {args.gpus!r}") from exc
    request = PlanRequest(counts, cfg, costs, gpus_per_node=args.gpus_per_node,
                          joins=tuple(parse_join(j) for j in args.join))
    preemptions = None
    if args.preemptions:
        preemptions = PreemptionModel(parse_rate(args.preemptions), None if args.replace_after.strip() == "never"
                                      else parse_duration(args.replace_after))
    print(f"{len(counts)} tasks, {sum(counts)} scenes, profile {profile.name} (costs: {costs.source or 'profile'})")
    results, records = [], []
    for gpus in sizes:
        results.append(request.run(gpus))
        records.append(record(results[-1]))
        for line in describe(results[-1]):
            print(line, flush=True)
        if cfg.transitions == "keyframe":  # the same run with cuts: what waiting for the next scene adds
            cut = dataclasses.replace(request, cfg=dataclasses.replace(cfg, transitions="cut")).run(gpus)
            records[-1]["cut"] = record(cut)
            print(describe_transitions(cut, results[-1]), flush=True)
        if preemptions is not None:
            hit = request.run(gpus, preemptions)
            records[-1]["with_preemptions"] = {"rate": args.preemptions, **record(hit)}
            print(describe_preemptions(results[-1], hit, args.preemptions, preemptions), flush=True)
    if args.deadline:
        deadline = parse_duration(args.deadline)
        best = fewest_gpus(request, deadline)
        print(f"deadline {args.deadline}: " + (f"{best.gpus} GPUs finish in {best.makespan_s / 3600:.2f} h"
                                               if best else "not met even by 8192 GPUs"))
        if best:
            records.append(record(best))
    if args.json:
        storage.write_text(args.json, json.dumps(records, indent=2) + "\n")
    return 0


def tasks_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.convert import convert

    read = convert(args.source, args.target, max_steps=args.max_steps)
    print(f"{len(read.tasks)} tasks ({sum(len(t.steps) for t in read.tasks)} steps) written to {args.target}"
          + (f"; {len(read.errors)} rejected:" if read.errors else ""))
    for error in read.errors[:20]:
        print(f"  {error}")
    longest = max((len(t.steps) for t in read.tasks), default=0)
    if longest > cfg.max_steps:
        print(f"note: the longest task has {longest} steps; `cosed generate` rejects more than max_steps "
              f"({cfg.max_steps}): raise it with max_steps: {longest} in a --config file")
    return 1 if read.errors else 0


def annotate_command(args: argparse.Namespace, cfg: RunConfig) -> int:
    from cosed.annotate import tally, tally_lines, write_study

    if args.tally:
        result = tally(args.tally)
        for line in tally_lines(result):
            print(line)
        (Path(args.tally) / "tally.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if not (args.a and args.b and args.out):
        raise UserError("cosed annotate needs --a RUN --b RUN --out DIR (or --tally DIR)")
    study = write_study(args.a, args.b, args.out, args.seed)
    print(f"study: {len(study.tasks)} task page(s) in {args.out}/pages, sides drawn with seed {study.seed} "
          f"({args.out}/blind.json); open {args.out}/index.html, save answers into {args.out}/answers/, then "
          f"cosed annotate --tally {args.out}")
    return 0


COMMANDS = {"plan": plan_command, "annotate": annotate_command, "reproduce": reproduce_command, "tasks": tasks_command, "train-selector": train_command, "evaluate": evaluate_command, "eval-captions": eval_captions_command,
            "train-captioner": train_captioner_command,
            "profiles": profiles_command, "models": models_command, "doctor": doctor_command}


if __name__ == "__main__":
    sys.exit(main())
