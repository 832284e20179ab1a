"""The torch_npu bodies (ops/npu_fused.py) without an Ascend machine: what can be checked here.

They cannot run (no torch_npu, no NPU), so this checks no numerics: each body has its op's exact
schema (names, types, defaults, mutated arguments), importing them does not import torch_npu, and
every `register_kernel("npu")` in dsworker.ops sits under an `npu_available()` guard, so a machine
without torch_npu registers none (the reference serves) and one with it registers all.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import dsworker.ops
from dsworker.ops import backends, npu_fused

BODIES = {
    "router_logits": (npu_fused.router_logits_npu, ()),
    "moe_route": (npu_fused.moe_route_npu, ()),
    "mla_cache_store": (npu_fused.mla_cache_store_npu, ("kv_cache", "pe_cache")),
    "moe_gate_up": (npu_fused.moe_gate_up_npu, ()),
    "moe_down": (npu_fused.moe_down_npu, ()),
}
OPS_DIR = Path(dsworker.ops.__file__).parent


@pytest.mark.parametrize("op", sorted(BODIES))
def test_npu_body_has_the_op_schema(op: str) -> None:
    fn, mutates = BODIES[op]
    schema = str(getattr(torch.ops.dsworker, op).default._schema)
    assert schema == f"dsworker::{op}" + torch.library.infer_schema(fn, mutates_args=mutates)


def test_importing_the_bodies_does_not_import_torch_npu() -> None:
    if not backends.npu_available():
        assert "torch_npu" not in sys.modules


def _guarded(tree: ast.Module) -> list[tuple[int, bool]]:
    """(line, under an `if` that calls npu_available) of each register_kernel("npu") call."""
    out: list[tuple[int, bool]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.If):
            names = {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
            inner = guarded or "npu_available" in names
            for child in node.body:
                visit(child, inner)
            for child in node.orelse:
                visit(child, guarded)
            return
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "register_kernel"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "npu"
        ):
            out.append((node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return out


def test_every_npu_registration_is_guarded() -> None:
    bare = "op.register_kernel('npu')(f)\nif backends.triton_available():\n    op.register_kernel('npu')(f)"
    assert _guarded(ast.parse(bare)) == [(1, False), (3, False)]
    guarded = "if backends.npu_available() and load():\n    op.register_kernel('npu')(f)"
    assert _guarded(ast.parse(guarded)) == [(2, True)]
    found: dict[str, list[tuple[int, bool]]] = {}
    for path in sorted(OPS_DIR.glob("*.py")):
        calls = _guarded(ast.parse(path.read_text()))
        if calls:
            found[path.name] = calls
    unguarded = [(f, line) for f, calls in found.items() for line, ok in calls if not ok]
    assert not unguarded, f"register_kernel('npu') outside an npu_available() guard: {unguarded}"
    mine = {"routing.py", "mla_cache.py", "moe_experts.py"}  # where npu_fused's bodies register
    assert mine <= set(found), found


@pytest.mark.parametrize("op", sorted(BODIES))
def test_npu_kernels_registered_exactly_where_torch_npu_imports(op: str) -> None:
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"dsworker::{op}", "PrivateUse1")
    assert has == backends.npu_available()
