"""The `dreg` command: one module per command group.

Expected errors (bad input, unreachable storage) print one line naming the input and the
cause and exit with status 2; no traceback. Prefect is imported only by the commands
that run flows, so `dreg info` and bad-input lines are fast.
"""

import warnings

# Prefect warns on import when it cannot make PREFECT_HOME; a command that needs the
# folder says so in its one line (flows.children.check_database_folder).
warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
