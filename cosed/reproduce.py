"""`cosed reproduce`: the paper's Table 1 (video length, human consistency) and Table 3 (CLIP-I, CLIP-T)
for every method of one run, each row beside the number the paper published for its nearest system.

The paper's systems are not all open: Lumiere and ModelScope are stood in for by the profile's open
text-to-video model (LTX-Video), so ``t2v`` sits beside "Lumiere" and ``talc`` beside "TALC + Lumiere";
``cosed`` and ``independent`` beside "CoSeD + SVD" and "SD + SVD". Its numbers come from real weights and
its own human study; a tiny-profile run shows the layout, not a comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

from cosed import storage

REPRODUCE_METHODS = ("cosed", "independent", "chain", "mora", "t2v", "talc")

# The paper (seed text, §6.1 Table 1 and §6.2 Table 3): video length s, semantic and sequence consistency %,
# CLIP-I and CLIP-T (x100).
PAPER = {
    "cosed": {"system": "CoSeD + SVD", "length_s": 14.9, "semantic": 78.3, "sequence": 69.2,
              "clip_i": 84.8, "clip_t": 27.1},
    "independent": {"system": "SD + SVD", "length_s": 14.9, "semantic": 80.0, "sequence": 66.3,
                    "clip_i": 82.1, "clip_t": 26.4},
    "t2v": {"system": "Lumiere", "length_s": 20.8, "semantic": 81.7, "sequence": 72.9, "clip_i": 83.4, "clip_t": 14.9},
    "talc": {"system": "TALC + Lumiere", "length_s": 5.0, "semantic": 30.0, "sequence": 50.8,
             "clip_i": 90.7, "clip_t": 15.3},
}
NOT_IN_PAPER = "not in the paper's tables"


def _stat(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return (f"{stat['mean'] * scale:.{digits}f} [{stat['low'] * scale:.{digits}f}, "
            f"{stat['high'] * scale:.{digits}f}]")


def _paper(method: str, key: str, unit: str = "") -> str:
    row = PAPER.get(method)
    return "–" if row is None else f"{row[key]}{unit}"


def human_column(tally_dir: str | None) -> dict[str, str]:
    """Run folder name -> "preferred in X% of decided overall answers" from a `cosed annotate` tally."""
    if not tally_dir:
        return {}
    from cosed.annotate import tally

    result = tally(tally_dir)
    overall = result["criteria"]["overall"]
    decided = overall["a"] + overall["b"]
    if not decided:
        return {}
    share = overall["a"] / decided
    return {Path(result["a"]).name: f"{share:.0%} vs {Path(result['b']).name} (n={decided})",
            Path(result["b"]).name: f"{1 - share:.0%} vs {Path(result['a']).name} (n={decided})"}


def tables(summary: dict, methods: list[str], profile, tally_dir: str | None = None) -> tuple[str, dict]:
    """Markdown of both tables and the same numbers as a dict."""
    human = human_column(tally_dir)
    head = (f"Profile {profile.name}" + (" (random weights: these numbers test the pipeline, not the method)"
                                          if profile.random_weights else "") + ".\n\n")
    t1 = ["## Table 1: video length and human consistency",
          "", "| method | tasks | video length s (95% CI) | s per scene (95% CI) | side-by-side (overall) | "
              "paper system | paper (real weights): length | semantic % | sequence % |",
          "|---|---:|---|---|---|---|---|---|---|"]
    t3 = ["## Table 3: CLIP-I and CLIP-T (x100)", "",
          "| method | tasks | CLIP-I (95% CI) | CLIP-T (95% CI) | paper system | paper (real weights): CLIP-I | CLIP-T |",
          "|---|---:|---|---|---|---|---|"]
    record = {}
    for method in methods:
        s = summary[method]
        paper = PAPER.get(method)
        system = paper["system"] if paper else NOT_IN_PAPER
        t1.append(f"| {method} | {s['tasks']} | {_stat(s['video_seconds'])} | {_stat(s['seconds_per_scene'])} | "
                  f"{human.get(method, '–')} | {system} | {_paper(method, 'length_s', ' s')} | "
                  f"{_paper(method, 'semantic')} | {_paper(method, 'sequence')} |")
        t3.append(f"| {method} | {s['tasks']} | {_stat(s['clip_i'], 100)} | {_stat(s['clip_t'], 100)} | {system} | "
                  f"{_paper(method, 'clip_i')} | {_paper(method, 'clip_t')} |")
        record[method] = {"tasks": s["tasks"], "video_seconds": s["video_seconds"],
                          "seconds_per_scene": s["seconds_per_scene"], "clip_i": s["clip_i"], "clip_t": s["clip_t"],
                          "human": human.get(method), "paper": paper}
    note = ("\nHuman semantic / sequence consistency need the paper's own study; `cosed annotate` gives the "
            "side-by-side preference of two runs. The paper's Lumiere and ModelScope are closed or non-commercial: "
            "t2v and talc run on the profile's open text-to-video model instead.\n")
    return head + "\n".join(t1) + "\n\n" + "\n".join(t3) + "\n" + note, record


def write_tables(out: str, summary: dict, methods: list[str], profile, tally_dir: str | None = None) -> str:
    text, record = tables(summary, methods, profile, tally_dir)
    storage.write_text(storage.join(out, "reproduce.md"), text)
    storage.write_text(storage.join(out, "reproduce.json"),
                       json.dumps({"profile": profile.name, "random_weights": profile.random_weights,
                                   "methods": record}, indent=2) + "\n")
    return text
