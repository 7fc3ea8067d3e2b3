"""The Ray edge: model actors, dispatch, per-task drivers, writers and the job runner.

Nothing here computes the method; it moves the same calls that
`cosed.backend.LocalBackend` makes in-process onto actors.
"""
