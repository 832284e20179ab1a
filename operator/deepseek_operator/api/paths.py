"""The rules of the paths a spec names: a directory inside a claim, a directory on the node.

Each is one Rule (Python and CEL with the same meaning), so a bad path gets one message naming
the field. A path inside a claim must stay inside it; a hostPath must be clean, absolute and none
of the node's system directories (SYSTEM_DIRS, each with everything below it, but /dev/shm: the
memory-backed store the docs recommend), since the sharding Job mounts a store writable.
"""

from __future__ import annotations

import re

from .base import Rule

# The node directories no hostPath may name or lie under. /lib* is every top-level directory
# whose name starts with lib (lib, lib32, lib64, libexec...).
SYSTEM_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib*",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/run",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/docker",
)
# Below /dev, this one is allowed: a memory-backed directory for shards.
ALLOWED_UNDER_DEV = "/dev/shm"

# Regular expressions shared by Python (re.search) and CEL (RE2 `matches`, a search too).
_CONTROL = r"[\x00-\x1f\x7f]"
_CLEAN_ABSOLUTE = r"^(/[^/\x00-\x1f\x7f]+)+$"  # no empty segment, no trailing /, not /
_DOT_SEGMENT = r"(^|/)\.\.?(/|$)"
_PARENT_SEGMENT = r"(^|/)\.\.(/|$)"
_SYSTEM = (
    r"^/(bin|boot|etc|proc|root|run|sbin|sys|usr|lib[^/]*|var/run|"
    r"var/lib/(kubelet|containerd|docker))(/|$)"
)
_DEV = r"^/dev(/|$)"
_SHM = r"^/dev/shm(/|$)"

DENY_LIST_TEXT = ", ".join(SYSTEM_DIRS) + f" (except {ALLOWED_UNDER_DEV})"


def _cel(regex: str) -> str:
    """A regular expression as a CEL string literal (backslashes escaped)."""
    return "'" + regex.replace("\\", "\\\\") + "'"


def host_path_ok(path: str) -> bool:
    """Clean, absolute, not / and not in or under a system directory."""
    if re.search(_CONTROL, path) or not re.search(_CLEAN_ABSOLUTE, path):
        return False
    if re.search(_DOT_SEGMENT, path) or re.search(_SYSTEM, path):
        return False
    return not re.search(_DEV, path) or re.search(_SHM, path) is not None


def claim_path_ok(path: str) -> bool:
    """Relative, no '..' segment, no control character: it stays inside the claim."""
    return not (
        path.startswith("/") or re.search(_PARENT_SEGMENT, path) or re.search(_CONTROL, path)
    )


def _host_path_cel(field: str) -> str:
    p = f"self.{field}"
    # The control characters on their own too: `$` of a Python regex (CEL emulated in the
    # tests) also matches before a final newline.
    return (
        f"!{p}.matches({_cel(_CONTROL)}) && {p}.matches({_cel(_CLEAN_ABSOLUTE)}) && "
        f"!{p}.matches({_cel(_DOT_SEGMENT)}) && "
        f"!{p}.matches({_cel(_SYSTEM)}) && "
        f"(!{p}.matches({_cel(_DEV)}) || {p}.matches({_cel(_SHM)}))"
    )


def host_path_rule(name: str, where: str, example: str) -> Rule:
    """The rule of the `path` of a hostPath object at JSON path `where`."""
    return Rule(
        name,
        f"{where}.path must be a clean absolute directory on the node (no '.' or '..' "
        "segment, no empty segment or trailing '/', no control character) and not / or a system "
        f"directory or one below it ({DENY_LIST_TEXT}); e.g. {example}",
        lambda o: host_path_ok(o.path),
        _host_path_cel("path"),
    )


def claim_path_rule(name: str, where: str) -> Rule:
    """The rule of the `path` inside a claim of the object at JSON path `where`."""
    return Rule(
        name,
        f"{where}.path must stay inside the claim: a relative directory (no leading '/'), no "
        "'..' segment, no control character; e.g. DeepSeek-R1",
        lambda o: claim_path_ok(o.path),
        "!has(self.path) || (!self.path.startsWith('/') && "
        f"!self.path.matches({_cel(_PARENT_SEGMENT)}) && !self.path.matches({_cel(_CONTROL)}))",
    )
