"""The import contracts of pyproject.toml hold (the control plane never imports torch; only the
operator's runtime/ imports kopf or the kubernetes client; the worker's rooms import downwards)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_hold() -> None:
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def test_no_script_directory_shadows_the_standard_library() -> None:
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a benchmarks/operator.py
    once replaced the stdlib `operator` there (hidden in .venv, where site imports it early)."""
    clashes = [
        str(f.relative_to(ROOT))
        for folder, pattern in (("benchmarks", "*.py"), ("scripts", "*.py"), ("tests", "**/*.py"))
        for f in (ROOT / folder).glob(pattern)
        if f.stem in sys.stdlib_module_names
    ]
    assert clashes == [], f"rename these: they shadow standard-library modules: {clashes}"
