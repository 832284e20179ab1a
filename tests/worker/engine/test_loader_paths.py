"""The loader's host-side paths (two buffers, a threaded ring, direct from registered mappings)
load byte-identical weights to the plain CPU path, on real sharded and unsharded tiny checkpoints,
BF16 and 8-bit (weights kept 8-bit in their slots, W8A16 words unpacked)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import FakeAccelerator

from dsworker.contract.layout import ParallelPlan
from dsworker.engine import loader
from dsworker.engine.host_to_device import CopyOptions
from dsworker.model import DeepseekModel, EngineOptions, ModelArgs
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups
from dsworker.tools.shard import shard

PLAN = ParallelPlan(2, 1, 2, 2, 1)  # tp2 / moe_tp2: dim-0 and dim-1 cuts
RANK = 1
PATHS = {
    "two-buffers": (CopyOptions(1, False), False),
    "ring-3": (CopyOptions(3, False), False),
    "direct": (CopyOptions(1, True), True),
    "direct-ring-2": (CopyOptions(2, True), True),
    "direct-refused": (CopyOptions(2, True), False),  # the driver says no: staged instead
}


@pytest.fixture(scope="module")
def checkpoints(
    synth_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """name -> a model dir: sharded layouts of each format, and unsharded HF dirs."""
    root = tmp_path_factory.mktemp("loader-layouts")
    out = {}
    for fmt in ("bf16", "fp8", "w8a8", "w8a16"):
        full = synth_checkpoint("v3", "tiny", fmt)
        out[f"{fmt}-unsharded"] = full
        shard(full, root / fmt, PLAN)
        out[f"{fmt}-sharded"] = root / fmt
    return out


def _load(ckpt: Path, device: object, copy: CopyOptions) -> tuple[dict, loader.LoadStats]:
    args = ModelArgs.from_dir(ckpt)
    model = DeepseekModel(args, build_groups(PLAN, RANK, "gloo"), EngineOptions(), torch.float32)
    targets = model.targets()
    for t in targets.values():  # garbage, so a byte the path forgets cannot match by chance
        t.view(torch.uint8).fill_(0xA5)
    stats = loader.load_weights(targets, ckpt, PLAN, RANK, device, copy=copy)  # type: ignore[arg-type]
    return targets, stats


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "w8a8", "w8a16"])
@pytest.mark.parametrize("layout", ["sharded", "unsharded"])
def test_path_loads_the_same_bytes(
    path: str,
    fmt: str,
    layout: str,
    checkpoints: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dsworker.engine import host_to_device

    ckpt = checkpoints[f"{fmt}-{layout}"]
    want, plain = _load(ckpt, Device.create("cpu"), CopyOptions())
    copy, registers = PATHS[path]
    monkeypatch.setattr(host_to_device, "BUFFER_BYTES", 4096)  # many chunks per tensor
    monkeypatch.setattr(host_to_device, "RING_BUFFER_BYTES", 4096)
    dev = FakeAccelerator(registers=registers)
    got, stats = _load(ckpt, dev, copy)
    assert stats.bytes == plain.bytes > 0
    assert stats.copy == copy.label
    for name, a in want.items():
        b = got[name]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert dev.buffers == max(2, copy.threads)
    assert dev.registered == []  # every registration released before the files were unmapped
    if registers and layout == "sharded":  # whole tensors: all straight from the mapping
        assert stats.direct_bytes >= stats.bytes and stats.staged_bytes == 0
    elif registers:  # an unsharded rank reads strided dim-1 slices too: those go staged
        assert stats.direct_bytes > 0 and stats.staged_bytes > 0
    else:
        assert stats.direct_bytes == 0 and stats.staged_bytes >= stats.bytes


@pytest.mark.parametrize("fmt", ["bf16", "w8a16"])
def test_cpu_threads_load_the_same_bytes(
    fmt: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the ring's threads copy straight into the targets, block by block."""
    from dsworker.engine import host_to_device

    want, _ = _load(checkpoints[f"{fmt}-unsharded"], Device.create("cpu"), CopyOptions())
    monkeypatch.setattr(host_to_device, "RING_BUFFER_BYTES", 4096)
    got, _ = _load(checkpoints[f"{fmt}-unsharded"], Device.create("cpu"), CopyOptions(3))
    for name, a in want.items():
        assert torch.equal(a.view(torch.uint8), got[name].view(torch.uint8)), name


def test_quantised_layouts_fill_8bit_slots(checkpoints: dict[str, Path]) -> None:
    """The 8-bit checkpoints above really exercise _fill_quant: the model holds 8-bit slots."""
    for fmt in ("fp8", "w8a8", "w8a16"):
        got, _ = _load(checkpoints[f"{fmt}-sharded"], FakeAccelerator(), CopyOptions(3))
        assert any(t.dtype in loader.QUANT_DTYPES for t in got.values()), fmt


def test_worker_failure_surfaces(checkpoints: dict[str, Path]) -> None:
    """A copy that fails in a ring worker fails the load (never a half-filled model)."""

    class Broken(FakeAccelerator):
        def event(self) -> object:
            raise RuntimeError("copy engine on fire")

    with pytest.raises(RuntimeError, match="copy engine on fire"):
        _load(checkpoints["bf16-sharded"], Broken(), CopyOptions(3))


def test_copy_options_from_env() -> None:
    assert CopyOptions.from_env({}) == CopyOptions()
    opts = CopyOptions.from_env({"DSWORKER_LOADER_THREADS": "4", "DSWORKER_LOADER_DIRECT": "1"})
    assert opts == CopyOptions(4, True)
    with pytest.raises(ValueError, match="DSWORKER_LOADER_THREADS"):
        CopyOptions.from_env({"DSWORKER_LOADER_THREADS": "many"})
    with pytest.raises(ValueError, match="DSWORKER_LOADER_THREADS"):
        CopyOptions.from_env({"DSWORKER_LOADER_THREADS": "0"})
    with pytest.raises(ValueError, match="DSWORKER_LOADER_DIRECT"):
        CopyOptions.from_env({"DSWORKER_LOADER_DIRECT": "maybe"})
