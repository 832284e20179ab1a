"""One process writing its share of the planned files, in order, each committed in the background.

Every file is written under a temporary name, fsynced and renamed, so an interrupted run leaves no
final name that is not whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from dsworker.checkpoint.file_commit import Committer, replicate
from dsworker.checkpoint.one_pass import OnePass
from dsworker.checkpoint.planned_files import FileResult, OutEntry, OutFile
from dsworker.checkpoint.regions import ReaderCache, copy_region
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter


def _write_entry(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """The bytes of one tensor: literal, computed (LoRA, dequantised) or copied from its region."""
    if e.const is not None:
        w.write(e.const)
        advance(len(e.const))
    elif e.lora is not None:
        from dsworker.checkpoint.entry_transforms import write_lora

        write_lora(e, w, readers, advance)
    elif e.transform == "dequant_fp8":
        from dsworker.checkpoint.entry_transforms import write_dequant

        write_dequant(e, w, readers, advance)
    else:
        assert e.region is not None
        copy_region(e.region, w, readers, advance)


def write_outfile(
    job: OutFile,
    root: Path,
    readers: ReaderCache,
    checksum: bool,
    advance: Callable[[int], None],
    committer: Committer | None = None,
    one_pass: OnePass | None = None,
    index: int = -1,
) -> FileResult:
    """Write one planned file (tmp name, fsync, rename; the last two on `committer` if given).

    With `one_pass` (job number `index` of its jobs), dim-1 bands are cut in one pass for all files.
    """
    w = one_pass.take(index) if one_pass is not None else None
    if w is None:
        w = job.open_writer(root, checksum)
    try:
        for ei, e in enumerate(job.entries):
            if one_pass is not None and (index, ei) in one_pass.member:
                if (index, ei) in one_pass.done:
                    w.skip(e.nbytes)  # written by an earlier file's pass over the tensor
                else:
                    one_pass.cut(index, ei, w, readers, advance)
            else:
                _write_entry(e, w, readers, advance)
        if committer is None:
            size, sha = w.commit()
            replicate(w.path, root, job.copies)
        else:
            size, sha = w.total, (w.hash.hexdigest() if w.hash is not None else None)
            committer.submit(w, root, job.copies)
    except BaseException:
        w.abort()
        raise
    return FileResult(job.relpath, size, sha, tuple(job.copies))


def write_all(
    jobs: list[OutFile],
    root: Path,
    readers: ReaderCache,
    checksum: bool,
    advance: Callable[[int], None],
) -> list[FileResult]:
    """Write files in order, committing each in the background; all committed on return."""
    committer = Committer()
    one_pass = OnePass(jobs, root, checksum)
    try:
        out = [
            write_outfile(j, root, readers, checksum, advance, committer, one_pass, i)
            for i, j in enumerate(jobs)
        ]
    except BaseException:
        one_pass.abort()
        with contextlib.suppress(Exception):
            committer.wait()  # finish what is written; the first error stays the one raised
        raise
    committer.wait()
    return out
