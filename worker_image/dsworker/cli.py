"""`dsworker` command line: an argparse dispatcher over subcommands that live in their own modules.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func(args) -> int`. Only the module of the command being run is imported, so `dsworker shard`
never loads torch and adding a command (engine `generate`, server `serve`, stager `stage`) is one
line in COMMANDS. Expected failures (`CheckpointError`, `PlanError`, and a full or read-only disk
wherever it surfaces) print one line and exit 2 (75 when another writer holds the output
directory: retry later); a command's `on_error` hook gets the error (the sharder writes it, with
its reason, to the termination log).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help shown by `dsworker --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("dsworker.tools.shard", "split a HF checkpoint into the per-rank layout of one plan"),
    "merge": ("dsworker.tools.merge", "merge a sharded layout back into a full HF checkpoint"),
    "reshard": ("dsworker.tools.reshard", "convert a sharded layout to another plan"),
    "lora-merge": ("dsworker.tools.lora_merge", "merge a PEFT LoRA adapter into base weights"),
    "verify": ("dsworker.tools.verify", "check a sharded layout or a HF checkpoint"),
    "synth": ("dsworker.tools.synth", "write a random, well-formed DeepSeek checkpoint"),
    "stage": ("dsworker.tools.stage", "copy this pod's ranks from the shard store into tmpfs"),
    "stage-checkpoint": (
        "dsworker.tools.stage_checkpoint",
        "copy a HF checkpoint's safetensors and JSON files into tmpfs",
    ),
    "generate": ("dsworker.launch.generate", "greedy generation from token ids on N local ranks"),
    "serve": (
        "dsworker.launch.serve_command",
        "run the engine ranks of one pod and serve the OpenAI API",
    ),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The top parser; only `command`'s module is imported and registers its real options."""
    parser = argparse.ArgumentParser(
        prog="dsworker", description="Data plane of the DeepSeek MoE operator."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dsworker.checkpoint.fsutil import disk_error
    from dsworker.contract.errors import CheckpointError, PlanError

    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    try:
        try:
            return int(args.func(args) or 0)
        except OSError as e:  # ENOSPC/EDQUOT/EROFS/EACCES where no writer wrapped it
            mapped = disk_error(e, e.filename or "the output")
            if mapped is e:
                raise
            raise mapped from e
    except (CheckpointError, PlanError) as e:
        print(f"dsworker {args.command}: error: {e}", file=sys.stderr)
        hook = getattr(args, "on_error", None)
        if hook is not None:
            hook(e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
