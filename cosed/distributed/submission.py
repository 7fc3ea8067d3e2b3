"""This process's Ray job as the job API records it.

`ray job stop` of a job that is still PENDING marks it STOPPED, yet its entrypoint
may start afterwards with nobody left to stop it (ray-project/ray#58353): such a
run would take the output lease a resubmit needs and keep writing. So a run under
``ray job submit`` reads its own status before it takes the lease and on every
pool tick, and ends, as a stopped job does, once the job API says it is over.
"""

from __future__ import annotations

import json
import logging

from cosed.lease import current_job_id

log = logging.getLogger("cosed")

OVER = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})


class JobStopped(RuntimeError):
    """The job API records this run's Ray job as over: the run winds down and exits."""


def job_status(submission_id: str) -> str | None:
    """The status the job API holds for ``submission_id`` (None where it holds none or cannot be read)."""
    try:
        from ray._private import ray_constants
        from ray.dashboard.modules.job.common import JobInfoStorageClient
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(JobInfoStorageClient.JOB_DATA_KEY.format(job_id=submission_id).encode(),
                               namespace=ray_constants.KV_NAMESPACE_JOB)
        return json.loads(raw).get("status") if raw else None
    except Exception as exc:  # the GCS busy or a Ray without these internals: never stop a run on a guess
        log.debug("could not read the status of Ray job %s: %s", submission_id, exc)
        return None


def raise_if_stopped() -> None:
    """Raise `JobStopped` when this process runs for a Ray job the job API records as over."""
    submission_id = current_job_id()
    if submission_id is None:
        return
    status = job_status(submission_id)
    if status in OVER:
        raise JobStopped(f"Ray job {submission_id} is {status} (it was stopped before its entrypoint started): "
                         "this run ends; finished tasks are kept")
