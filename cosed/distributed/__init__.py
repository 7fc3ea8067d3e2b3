"""The Ray edge: model actors, per-task drivers, the stitcher and the job runner.

Nothing here computes the method; it moves the same calls that
`cosed.backend.LocalBackend` makes in-process onto actors.
"""
