"""Device graph capture where the device has it: CUDA graphs, or NPU graphs through torch_npu.

torch_npu mirrors torch.cuda's graph API (torch.npu.NPUGraph, torch.npu.graph,
torch.npu.graph_pool_handle; torch_npu/npu/graphs.py), so one capture routine serves both. It is
imported only when an NPU asks; where it or its graph API is missing the decode steps run eagerly at
their fixed shapes, and a log line says why.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("dsworker.parallel")

NPU_GRAPH_API = ("NPUGraph", "graph", "graph_pool_handle", "Stream", "stream", "current_stream")


@dataclass(frozen=True)
class GraphApi:
    """The capture API of one device kind: torch.cuda's names, or torch_npu's equivalents."""

    kind: str
    module: Any  # torch.cuda or torch.npu: Stream, stream, current_stream
    new_graph: Any  # () -> a graph object with replay()
    capture: Any  # (graph, pool=...) -> context manager capturing the current stream's work
    pool_handle: Any  # () -> a memory pool token graphs can share


def graph_api(kind: str) -> GraphApi | None:
    """The capture API of a device kind (cpu, cuda, npu), or None (logged) where it has none."""
    if kind == "cuda":
        c = torch.cuda
        return GraphApi("cuda", c, c.CUDAGraph, c.graph, c.graph_pool_handle)
    if kind != "npu":
        log.info("no graph capture on %s: decode steps run eagerly at fixed shapes", kind)
        return None
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError:
        log.warning("NPU graph capture unavailable: torch_npu is not installed; decode steps run "
                    "eagerly at fixed shapes")  # fmt: skip
        return None
    npu = getattr(torch, "npu", None)
    missing = [name for name in NPU_GRAPH_API if not hasattr(npu, name)]
    if missing:
        version = getattr(torch_npu, "__version__", "?")
        log.warning("NPU graph capture unavailable: torch_npu %s has no torch.npu.%s; decode "
                    "steps run eagerly at fixed shapes", version, missing[0])  # fmt: skip
        return None
    assert npu is not None
    return GraphApi("npu", npu, npu.NPUGraph, npu.graph, npu.graph_pool_handle)
