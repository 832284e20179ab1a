"""Every repository path the docs and the README name exists: a file moved (the test folders
mirror the code's rooms now) leaves no reader looking for its old place."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TOP = (
    "tests",
    "worker_image",
    "operator",
    "benchmarks",
    "scripts",
    "charts",
    "crds",
    "docs",
    "examples",
)
# Package-relative paths, as the docs often write them.
PACKAGES = {"dsworker": "worker_image", "deepseek_operator": "operator"}
# Not a path in a path (`charts/deepseek-operator/crds/`, `/etc/dsworker/`), nor part of a word.
PATH = re.compile(
    rf"(?<![\w/.-])((?:{'|'.join((*TOP, *PACKAGES))})/[\w./-]*)",
)
# Paths of other projects that the docs cite.
FOREIGN = {"examples/tool_chat_template_deepseekv3.jinja"}


def mentioned(text: str) -> set[str]:
    """Repository paths in the text: placeholders (`tests/worker/<room>/`) and globs left out."""
    found = set()
    for match in PATH.finditer(text):
        path, after = match.group(1).rstrip("."), text[match.end() : match.end() + 1]
        if after and after in "<{*":
            continue
        found.add(path)
    return found - FOREIGN


def resolve(path: str) -> Path:
    top, _, rest = path.partition("/")
    return ROOT / PACKAGES[top] / path if top in PACKAGES else ROOT / path


def test_every_path_named_in_the_docs_exists() -> None:
    missing = {
        f"{doc.relative_to(ROOT)}: {path}"
        for doc in DOCS
        for path in mentioned(doc.read_text())
        if not resolve(path).exists()
    }
    assert not missing, "paths that do not exist (moved or renamed?):\n" + "\n".join(
        sorted(missing)
    )


def test_the_scan_finds_paths_and_skips_placeholders() -> None:
    text = (
        "see `tests/worker/model/test_decode_graphs.py`, dsworker/engine/scheduler.py and "
        "charts/deepseek-operator/crds/ in tests/worker/<room>/ or /etc/dsworker/engine.json."
    )
    assert mentioned(text) == {
        "tests/worker/model/test_decode_graphs.py",
        "dsworker/engine/scheduler.py",
        "charts/deepseek-operator/crds/",
    }
    assert not resolve("tests/worker/test_decode_graphs.py").exists()  # the old flat path
