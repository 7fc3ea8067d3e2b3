"""Method comparison on the same tasks and seeds (method.md §7): independent, chain, cosed.

Each method is the same engine with a different pool policy; per-task metrics
come from the manifests, so the numbers in `metrics.csv` are exactly the ones
each task folder reports. With selector variants, every method that scores
candidates runs once per variant (untrained, trained, CLIP-only, text-only,
image-only) and the ablation table sets them side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from dataclasses import dataclass

from typing import Callable

import numpy as np

from cosed import storage
from cosed.config import RunConfig
from cosed.tasks import SUMMARY, Task

METHOD_POOLS = {
    "independent": {"steps": "none", "fresh": 1, "fresh_as": "candidate"},
    "chain": {"steps": "previous"},  # Bordalo et al.: latents of the single preceding step only
    "cosed": {"steps": "all"},
    "mora": {"steps": "none", "fresh": 1, "fresh_as": "candidate"},  # step 1 only; then clips' last frames
    "t2v": {"steps": "none", "fresh": 1, "fresh_as": "candidate"},  # no text-to-image: captions to the video model
    "talc": {"steps": "none", "fresh": 1, "fresh_as": "candidate"},  # one time-aligned generation per task
}
# Old method names still accepted. ``previous`` was renamed ``chain`` (it is Bordalo et al.'s latent chaining,
# not Mora, which chains on the previous clip's last frame).
METHOD_ALIASES = {"previous": "chain"}


def method_name(method: str) -> str:
    """The method's current name (an alias resolved, with a one-line note on stderr)."""
    if method in METHOD_ALIASES:
        import sys

        print(f"note: method {method!r} is now called {METHOD_ALIASES[method]!r} (Bordalo et al.'s latent "
              "chaining); the old name still works", file=sys.stderr)
    return METHOD_ALIASES.get(method, method)


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    method = method_name(method)
    if method not in METHOD_POOLS:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHOD_POOLS)}")
    return dataclasses.replace(cfg, method=method, pool=dataclasses.replace(cfg.pool, **METHOD_POOLS[method]))


SELECTOR_VARIANTS = {
    "untrained": {"selector_mode": "full"},
    "trained": {"selector_mode": "full"},
    "clip": {"selector_mode": "clip"},
    "text": {"selector_mode": "text"},
    "image": {"selector_mode": "image"},
}
NO_SELECTOR = "n/a"


@dataclass(frozen=True)
class EvalRun:
    """One generation run of an evaluation: a method under a selector variant, written to ``out/name``.
    ``baseline_of`` names the run this one repeats without the tasks' scene images (`scene_image_baselines`)."""

    name: str
    method: str
    variant: str
    baseline_of: str | None = None


NO_SCENE_IMAGE = "no-scene-image"
BASELINE_TASKS = "no-scene-image.tasks.jsonl"  # in the evaluation folder: the tasks with scene images, without them


def scene_image_baselines(runs: list[EvalRun]) -> list[EvalRun]:
    """Each run again as ``<name>-no-scene-image``, on the tasks that have a scene image with it dropped: the
    same method, seeds and selector, so CLIP-I to the user's image can be set beside the run that used it."""
    return [EvalRun(f"{run.name}-{NO_SCENE_IMAGE}", run.method, run.variant, baseline_of=run.name) for run in runs]


def without_scene_images(tasks: list[Task]) -> str:
    """JSONL of the tasks that have a scene image, with it dropped and every other field as parsed (so each
    task's fingerprint is that of the same task written without the field)."""
    lines = []
    for task in tasks:
        if task.scene_image:
            record = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(task).items()
                      if k != "scene_image" and (v or k in ("title", "steps"))}  # empty fields as if left out
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def plan_runs(methods: list[str], variants: list[str] | None, cfg: RunConfig) -> list[EvalRun]:
    """Without variants, one run per method (folder = method). With them, ``independent`` runs once (it never
    scores candidates: one per step) and every other method once per variant (folder = method-variant)."""
    methods = [method_name(m) for m in methods]
    for method in methods:
        method_config(cfg, method)
    if not variants:
        return [EvalRun(m, m, variant_label(cfg)) for m in methods]
    for variant in variants:
        variant_config(cfg, variant)
    unscored = ("independent", "mora", "t2v", "talc")
    return [EvalRun(m, m, NO_SELECTOR) if m in unscored else EvalRun(f"{m}-{v}", m, v)
            for m in methods for v in (variants if m not in unscored else [NO_SELECTOR])]


def variant_label(cfg: RunConfig) -> str:
    if cfg.selector_mode != "full":
        return cfg.selector_mode
    return "trained" if cfg.selector else "untrained"


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """``untrained`` drops the checkpoint; ``trained`` needs one; the modes keep whichever selector is given."""
    if variant == NO_SELECTOR:
        return cfg
    if variant not in SELECTOR_VARIANTS:
        raise ValueError(f"unknown selector variant {variant!r}: use {', '.join(SELECTOR_VARIANTS)}")
    if variant == "trained" and not cfg.selector:
        raise ValueError("the trained selector variant needs --selector CHECKPOINT")
    selector = None if variant == "untrained" else cfg.selector
    return dataclasses.replace(cfg, selector=selector, **SELECTOR_VARIANTS[variant])


def run_config(cfg: RunConfig, run: EvalRun) -> RunConfig:
    return variant_config(method_config(cfg, run.method), run.variant)


def source_distance(step: dict) -> str:
    """How far back the chosen candidate's latent came from: '1' is the previous step."""
    source = step["candidates"][step["chosen"]]["source"]
    if source.get("step") is None:  # fresh, or made from text alone (t2v, talc)
        return source["kind"]
    return str(step["step"] - source["step"])


def read_manifests(out: str, method: str) -> list[dict]:
    """The method's finished tasks; when its run left a summary.json, only manifests whose
    fingerprint matches that run's (so a stale manifest from other inputs or config is ignored)."""
    folder = storage.join(out, method)
    uris = [u for u in storage.list_keys(folder) if u.endswith("/manifest.json")]
    manifests = [json.loads(storage.read_bytes(u)) for u in sorted(uris)]
    try:
        current = json.loads(storage.read_bytes(storage.join(folder, SUMMARY))).get("fingerprints")
    except FileNotFoundError:
        current = None
    if current is None:
        return manifests
    return [m for m in manifests if m.get("fingerprint") is not None and current.get(m["task_id"]) == m["fingerprint"]]


Measure = Callable[[str, dict], dict]  # (run name, manifest) -> extra columns (`cosed.measures.ClipMeasures`)


def metric_rows(out: str, methods: list[str], measure: Measure | None = None) -> list[dict]:
    """One row per finished task and run; ``measure`` adds what the manifests lack (CLIP boundary continuity)."""
    rows = []
    for method in methods:
        for manifest in read_manifests(out, method):
            seconds = manifest["video_frames"] / manifest["fps"] if manifest.get("fps") else None
            rows.append({
                "task_id": manifest["task_id"], "method": method,
                "clip_i": manifest["metrics"]["clip_i"], "clip_t": manifest["metrics"]["clip_t"],
                "steps": len(manifest["steps"]),
                # the paper's video length (Table 1): seconds of the joined video, and per scene
                "video_seconds": seconds, "seconds_per_scene": seconds / len(manifest["steps"]) if seconds else None,
                "source_distances": " ".join(source_distance(s) for s in manifest["steps"][1:]),
                "transitions": manifest["config"].get("transitions", "cut"),
                "boundary_mad": manifest["metrics"].get("boundary_mad"),  # `cosed.continuity`
                "boundary_clip": None,  # `cosed.measures`, needs CLIP
                "clip_i_scene_image": manifest["metrics"].get("clip_i_scene_image"),
            })
            if measure is not None:
                rows[-1].update(measure(method, manifest))
    return rows


def bootstrap_mean(values: list[float], seed: int = 0, draws: int = 2000) -> dict[str, float | None]:
    """Mean with a 95% percentile-bootstrap interval over tasks."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    return {"mean": float(values.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "n": int(len(values))}


def summarise(rows: list[dict], methods: list[str], seed: int = 0) -> dict:
    summary = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        distances = Counter(d for r in mine for d in r["source_distances"].split())
        summary[method] = {"tasks": len(mine),
                           "clip_i": bootstrap_mean([r["clip_i"] for r in mine], seed),
                           "clip_t": bootstrap_mean([r["clip_t"] for r in mine], seed),
                           "boundary_mad": bootstrap_mean([r.get("boundary_mad") for r in mine], seed),
                           "boundary_clip": bootstrap_mean([r.get("boundary_clip") for r in mine], seed),
                           "clip_i_scene_image": bootstrap_mean([r.get("clip_i_scene_image") for r in mine], seed),
                           "transitions": sorted({r["transitions"] for r in mine}),
                           "video_seconds": bootstrap_mean([r["video_seconds"] for r in mine], seed),
                           "seconds_per_scene": bootstrap_mean([r["seconds_per_scene"] for r in mine], seed),
                           "source_distances": dict(sorted(distances.items()))}
    return summary


def continuity_rows(rows: list[dict], runs: list[EvalRun], seed: int = 0) -> list[dict]:
    """Boundary continuity per run and transition mode (run `evaluate` once per ``--transitions`` mode; rows of
    another mode under the same run are kept apart, never averaged in)."""
    table = []
    for run in runs:
        for mode in sorted({r["transitions"] for r in rows if r["method"] == run.name}):
            mine = [r for r in rows if r["method"] == run.name and r["transitions"] == mode]
            table.append({"run": run.name, "method": run.method, "variant": run.variant, "transitions": mode,
                          "tasks": len(mine), "boundaries": sum(r["steps"] - 1 for r in mine),
                          "boundary_mad": bootstrap_mean([r["boundary_mad"] for r in mine], seed),
                          "boundary_clip": bootstrap_mean([r["boundary_clip"] for r in mine], seed)})
    return table


def scene_image_rows(rows: list[dict], baselines: list[EvalRun], seed: int = 0) -> list[dict]:
    """CLIP-I to the user's scene image with it and without it (same tasks, method, seeds), and the paired
    difference (with - without) over the tasks both runs finished."""
    table = []
    for baseline in baselines:
        without = {r["task_id"]: r["clip_i_scene_image"] for r in rows
                   if r["method"] == baseline.name and r["clip_i_scene_image"] is not None}
        paired = [(r["clip_i_scene_image"], without[r["task_id"]]) for r in rows
                  if r["method"] == baseline.baseline_of and r["task_id"] in without]
        table.append({"run": baseline.baseline_of, "baseline": baseline.name, "method": baseline.method,
                      "variant": baseline.variant, "tasks": len(paired),
                      "with": bootstrap_mean([w for w, _ in paired], seed),
                      "without": bootstrap_mean([o for _, o in paired], seed),
                      "difference": bootstrap_mean([w - o for w, o in paired], seed)})
    return table


def measures_markdown(continuity: list[dict], scene_image: list[dict]) -> str:
    """measures.md: boundary continuity per run and transition mode, and the scene-image comparison."""
    def stat(s: dict) -> str:
        return "–" if s["mean"] is None else f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"

    lines = ["## Boundary continuity (lower: smoother)", "",
             "| run | transitions | tasks | boundaries | boundary MAD (95% CI) | boundary CLIP (95% CI) |",
             "|---|---|---:|---:|---|---|"]
    lines += [f"| {r['run']} | {r['transitions']} | {r['tasks']} | {r['boundaries']} | {stat(r['boundary_mad'])} | "
              f"{stat(r['boundary_clip'])} |" for r in continuity]
    if scene_image:
        lines += ["", "## CLIP-I to the user's scene image, with it and without it", "",
                  "| run | tasks | with (95% CI) | without (95% CI) | with - without (95% CI) |", "|---|---:|---|---|---|"]
        lines += [f"| {r['run']} | {r['tasks']} | {stat(r['with'])} | {stat(r['without'])} | {stat(r['difference'])} |"
                  for r in scene_image]
    return "\n".join(lines) + "\n"


def reach(distances: dict[str, int]) -> dict[str, float | int | None]:
    """How far back chosen latents reach: mean and largest steps back over pool picks, and the fresh share."""
    back = [int(d) for d, n in distances.items() if d.isdigit() for _ in range(n)]
    total = sum(distances.values())
    return {"mean_steps_back": float(np.mean(back)) if back else None, "max_steps_back": max(back, default=None),
            "fresh_share": distances.get("fresh", 0) / total if total else None}


def ablation_rows(summary: dict, runs: list[EvalRun]) -> list[dict]:
    return [{"method": run.method, "variant": run.variant, "run": run.name, "tasks": summary[run.name]["tasks"],
             "clip_i": summary[run.name]["clip_i"], "clip_t": summary[run.name]["clip_t"],
             "video_seconds": summary[run.name]["video_seconds"],
             "seconds_per_scene": summary[run.name]["seconds_per_scene"],
             **reach(summary[run.name]["source_distances"])} for run in runs]


def _num(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def ablation_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    measures = ("clip_i", "clip_t", "video_seconds", "seconds_per_scene")
    writer.writerow(["method", "variant", "tasks", *(f"{m}{k}" for m in measures for k in ("", "_low", "_high")),
                     "mean_steps_back", "max_steps_back", "fresh_share"])
    for r in rows:
        writer.writerow([r["method"], r["variant"], r["tasks"],
                         *(_num(r[m][k], 4) for m in measures for k in ("mean", "low", "high")),
                         _num(r["mean_steps_back"], 3), r["max_steps_back"] or "", _num(r["fresh_share"], 3)])
    return buffer.getvalue()


def ablation_markdown(rows: list[dict]) -> str:
    def stat(s: dict) -> str:
        return "–" if s["mean"] is None else f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"

    lines = ["| method | selector | tasks | CLIP-I (95% CI) | CLIP-T (95% CI) | video s (95% CI) | s per scene (95% CI) "
             "| mean steps back | max back | fresh |",
             "|---|---|---:|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['variant']} | {r['tasks']} | {stat(r['clip_i'])} | {stat(r['clip_t'])} | "
              f"{stat(r['video_seconds'])} | {stat(r['seconds_per_scene'])} | "
              f"{_num(r['mean_steps_back']) or '–'} | {r['max_steps_back'] or '–'} | {_num(r['fresh_share']) or '–'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["task_id", "method", "clip_i", "clip_t", "steps", "video_seconds",
                                                "seconds_per_scene", "source_distances", "transitions", "boundary_mad",
                                                "boundary_clip", "clip_i_scene_image"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plots(rows: list[dict], summary: dict, methods: list[str]) -> dict[str, bytes]:
    """PNG bytes of the CLIP-I vs CLIP-T view (paper Fig. 11) and the source-distance histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r["clip_i"] is not None]
        dots = ax.scatter([r["clip_t"] for r in mine], [r["clip_i"] for r in mine], alpha=0.35, s=18, label=method)
        ci, ct = summary[method]["clip_i"], summary[method]["clip_t"]
        if ci["mean"] is not None:
            ax.errorbar(ct["mean"], ci["mean"], xerr=[[ct["mean"] - ct["low"]], [ct["high"] - ct["mean"]]],
                        yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]], fmt="o", ms=8,
                        color=dots.get_facecolor()[0], mec="black", capsize=3)
    ax.set_xlabel("CLIP-T (text adherence)")
    ax.set_ylabel("CLIP-I (sequence similarity)")
    ax.set_title("Per task (dots) and method means with 95% CI")
    ax.legend()
    fig.tight_layout()
    out["clip_i_vs_clip_t.png"] = _png(fig)
    labels = sorted({d for m in methods for d in summary[m]["source_distances"]},
                    key=lambda d: (d == "fresh", int(d) if d.isdigit() else 0))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        counts = summary[method]["source_distances"]
        total = max(sum(counts.values()), 1)
        ax.bar(np.arange(len(labels)) + k * width, [counts.get(d, 0) / total for d in labels], width, label=method)
    ax.set_xticks(np.arange(len(labels)) + width * (len(methods) - 1) / 2,
                  [f"i-{d}" if d.isdigit() else d for d in labels])
    ax.set_ylabel("share of chosen candidates")
    ax.set_title("Where the chosen latent came from")
    ax.legend()
    fig.tight_layout()
    out["source_distance.png"] = _png(fig)
    plt.close("all")
    return out


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_evaluation(out: str, runs: list[EvalRun], seed: int = 0, measure: Measure | None = None,
                     baselines: list[EvalRun] = ()) -> dict:
    """metrics.csv, summary.json (per run, plus the ``ablation``, ``continuity`` and ``scene_image`` tables),
    ablation.csv / .md, measures.md and the plots. ``baselines``: the runs without scene images."""
    names = [run.name for run in runs]
    every = names + [run.name for run in baselines]
    rows = metric_rows(out, every, measure)
    summary = summarise(rows, every, seed)
    tables = {"ablation": ablation_rows(summary, runs), "continuity": continuity_rows(rows, runs, seed),
              "scene_image": scene_image_rows(rows, list(baselines), seed)}
    storage.write_text(storage.join(out, "metrics.csv"), rows_csv(rows))
    storage.write_text(storage.join(out, "summary.json"), json.dumps({**summary, **tables}, indent=2) + "\n")
    storage.write_text(storage.join(out, "ablation.csv"), ablation_csv(tables["ablation"]))
    storage.write_text(storage.join(out, "ablation.md"), ablation_markdown(tables["ablation"]))
    storage.write_text(storage.join(out, "measures.md"), measures_markdown(tables["continuity"], tables["scene_image"]))
    for name, data in plots(rows, summary, names).items():
        storage.write_bytes(storage.join(out, "plots", name), data)
    return {**summary, **tables}
