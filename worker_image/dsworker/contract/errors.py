"""Expected, user-fixable failures of the worker's commands, their exit codes and their reasons.

The CLI turns a `CheckpointError` or a `PlanError` into one line on stderr and exit code 2 (no
traceback): the sharding Job's log and the operator's status must say what is wrong with the input
and how to fix it, not where in our code it was noticed. Anything else is a bug and keeps its
traceback.

Each error carries a `reason`, a CamelCase word from `TERMINATION_REASONS`. `dsworker shard` writes
it to the termination log beside the message ({"error": ..., "reason": ...}), where the operator
reads it from the pod status: infrastructure problems (a missing source, a full or read-only
store) then read as such, not as a plan that does not fit the model.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
# EX_TEMPFAIL: not bad input, the same command can succeed later (the sharding Job retries it).
EXIT_BUSY = 75

CONFIG_MISMATCH = "ConfigMismatch"
INVALID_MODEL_CONFIG = "InvalidModelConfig"
SOURCE_MISSING = "SourceMissing"
STORAGE_FULL = "StorageFull"
STORAGE_NOT_WRITABLE = "StorageNotWritable"
OUTPUT_BUSY = "OutputBusy"

# reason -> what it means; the operator maps these onto its condition reasons.
TERMINATION_REASONS: dict[str, str] = {
    CONFIG_MISMATCH: "the checkpoint or the plan cannot work: a plan that does not divide the "
    "model, a checkpoint that is not what was asked, or files that are corrupt or unsafe",
    INVALID_MODEL_CONFIG: "config.json is malformed: the message names the key",
    SOURCE_MISSING: "the model path (or its config.json) does not exist: a volume not mounted "
    "or not populated yet",
    STORAGE_FULL: "the output file system is full or too small for the layout",
    STORAGE_NOT_WRITABLE: "the output file system is read-only or not writable by the worker",
    OUTPUT_BUSY: f"another writer holds the output directory (exit code {EXIT_BUSY}: retry later)",
}


class CheckpointError(Exception):
    """Bad input or environment (missing file, corrupt header, full disk); `reason` says which."""

    reason = CONFIG_MISMATCH
    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class PlanError(ValueError):
    """A plan that does not fit the model; the message names the tensor/field and the fix."""

    reason = CONFIG_MISMATCH
    exit_code = EXIT_BAD_INPUT


class OutputBusyError(CheckpointError):
    """Another writer holds the output directory's lock; retrying later is the fix, not new input."""

    reason = OUTPUT_BUSY
    exit_code = EXIT_BUSY


def termination_record(error: CheckpointError | PlanError) -> dict[str, str]:
    """What a failed command leaves in the termination log for the operator."""
    return {"error": str(error), "reason": error.reason}
