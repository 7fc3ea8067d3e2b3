import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from cosed.backend import LocalBackend
from cosed.config import RunConfig
from cosed.runner import resolve_run

REPO = Path(__file__).resolve().parent.parent
SHARED_RECIPES = REPO.parent / "shared" / "data" / "recipes"
# Tiny models are built once per checkout (about 10 s) and reused by every test and Ray worker.
TINY_CACHE = Path(os.environ.get("COSED_TEST_CACHE", REPO / ".cache" / "test-models"))


# Three short tasks of 3, 3 and 2 steps: enough for the non-linear pool (step 3) at little cost.
SMALL_TASKS = [
    {"id": "sauce", "title": "Tomato sauce", "steps": ["Dice the onion on the board.", "Fry the onion.",
                                                        "Chop tomatoes on the board."]},
    {"id": "shelf", "title": "Shelf", "steps": ["Cut the board.", "Sand the edges.", "Screw it to the wall."]},
    {"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]},
]


def needs_shared_recipes():
    return pytest.mark.skipif(not (SHARED_RECIPES / "dataset.json").is_file(),
                              reason=f"the shared recipes data set is not at {SHARED_RECIPES} (only the team's workspace has it)")


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    from cosed.models.tiny import ensure_tiny_models

    ensure_tiny_models(TINY_CACHE)
    return TINY_CACHE


@pytest.fixture(scope="session")
def tiny_config(tiny_cache) -> RunConfig:
    return RunConfig(profile="tiny", cache_dir=str(tiny_cache))


@pytest.fixture(scope="session")
def tiny_run(tiny_config):
    """(profile, resolved config, backend) shared by the whole session: models load once."""
    profile, cfg = resolve_run(tiny_config)
    return profile, cfg, LocalBackend(profile, cfg)


@pytest.fixture(scope="session")
def clean_outputs(tmp_path_factory, tiny_cache, tiny_run):
    """``clean_outputs(profile, tasks)``: every output file of ``tasks`` from a clean in-process run. Each task
    is made once per session, in one folder per twin that every later call resumes (a task's outputs never
    depend on the tasks run with it), so the chaos and elastic tests of every module share them."""
    made: dict[str, tuple[Path, RunConfig, LocalBackend]] = {}

    def reference(profile: str, tasks: list[dict]) -> dict[str, object]:
        from cosed import runner

        if profile not in made:
            if profile == "tiny":
                _, cfg, backend = tiny_run
            else:
                found, cfg = resolve_run(RunConfig(profile=profile, cache_dir=str(tiny_cache)))
                backend = LocalBackend(found, cfg)
            made[profile] = (tmp_path_factory.mktemp(f"clean-{profile}"), cfg, backend)
        folder, cfg, backend = made[profile]
        listed = write_jsonl(folder / f"tasks-{len(list(folder.glob('tasks-*')))}.jsonl", tasks)
        runner.run_in_process(str(listed), str(folder / "out"), cfg, progress=False, backend=backend)
        return outputs(folder / "out", tasks)

    return reference


RUN_LEVEL = {"summary.json", "errors.jsonl", "errors"}


def outputs(out: Path, tasks: list | None = None) -> dict[str, object]:
    """Every output file of the run's tasks (of ``tasks`` only, when given): manifests without their
    timings, the bytes of everything else (scene PNGs, clips, videos, storyboards, candidates)."""
    from cosed.engine import manifest_without_timings

    folders = None if tasks is None else {t["id"] for t in tasks}
    files: dict[str, object] = {}
    for path in sorted(Path(out).rglob("*")):
        rel = path.relative_to(out)
        if path.is_dir() or rel.parts[0] in RUN_LEVEL or rel.parts[0].startswith("."):
            continue
        if folders is not None and rel.parts[0] not in folders:
            continue
        files[str(rel)] = (manifest_without_timings(json.loads(path.read_text())) if path.name == "manifest.json"
                           else path.read_bytes())
    return files


def task_files(files: dict[str, object], tasks: list) -> dict[str, object]:
    """The entries of `outputs` that belong to ``tasks``."""
    folders = {t["id"] for t in tasks}
    return {k: v for k, v in files.items() if k.split("/")[0] in folders}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@contextmanager
def local_ray(num_cpus: int = 6, num_gpus: int = 4):
    """A local Ray cluster with logical GPUs for one test module (auth off: it is this test's own)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
