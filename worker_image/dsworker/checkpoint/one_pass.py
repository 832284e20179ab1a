"""Cutting every dim-1 band of a source tensor in one pass, for all the files that take one.

Files are written one after the other, so without this a tensor split on dim 1 into `parts` bands
(o_proj, down_proj) would be read `parts` times, once per file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dsworker.checkpoint.planned_files import OutFile
from dsworker.checkpoint.regions import ReaderCache, Region, copy_bands, one_pass_key
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter


class OnePass:
    """Cut each dim-1 split tensor in one pass for all the files of this process that take a band.

    When the first file that takes a band of a tensor is written, every band is cut from the same
    chunk of rows: its own goes out sequentially, the others' are pwritten at their (known) offsets
    into the later files' temporary files, opened early; those files step over them when their turn
    comes. Memory stays bounded by the row chunk. Off with checksums (the hash needs the bytes in
    order).
    """

    MAX_OPEN = 256  # files held open early; beyond that a band waits for its own file's turn

    def __init__(self, jobs: list[OutFile], root: Path, checksum: bool) -> None:
        self.jobs = jobs
        self.root = root
        self.member: dict[tuple[int, int], tuple[str, str]] = {}
        self.groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.done: set[tuple[int, int]] = set()
        self.writers: dict[int, SafetensorsWriter] = {}
        self._offsets: dict[int, list[int]] = {}
        if checksum:
            return
        groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for ji, j in enumerate(jobs):
            for ei, e in enumerate(j.entries):
                if e.const is not None or e.lora is not None or e.transform is not None:
                    continue
                k = one_pass_key(e.region) if e.region is not None else None
                if k is not None:
                    groups.setdefault(k, []).append((ji, ei))
        self.groups = {k: v for k, v in groups.items() if len(v) > 1}
        for k, v in self.groups.items():
            for m in v:
                self.member[m] = k

    def take(self, ji: int) -> SafetensorsWriter | None:
        """The writer opened early for job `ji`, now owned by the caller (None if none)."""
        return self.writers.pop(ji, None)

    def _writer(self, ji: int) -> SafetensorsWriter | None:
        w = self.writers.get(ji)
        if w is None and len(self.writers) < self.MAX_OPEN:
            w = self.writers[ji] = self.jobs[ji].open_writer(self.root, False)
        return w

    def _offset(self, ji: int, ei: int, w: SafetensorsWriter) -> int:
        offs = self._offsets.get(ji)
        if offs is None:
            offs = [len(w.header)]
            for e in self.jobs[ji].entries:
                offs.append(offs[-1] + e.nbytes)
            self._offsets[ji] = offs
        return offs[ei]

    def cut(
        self,
        ji: int,
        ei: int,
        w: SafetensorsWriter,
        readers: ReaderCache,
        advance: Callable[[int], None],
    ) -> None:
        """Write entry (ji, ei) to `w` and, in the same pass, its sibling bands to later files."""
        regs: list[Region] = []
        sinks: list[Callable[[int, memoryview], None]] = []
        for m in self.groups[self.member[(ji, ei)]]:
            if m in self.done:
                continue
            e = self.jobs[m[0]].entries[m[1]]
            assert e.region is not None
            if m == (ji, ei):
                sinks.append(lambda _off, data: w.write(data))
            else:
                if m[0] < ji:  # an earlier file: always done already
                    continue
                mw = w if m[0] == ji else self._writer(m[0])
                if mw is None:
                    continue
                base = self._offset(m[0], m[1], mw)
                sinks.append(lambda off, data, mw=mw, base=base: mw.write_at(base + off, data))
            regs.append(e.region)
            self.done.add(m)
        copy_bands(regs, sinks, readers, advance)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()
