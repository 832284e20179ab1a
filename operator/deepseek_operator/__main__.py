"""`python -m deepseek_operator` (or `deepseek-operator`): run the operator (see runtime/cli.py)."""

from __future__ import annotations

import sys

from .runtime.cli import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
