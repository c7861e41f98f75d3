"""The ``t2ialign`` command line: one sub-command per pipeline stage."""
