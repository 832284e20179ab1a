"""SafetensorsWriter.copy_from: every path of its fallback chain writes the same bytes.

copy_file_range is refused across file systems (disk -> tmpfs), sendfile may be refused too; the
writer must fall through to the next way without losing or repeating bytes, and a full disk must
surface as the sharder's "disk full" error, not as a silent fallback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import dsworker.checkpoint.io_buffers as buffers
from dsworker.checkpoint.safetensors_format import SafetensorsError, TensorSpec
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter
from dsworker.contract.errors import CheckpointError

N = 10_000


def refuse(code: int):
    def call(*_a: object, **_k: object) -> int:
        raise OSError(code, os.strerror(code))

    return call


def copy(tmp_path: Path, offset: int = 100, missing: int = 0) -> bytes:
    """Copy N bytes at `offset` of a random source into a one-tensor file; return them."""
    payload = os.urandom(offset + N - missing)
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    out = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(out, [TensorSpec("t", "U8", (N,))])
    fd = os.open(src, os.O_RDONLY)
    try:
        writer.copy_from(fd, offset, N)
        writer.commit()
    finally:
        os.close(fd)
    with SafetensorsReader(out) as r:
        got = r.read("t")
    assert got == payload[offset : offset + N]
    return got


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several kernel calls per copy, so a fall-through mid-way would show as lost bytes."""
    monkeypatch.setattr(buffers, "COPY_CHUNK", 999)
    monkeypatch.setattr(buffers, "FALLBACK_CHUNK", 777)


def test_copy_file_range(tmp_path: Path) -> None:
    copy(tmp_path)


def test_sendfile_when_copy_file_range_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.sendfile

    def counting(*a: int) -> int:
        calls.append(a[3])
        return real(*a)

    monkeypatch.setattr(buffers.os, "copy_file_range", refuse(errno.EXDEV))
    monkeypatch.setattr(buffers.os, "sendfile", counting)
    copy(tmp_path)
    assert sum(calls) == N and len(calls) > 1


def test_pread_write_when_the_kernel_refuses_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buffers.os, "copy_file_range", refuse(errno.EXDEV))
    monkeypatch.setattr(buffers.os, "sendfile", refuse(errno.EINVAL))
    copy(tmp_path)


def test_refusal_after_partial_progress_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.copy_file_range
    done: list[int] = []

    def flaky(src: int, dst: int, n: int, offset: int) -> int:
        if done:
            raise OSError(errno.EXDEV, "cross-device")
        done.append(n)
        return real(src, dst, n, offset)

    monkeypatch.setattr(buffers.os, "copy_file_range", flaky)
    copy(tmp_path)


def test_full_disk_is_a_disk_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(buffers.os, "copy_file_range", refuse(errno.ENOSPC))
    with pytest.raises(CheckpointError, match="disk full"):
        copy(tmp_path)


def test_short_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match="ended early"):
        copy(tmp_path, missing=10)
