"""`cosed annotate`: a blind side-by-side study of two runs (the paper's Figure 8), as static HTML.

`write_study` writes one page per task found finished in both runs: the two videos left and right, sides
drawn with a recorded seed (``blind.json``), the paper's four criteria plus the overall question, and a
Save button that downloads the answers as ``answers_<annotator>_<task>.json``. `tally` unblinds the
answers dropped into ``DIR/answers/`` and gives, per criterion, how often each run was preferred, with a
Wilson 95% interval on run A's share of the decided answers.
"""

from __future__ import annotations

import html
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from cosed.evaluate import read_manifests
from cosed.tasks import task_folder_name

CRITERIA = {
    "visual_quality": "Which video has the better visual quality?",
    "entity_consistency": "In which video do the objects and people stay more consistent from scene to scene?",
    "background_consistency": "In which video does the background stay more consistent from scene to scene?",
    "text_adherence": "Which video follows the step texts better?",
    "overall": "Which video better represents the task steps?",
}
CHOICES = ("left", "tie", "right")
BLIND = "blind.json"


def _runs_tasks(a: str, b: str) -> list[tuple[str, dict, dict]]:
    """(task id, manifest in A, manifest in B) of the tasks finished in both runs, by id."""
    first, second = _manifests(a), _manifests(b)
    return [(task, first[task], second[task]) for task in sorted(set(first) & set(second))]


def _manifests(run: str) -> dict[str, dict]:
    """A local run folder's finished tasks (an evaluate method folder or a generate output)."""
    folder = Path(run).resolve()
    return {m["task_id"]: m for m in read_manifests(str(folder.parent), folder.name)}


@dataclass(frozen=True)
class Study:
    out: str
    seed: int
    tasks: list[str]


def write_study(a: str, b: str, out: str, seed: int = 0) -> Study:
    """The pages, the media they play and ``blind.json`` (which run is left on each page, the seed, the runs)."""
    rng = random.Random(seed)
    root = Path(out)
    sides, tasks = {}, []
    for task, left_manifest, right_manifest in _runs_tasks(a, b):
        left_is_a = rng.random() < 0.5
        sides[task] = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}
        folder = task_folder_name(task)
        for side, run in (("left", a if left_is_a else b), ("right", b if left_is_a else a)):
            target = root / "media" / folder / f"{side}.mp4"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((Path(run) / folder / "video.mp4").read_bytes())
        steps = [s["text"] for s in left_manifest["steps"]]
        (root / "pages").mkdir(parents=True, exist_ok=True)
        (root / "pages" / f"{folder}.html").write_text(_page(task, folder, left_manifest.get("title") or task, steps),
                                                        encoding="utf-8")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"no task is finished in both {a} and {b}")
    (root / "answers").mkdir(parents=True, exist_ok=True)
    (root / BLIND).write_text(json.dumps({"seed": seed, "a": str(a), "b": str(b), "sides": sides}, indent=2) + "\n")
    index = "".join(f'<li><a href="pages/{task_folder_name(t)}.html">{html.escape(t)}</a></li>' for t in tasks)
    (root / "index.html").write_text(f'<!doctype html><meta charset="utf-8"><title>cosed study</title><h1>Side-by-side'
                                     f' study</h1><p>Answer every page and save; put the saved files in '
                                     f'<code>answers/</code>.</p><ol>{index}</ol>', encoding="utf-8")
    return Study(out=out, seed=seed, tasks=tasks)


def _page(task: str, folder: str, title: str, steps: list[str]) -> str:
    e = html.escape
    questions = "".join(
        f'<fieldset><legend>{e(text)}</legend>' + "".join(
            f'<label><input type="radio" name="{key}" value="{choice}" id="{key}-{choice}"> {choice}</label> '
            for choice in CHOICES) + "</fieldset>" for key, text in CRITERIA.items())
    steps_html = "".join(f"<li>{e(s)}</li>" for s in steps)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:20px}} .pair{{display:flex;gap:16px}} video{{width:420px}}
fieldset{{margin:8px 0}}</style></head><body>
<h1>{e(title)}</h1><ol>{steps_html}</ol>
<div class="pair"><div><h2>Left</h2><video id="left" src="../media/{folder}/left.mp4" controls loop></video></div>
<div><h2>Right</h2><video id="right" src="../media/{folder}/right.mp4" controls loop></video></div></div>
<label>Your name or id: <input id="annotator"></label>
<form id="answers">{questions}</form>
<button id="save" type="button">Save answers</button> <span id="status"></span>
<script>
const TASK = {json.dumps(task)};
const CRITERIA = {json.dumps(list(CRITERIA))};
document.getElementById("save").addEventListener("click", () => {{
  const annotator = document.getElementById("annotator").value.trim();
  const answers = {{}};
  for (const key of CRITERIA) {{
    const picked = document.querySelector(`input[name="${{key}}"]:checked`);
    if (picked) answers[key] = picked.value;
  }}
  if (!annotator || Object.keys(answers).length < CRITERIA.length) {{
    document.getElementById("status").textContent = "Give your name and answer every question first.";
    return;
  }}
  const blob = new Blob([JSON.stringify({{task: TASK, annotator, answers}}, null, 1)], {{type: "application/json"}});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `answers_${{annotator.replace(/[^A-Za-z0-9_-]/g, "_")}}_${{TASK.replace(/[^A-Za-z0-9_-]/g, "_")}}.json`;
  document.body.appendChild(link);
  link.click();
  document.getElementById("status").textContent = "Saved " + link.download;
}});
</script></body></html>
"""


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """Wilson score 95% interval of a binomial share."""
    if n == 0:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(out: str) -> dict:
    """Unblinded preference counts per criterion over every answers file in ``out/answers``."""
    root = Path(out)
    blind = json.loads((root / BLIND).read_text())
    counts = {key: {"a": 0, "b": 0, "tie": 0} for key in CRITERIA}
    annotators, files = set(), sorted((root / "answers").glob("*.json"))
    for path in files:
        record = json.loads(path.read_text())
        sides = blind["sides"][record["task"]]
        annotators.add(record["annotator"])
        for key, choice in record["answers"].items():
            counts[key]["tie" if choice == "tie" else sides[choice]] += 1
    rows = {}
    for key, c in counts.items():
        decided = c["a"] + c["b"]
        low, high = wilson(c["a"], decided)
        total = decided + c["tie"]
        rows[key] = {**c, "n": total, "a_share": c["a"] / decided if decided else None, "a_low": low, "a_high": high}
    return {"a": blind["a"], "b": blind["b"], "seed": blind["seed"], "answers": len(files),
            "annotators": sorted(annotators), "criteria": rows}


def tally_lines(result: dict) -> list[str]:
    """Figure 8's layout: per criterion, A preferred / tie / B preferred (shares of all answers)."""
    lines = [f"A = {result['a']}", f"B = {result['b']}",
             f"{len(result['annotators'])} annotator(s), {result['answers']} answer file(s), sides seed {result['seed']}",
             f"{'criterion':<24}{'A':>7}{'tie':>7}{'B':>7}{'n':>5}  A share of decided (95% CI)"]
    for key, r in result["criteria"].items():
        n = max(r["n"], 1)
        share = "–" if r["a_share"] is None else f"{r['a_share']:.2f} [{r['a_low']:.2f}, {r['a_high']:.2f}]"
        lines.append(f"{key:<24}{r['a'] / n:>7.0%}{r['tie'] / n:>7.0%}{r['b'] / n:>7.0%}{r['n']:>5}  {share}")
    return lines
