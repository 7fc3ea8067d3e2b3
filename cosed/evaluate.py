"""Method comparison on the same tasks and seeds (method.md §7): independent, previous, cosed.

Each method is the same engine with a different pool policy; per-task metrics
come from the manifests, so the numbers in `metrics.csv` are exactly the ones
each task folder reports.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter

import numpy as np

from cosed import storage
from cosed.config import RunConfig
from cosed.tasks import SUMMARY

METHOD_POOLS = {
    "independent": {"steps": "none", "fresh": 1},
    "previous": {"steps": "previous"},
    "cosed": {"steps": "all"},
}


def method_config(cfg: RunConfig, method: str) -> RunConfig:
    if method not in METHOD_POOLS:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHOD_POOLS)}")
    return dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, **METHOD_POOLS[method]))


def source_distance(step: dict) -> str:
    """How far back the chosen candidate's latent came from: '1' is the previous step."""
    source = step["candidates"][step["chosen"]]["source"]
    return "fresh" if source["kind"] == "fresh" else str(step["step"] - source["step"])


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


def metric_rows(out: str, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        for manifest in read_manifests(out, method):
            rows.append({
                "task_id": manifest["task_id"], "method": method,
                "clip_i": manifest["metrics"]["clip_i"], "clip_t": manifest["metrics"]["clip_t"],
                "steps": len(manifest["steps"]),
                "source_distances": " ".join(source_distance(s) for s in manifest["steps"][1:]),
            })
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
                           "source_distances": dict(sorted(distances.items()))}
    return summary


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["task_id", "method", "clip_i", "clip_t", "steps", "source_distances"])
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


def write_evaluation(out: str, methods: list[str], seed: int = 0) -> dict:
    rows = metric_rows(out, methods)
    summary = summarise(rows, methods, seed)
    storage.write_text(storage.join(out, "metrics.csv"), rows_csv(rows))
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    for name, data in plots(rows, summary, methods).items():
        storage.write_bytes(storage.join(out, "plots", name), data)
    return summary
