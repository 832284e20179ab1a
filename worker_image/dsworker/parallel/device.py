"""The one place that knows device types: npu (torch_npu + hccl), cuda (nccl), cpu (gloo).

Everything else asks a `Device` for tensors, streams, pinned buffers and the collective backend, so
the engine runs unchanged on Ascend, NVIDIA and plain CPUs. torch_npu is imported only when asked
for (or probed by "auto"), so CPU and CUDA images never need it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("cpu", "cuda", "npu")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
HOST_BACKEND = BACKENDS["cpu"]  # host-side control messages travel over gloo on every device
# cudaHostRegisterPortable | cudaHostRegisterReadOnly: the mapping is read-only (never copied)
HOST_REGISTER_FLAGS = 0x01 | 0x08


class DeviceError(RuntimeError):
    """The requested device type is not usable in this process (driver, package or count)."""


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")  # registers torch.npu and the hccl backend
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def detect(kind: str = "auto") -> str:
    """Resolve "auto" to npu, then cuda, then cpu; check an explicit kind is usable."""
    if kind == "auto":
        if _npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in KINDS:
        raise DeviceError(f"unknown device {kind!r}; use one of auto, {', '.join(KINDS)}")
    if kind == "npu" and not _npu_available():
        raise DeviceError("device npu requested but torch_npu is missing or sees no NPU")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda requested but torch sees no CUDA device")
    return kind


@dataclass(frozen=True)
class Device:
    """One rank's device: its kind, index, torch.device and collective backend."""

    kind: str
    index: int = 0

    @classmethod
    def create(cls, kind: str = "auto", local_rank: int = 0) -> Device:
        """Pick the device of local rank `local_rank` and make it current for this process."""
        kind = detect(kind)
        dev = cls(kind, local_rank if kind != "cpu" else 0)
        if kind != "cpu":
            count = dev.module.device_count()
            if local_rank >= count:
                raise DeviceError(
                    f"local rank {local_rank} but only {count} {kind} devices visible"
                )
            dev.module.set_device(dev.index)
        return dev

    @property
    def torch(self) -> torch.device:
        return (
            torch.device(self.kind) if self.kind == "cpu" else torch.device(self.kind, self.index)
        )

    @property
    def backend(self) -> str:
        return BACKENDS[self.kind]

    @property
    def is_accelerator(self) -> bool:
        return self.kind != "cpu"

    @property
    def module(self) -> Any:
        """torch.cuda or torch.npu: the two expose the same Stream/Event/synchronize API."""
        if self.kind == "cpu":
            raise DeviceError("cpu has no device module")
        if self.kind == "npu":
            importlib.import_module("torch_npu")
        return getattr(torch, self.kind)

    def init_kwargs(self) -> dict[str, Any]:
        """Extra init_process_group arguments: nccl binds its communicators eagerly to the device."""
        return {"device_id": self.torch} if self.kind == "cuda" else {}

    def pinned(self, nbytes: int) -> torch.Tensor:
        """Page-locked host bytes (async host->device copies need them); plain memory on cpu."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_accelerator)

    def register_host(self, t: torch.Tensor) -> bool:
        """Page-lock existing host memory (mapped weight files, read-only) so copies go straight
        from it; False where the driver cannot (cpu, npu, no read-only registration here).

        Registered from a helper thread: a refused call sets that thread's CUDA last-error, which
        the next kernel launch check of this thread would otherwise report as its own failure.
        """
        if self.kind != "cuda" or t.numel() == 0:
            return False
        ok = [False]

        def attempt() -> None:
            err = torch.cuda.cudart().cudaHostRegister(
                t.data_ptr(), t.numel() * t.element_size(), HOST_REGISTER_FLAGS
            )
            ok[0] = int(err) == 0

        th = threading.Thread(target=attempt, name="dsworker-host-register")
        th.start()
        th.join()
        return ok[0]

    def unregister_host(self, t: torch.Tensor) -> None:
        if self.kind == "cuda":
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def stream(self) -> Any:
        """A side stream for copies (None on cpu, where copies are synchronous)."""
        return self.module.Stream(device=self.torch) if self.is_accelerator else None

    def event(self) -> Any:
        return self.module.Event() if self.is_accelerator else None

    @contextlib.contextmanager
    def on_stream(self, stream: Any) -> Iterator[None]:
        if stream is None:
            yield
        else:
            with self.module.stream(stream):
                yield

    def synchronize(self) -> None:
        if self.is_accelerator:
            self.module.synchronize(self.torch)

    def cpu_threads(self, nproc: int) -> None:
        """On cpu, share the cores between the local ranks (oversubscription is many times slower)."""
        if self.kind == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, nproc)))


def native_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm exists for this tensor (CUDA, bf16); elsewhere experts use a padded bmm."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
