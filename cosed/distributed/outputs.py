"""Where a Ray job may write: somewhere every node sees.

Under ``ray job submit`` the working directory is Ray's temporary copy of the
uploaded folder on one node; a relative ``--out`` would land there, on
whichever node writes, and vanish with the job's runtime files.
"""

from __future__ import annotations

import os

from cosed import storage
from cosed.errors import UserError


def under_job_submission() -> bool:
    """True in the entrypoint of ``ray job submit`` (Ray hands it the job config in this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def require_shared_output(out: str) -> None:
    """Refuse a relative local ``--out`` under ``ray job submit``."""
    if storage.is_s3(out) or os.path.isabs(out) or not under_job_submission():
        return
    raise UserError(f"--out {out!r} is relative: under `ray job submit` it would land in Ray's temporary copy of "
                    f"the working directory ({os.getcwd()}) on one node; use s3://bucket/prefix or an absolute "
                    f"path that every node shares")
