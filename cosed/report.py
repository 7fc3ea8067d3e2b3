"""`report.html`: one page per evaluation run, readable without any server.

Images and videos are linked relative to the page, so the run folder can be
copied or served as it is. The page states the profile and says plainly when
the models have random weights.
"""

from __future__ import annotations

import html
import json

from cosed import storage
from cosed.evaluate import read_manifests
from cosed.tasks import task_folder_name

_COLUMN = 176
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;margin:12px 0}
table.cmp{border-collapse:collapse;margin:8px 0} table.cmp td,table.cmp th{border:1px solid #ccc;padding:4px 8px}
section.task{border-top:2px solid #ddd;margin-top:28px;padding-top:8px}
.strip{position:relative;display:flex;gap:0;margin-top:70px}
.strip svg{position:absolute;left:0;top:-66px;overflow:visible}
.step{width:%dpx;box-sizing:border-box;padding:0 6px;font-size:12px}
.step img.scene{width:160px;height:160px;image-rendering:pixelated;border:1px solid #999}
.caption{color:#555;font-style:italic} .src{font-weight:600;color:#1f5fa8}
.cands{display:flex;flex-wrap:wrap;gap:3px;margin-top:6px}
.cand{font-size:10px;text-align:center;width:50px}
.cand img{width:48px;height:48px;image-rendering:pixelated;border:2px solid transparent}
.cand.chosen img{border-color:#d33}
.plots img{max-width:48%%;margin-right:1%%}
""" % _COLUMN


def _e(text) -> str:
    return html.escape(str(text))


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.2f} <small>[{stat['low']:.2f}, {stat['high']:.2f}]</small>"


def _arrows(steps: list[dict]) -> str:
    """Arcs from each step back to the step its chosen latent came from."""
    width = _COLUMN * len(steps)
    parts = [f'<svg width="{width}" height="64"><defs><marker id="head" markerWidth="8" markerHeight="8" '
             'refX="4" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#1f5fa8"/></marker></defs>']
    for step in steps[1:]:
        source = step["candidates"][step["chosen"]]["source"]
        x_from = (step["step"] - 0.5) * _COLUMN
        if source["kind"] != "pool":
            parts.append(f'<text x="{x_from + 8}" y="58" font-size="11" fill="#888">{_e(source["kind"])}</text>')
            continue
        x_to = (source["step"] - 0.5) * _COLUMN
        lift = 10 + 14 * min(step["step"] - source["step"], 4)
        parts.append(f'<path d="M{x_from},62 C{x_from},{62 - lift * 1.6} {x_to},{62 - lift * 1.6} {x_to},62" '
                     'fill="none" stroke="#1f5fa8" stroke-width="2" marker-end="url(#head)"/>')
    return "".join(parts) + "</svg>"


def _task_section(manifest: dict, base: str, others: dict[str, dict]) -> str:
    steps = manifest["steps"]
    columns = []
    for step in steps:
        chosen = step["candidates"][step["chosen"]]
        label = "fresh seed" if chosen["source"]["kind"] == "fresh" else \
            f"from step {chosen['source']['step']}, iteration {chosen['source']['iteration']}"
        thumbs = "".join(
            f'<div class="cand{" chosen" if i == step["chosen"] else ""}"><img src="{base}/{_e(c["image"])}" '
            f'alt="candidate {i}"><br>{c["score"]:.4f}</div>'
            for i, c in enumerate(step["candidates"]) if "image" in c)
        columns.append(
            f'<div class="step"><img class="scene" src="{base}/{_e(step["image"])}" alt="step {step["step"]}">'
            f'<div><b>Step {step["step"]}</b> · <span class="src">{_e(label)}</span></div>'
            f'<div>{_e(step["text"])}</div><div class="caption">{_e(step["caption"])}</div>'
            f'<div class="cands">{thumbs}</div></div>')
    metric_rows = "".join(
        f"<tr><td>{_e(method)}</td><td>{_fmt_value(m['metrics']['clip_i'])}</td>"
        f"<td>{_fmt_value(m['metrics']['clip_t'])}</td></tr>" for method, m in others.items())
    return (f'<section class="task" id="{_e(manifest["task_id"])}"><h2>{_e(manifest["title"] or manifest["task_id"])}'
            f' <small>({_e(manifest["task_id"])})</small></h2>'
            f'<div class="strip">{_arrows(steps)}{"".join(columns)}</div>'
            f'<p><video controls muted width="320" src="{base}/{_e(manifest["video"])}"></video></p>'
            f'<table class="cmp"><tr><th>method</th><th>CLIP-I</th><th>CLIP-T</th></tr>{metric_rows}</table></section>')


def _fmt_value(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _ablation(rows: list[dict]) -> str:
    """Method x selector variant: CLIP-I, CLIP-T and how far back the chosen latents reach."""
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td>{_e(r['method'])}</td><td>{_e(r['variant'])}</td><td>{r['tasks']}</td><td>{_fmt(r['clip_i'])}</td>"
        f"<td>{_fmt(r['clip_t'])}</td><td>{_fmt_value(r['mean_steps_back'])}</td>"
        f"<td>{'–' if r['max_steps_back'] is None else r['max_steps_back']}</td>"
        f"<td>{_fmt_value(r['fresh_share'])}</td></tr>" for r in rows)
    return ('<h2 id="ablation">Ablation: method × selector</h2><table class="cmp"><tr><th>method</th><th>selector</th>'
            '<th>tasks</th><th>CLIP-I (95% CI)</th><th>CLIP-T (95% CI)</th><th>mean steps back</th><th>max back</th>'
            f'<th>fresh share</th></tr>{cells}</table>')


def _scene_image(rows: list[dict]) -> str:
    """CLIP-I between the scenes and the user's scene image, in the run with it and the same run without it."""
    if not rows:
        return ""
    cells = "".join(f"<tr><td>{_e(r['run'])}</td><td>{r['tasks']}</td><td>{_fmt(r['with'])}</td>"
                    f"<td>{_fmt(r['without'])}</td><td>{_fmt(r['difference'])}</td></tr>" for r in rows)
    return ('<h2 id="scene-image">Your scene image: CLIP-I to it, with it and without it</h2><table class="cmp">'
            '<tr><th>run</th><th>tasks</th><th>with (95% CI)</th><th>without (95% CI)</th>'
            f'<th>with − without (95% CI)</th></tr>{cells}</table>')


def build_report(out: str, methods: list[str], summary: dict) -> str:
    primary = next((m for m in methods if m == "cosed"), next((m for m in methods if m.startswith("cosed")), methods[0]))
    by_method = {m: {x["task_id"]: x for x in read_manifests(out, m)} for m in methods}
    manifests = list(by_method[primary].values())
    if not manifests:
        raise ValueError(f"no finished tasks under {out}/{primary}")
    first = manifests[0]
    warning = ""
    if first.get("random_weights"):
        warning = ('<div class="warn"><b>Random-weight models.</b> This run used the <code>tiny</code> profile: '
                   'small models with random weights, built offline to exercise the pipeline. The images are '
                   'noise-like and CLIP-I / CLIP-T here say nothing about quality.</div>')
    untrained = [m for m in methods for x in by_method[m].values()
                 if str(x.get("selector_weights", "")).startswith("untrained")][:1]
    if untrained:
        warning += ('<div class="warn"><b>Untrained selector.</b> No <code>--selector</code> checkpoint was given: '
                    'the selector used shared random orthonormal maps, so its picks are close to plain CLIP '
                    'similarity, not the paper\'s trained selector.</div>')
    preset = first.get("preset", {}).get("name")
    rows = "".join(
        f"<tr><td>{_e(m)}</td><td>{summary[m]['tasks']}</td><td>{_fmt(summary[m]['clip_i'])}</td>"
        f"<td>{_fmt(summary[m]['clip_t'])}</td><td>{_fmt(summary[m]['video_seconds'])}</td>"
        f"<td>{_fmt(summary[m]['seconds_per_scene'])}</td>"
        f"<td>{_fmt(summary[m].get('boundary_mad') or {'mean': None})}</td>"
        f"<td>{_fmt(summary[m].get('boundary_clip') or {'mean': None})}</td>"
        f"<td>{_e(json.dumps(summary[m]['source_distances']))}</td></tr>"
        for m in methods)
    sections = "".join(
        _task_section(m, f"{primary}/{task_folder_name(m['task_id'])}",
                      {method: by_method[method][m["task_id"]] for method in methods if m["task_id"] in by_method[method]})
        for m in manifests)
    models = ", ".join(f"{k}: {_e(v)}" for k, v in first["models"].items())
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>cosed report</title><style>{_CSS}</style>'
            f'</head><body><h1>cosed evaluation</h1><div>Profile <b>{_e(first["profile"])}</b> · seed {first["seed"]}'
            f' · transitions {_e(first["config"].get("transitions", "cut"))} · {models}'
            f'{" · preset <b>" + _e(preset) + "</b>" if preset else ""}</div>{warning}'
            f'<h2>Methods</h2><table class="cmp"><tr><th>method</th><th>tasks</th><th>CLIP-I (95% CI)</th>'
            f'<th>CLIP-T (95% CI)</th><th>video s (95% CI)</th><th>s per scene (95% CI)</th>'
            f'<th>boundary MAD (lower: smoother)</th><th>boundary CLIP (lower: smoother)</th>'
            f'<th>chosen source (steps back)</th></tr>{rows}</table>'
            f'{_scene_image(summary.get("scene_image", []))}{_ablation(summary.get("ablation", []))}'
            f'<div class="plots"><img src="plots/clip_i_vs_clip_t.png" alt="CLIP-I vs CLIP-T">'
            f'<img src="plots/source_distance.png" alt="source distance"></div>'
            f'<h2>Tasks ({_e(primary)})</h2>{sections}</body></html>')


def write_report(out: str, methods: list[str], summary: dict) -> str:
    uri = storage.join(out, "report.html")
    storage.write_text(uri, build_report(out, methods, summary))
    return uri
