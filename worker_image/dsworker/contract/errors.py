"""Expected, user-fixable failures of the checkpoint tools.

The CLI turns a `CheckpointError` into one line on stderr and exit code 2 (no traceback): the sharding
Job's log and the operator's status must say what is wrong with the input and how to fix it, not
where in our code it was noticed. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class CheckpointError(Exception):
    """Bad input or environment (missing file, corrupt header, plan that does not fit, full disk)."""


# EX_TEMPFAIL: not bad input, the same command can succeed later (the sharding Job retries it).
EXIT_BUSY = 75


class OutputBusyError(CheckpointError):
    """Another writer holds the output directory's lock; retrying later is the fix, not new input."""

    exit_code = EXIT_BUSY
