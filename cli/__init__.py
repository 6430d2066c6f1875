"""The `dreg` command: one module per command group.

Expected errors (bad input, unreachable storage) print one line naming the input and the
cause and exit with status 2; no traceback. Prefect is imported only by the commands
that run flows, so `dreg info` and bad-input lines are fast.
"""
