"""`cosed annotate`: the blind study pages in headless Chromium (answers clicked, the saved JSON read back),
then `--tally` unblinds them."""

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cosed import runner
from cosed.annotate import CRITERIA, wilson
from cosed.cli import main

from conftest import SMALL_TASKS, write_jsonl

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_run):
    import dataclasses

    _, cfg, backend = tiny_run
    folder = tmp_path_factory.mktemp("runs")
    tasks = write_jsonl(folder / "t.jsonl", SMALL_TASKS[1:])
    for name, seed in (("a", 0), ("b", 1)):
        runner.run_in_process(str(tasks), str(folder / name), dataclasses.replace(cfg, seed=seed), progress=False,
                              backend=backend)
    return folder / "a", folder / "b"


def test_the_sides_are_drawn_with_the_recorded_seed(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["annotate", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s1"), "--seed", "3"]) == 0
    assert main(["annotate", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "s2"), "--seed", "3"]) == 0
    first, second = (json.loads((tmp_path / s / "blind.json").read_text()) for s in ("s1", "s2"))
    assert first == {**second, "a": first["a"], "b": first["b"]} and first["seed"] == 3
    assert sorted(first["sides"]) == ["shelf", "tea"]
    for task, sides in first["sides"].items():
        run = a if sides["left"] == "a" else b
        assert (tmp_path / "s1" / "media" / task / "left.mp4").read_bytes() == (run / task / "video.mp4").read_bytes()
    page = (tmp_path / "s1" / "pages" / "tea.html").read_text()
    assert all(text in page for text in CRITERIA.values()) and "Boil water." in page


async def _answer_in_chromium(page: Path, downloads: Path, profile: Path, clicks: dict[str, str]) -> None:
    import aiohttp

    process = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and len(port_file.read_text().splitlines()) == 2:
                break
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().splitlines()
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{path}",
                                                                     max_msg_size=0) as ws:
            ids = iter(range(1, 10_000))
            events = []  # what the browser said between replies (the download's progress among it)

            async def send(method, params=None, session=None):
                message = {"id": next(ids), "method": method, "params": params or {}}
                if session:
                    message["sessionId"] = session
                await ws.send_json(message)
                while True:
                    reply = await ws.receive_json()
                    if reply.get("id") == message["id"]:
                        assert "error" not in reply, reply
                        return reply["result"]
                    events.append(reply)

            def download_state():
                states = [e["params"].get("state") for e in events if e.get("method") == "Browser.downloadProgress"]
                return states[-1] if states else None

            await send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads),
                                                       "eventsEnabled": True})
            target = (await send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]

            async def evaluate(expression):
                result = await send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
                assert "exceptionDetails" not in result, result  # a click that found no element fails here
                return result["result"].get("value")

            async def until(happened):
                while not happened():  # what the browser reports, however long a loaded machine takes to say it
                    events.append(await asyncio.wait_for(ws.receive_json(), 120))

            await send("Page.enable", {}, session)
            mark = len(events)
            await send("Page.navigate", {"url": page.as_uri()}, session)
            await until(lambda: any(e.get("method") == "Page.loadEventFired" for e in events[mark:]))
            await evaluate("document.getElementById('annotator').value = 'ann 1'")
            for key, choice in clicks.items():
                await evaluate(f"document.getElementById('{key}-{choice}').click()")
            await evaluate("document.getElementById('save').click()")
            await until(lambda: download_state() in ("completed", "canceled"))  # the browser says when it is whole
            assert download_state() == "completed", events[-3:]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs it)")
def test_answers_clicked_in_chromium_are_saved_and_unblinded_by_the_tally(two_runs, tmp_path, capsys):
    a, b = two_runs
    study = tmp_path / "study"
    assert main(["annotate", "--a", str(a), "--b", str(b), "--out", str(study), "--seed", "5"]) == 0
    sides = json.loads((study / "blind.json").read_text())["sides"]
    clicks = {"visual_quality": "left", "entity_consistency": "right", "background_consistency": "tie",
              "text_adherence": "left", "overall": "left"}
    for task in ("shelf", "tea"):
        downloads = tmp_path / f"dl-{task}"
        downloads.mkdir()
        asyncio.run(_answer_in_chromium(study / "pages" / f"{task}.html", downloads, tmp_path / f"p-{task}", clicks))
        (saved,) = downloads.glob("*.json")
        assert saved.name == f"answers_ann_1_{task}.json"
        record = json.loads(saved.read_text())
        assert record == {"task": task, "annotator": "ann 1", "answers": clicks}
        shutil.copy(saved, study / "answers" / saved.name)
    capsys.readouterr()
    assert main(["annotate", "--tally", str(study)]) == 0
    result = json.loads((study / "tally.json").read_text())
    for key, choice in clicks.items():
        expected = {"a": 0, "b": 0, "tie": 0}
        for task in ("shelf", "tea"):
            expected["tie" if choice == "tie" else sides[task][choice]] += 1
        got = result["criteria"][key]
        assert {k: got[k] for k in expected} == expected and got["n"] == 2
    out = capsys.readouterr().out
    assert "overall" in out and "A share of decided" in out and result["annotators"] == ["ann 1"]


def test_wilson_interval_brackets_the_share():
    low, high = wilson(7, 10)
    assert 0.39 < low < 0.7 < high < 0.9 and wilson(0, 0) == (None, None)
