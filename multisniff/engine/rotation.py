"""A ring buffer of capture files for long runs, as dumpcap's `-b` does it.

`--rotate-size SIZE` switches to the next file once the current one has reached SIZE (dumpcap
`-b filesize:`), `--rotate-every DURATION` once it has been written for DURATION (`-b
duration:`; checked as packets come, so an idle capture switches with its next packet), and
`--keep-files N` keeps only the newest N files, removing older ones as new ones begin (`-b
files:`). Files are named as dumpcap names them: the output's name, a five-digit counter from
00001 and the time the file was begun, before the suffix: `out_00001_20250101120000.pcapng`.

The stream comes from the live output (merged within the reorder window): this sink walks it
block by block, remembers the section header, every interface and every name record, and
begins each new file with them, so that each file is a complete pcapng that Wireshark opens on
its own with every interface and name. A file is closed when the next one begins and at the
end; writes go straight to the file, so an abrupt stop loses only what was not written yet.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from multisniff.errors import OutputError
from multisniff.pcap.blocks import EPB, IDB, NRB, PACKET_BLOCK, SHB, SPB

_HEADER = struct.Struct("<II")
_PACKETS = (EPB, SPB, PACKET_BLOCK)
"""A new file begins only for a packet: statistics and other blocks end the current one."""


def ring_name(path: str, counter: int, begun: float) -> str:
    """dumpcap's name of the ring's `counter`-th file: PREFIX_NNNNN_YYYYmmddHHMMSS.SUFFIX."""
    prefix, suffix = os.path.splitext(path)
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(begun))
    return f"{prefix}_{counter:05d}_{stamp}{suffix}"


def ring_files(path: str) -> list[Path]:
    """The files of the ring of `path` that exist, oldest first."""
    prefix, suffix = os.path.splitext(path)
    base = Path(prefix)
    found = []
    for candidate in base.parent.glob(f"{base.name}_*{suffix}"):
        middle = candidate.name[len(base.name) + 1:len(candidate.name) - len(suffix)]
        counter, _, stamp = middle.partition("_")
        if len(counter) == 5 and counter.isdigit() and len(stamp) == 14 and stamp.isdigit():
            found.append(candidate)
    return sorted(found)


class RotatingFileSink:
    """A live pcapng stream (SHB first, whole blocks per write) into a ring of files."""

    def __init__(self, path: str, *, max_size: int | None, every: float | None,
                 keep_files: int | None, clock: Callable[[], float] = time.time) -> None:
        self.name = path
        self.path = path
        self.max_size = max_size
        self.every = every
        self.keep_files = keep_files
        self.clock = clock
        self.files: list[str] = []
        """Every file begun, oldest first (those removed by --keep-files included)."""
        self.removed: list[str] = []
        self._header: list[bytes] = []
        """SHB, then every IDB and NRB, in stream order: what each new file begins with."""
        self._fd: int | None = None
        self._size = 0
        self._begun = 0.0

    def _due(self) -> bool:
        if self._fd is None:
            return True
        if self.max_size is not None and self._size >= self.max_size:
            return True
        return self.every is not None and self.clock() - self._begun >= self.every

    def _begin(self) -> None:
        self._close()
        self._begun = self.clock()
        name = ring_name(self.path, len(self.files) + 1, self._begun)
        try:
            self._fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o600)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OutputError(f"Cannot create {name}: {reason}; check the directory and its "
                              "permissions.") from exc
        self.files.append(name)
        self._size = 0
        if self._header:
            self._write(b"".join(self._header))
        if self.keep_files is not None:
            while len(self.files) - len(self.removed) > self.keep_files:
                oldest = self.files[len(self.removed)]
                self.removed.append(oldest)
                with contextlib.suppress(OSError):  # gone already: the ring is as wanted
                    os.unlink(oldest)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise OutputError(f"Cannot write {self.files[-1]}: {reason}; free space or "
                                  "choose another output with -o.") from exc
            view = view[written:]
            self._size += written

    def write_blocks(self, data: bytes) -> None:
        """Write a run of whole blocks, switching files between blocks where one is due."""
        view = memoryview(data)
        start = at = 0
        end = len(data)
        while at < end:
            block_type, length = _HEADER.unpack_from(data, at)
            if length < 12 or at + length > end:
                raise OutputError(f"The stream for {self.path} is cut at byte {at} (a block of "
                                  f"{length} bytes); this is a bug in multisniff.")
            if block_type in (SHB, IDB, NRB):
                if block_type == SHB:
                    self._header = []
                self._header.append(bytes(view[at:at + length]))
            elif block_type in _PACKETS and self._due():
                # Before the first file, every block so far is in the header it begins with.
                if self._fd is not None and at > start:
                    self._write(view[start:at])
                start = at
                self._begin()
            at += length
        if self._fd is None:
            self._begin()  # the header alone, as a capture without packets has it
        elif start < end:
            self._write(view[start:end])

    async def write(self, data: bytes) -> None:
        await anyio.to_thread.run_sync(self.write_blocks, data)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def aclose(self) -> None:
        self._close()

    @property
    def kept(self) -> list[str]:
        """The files of this run that are still there."""
        return [name for name in self.files if name not in self.removed]
