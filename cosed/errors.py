"""The kinds of failure the `cosed` command tells apart (see README, *Failure model*).

`UserError`: something the user can fix, found before any work starts
(usage, config, model, storage access, another job on the same output);
the command prints one line and exits 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the command's inputs or environment, reported in one line (exit 2)."""
