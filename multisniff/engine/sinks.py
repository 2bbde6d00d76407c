"""Where live pcapng bytes go: a file descriptor (stdout), Wireshark's stdin, or a caller's own
file object or async writer.

A sink's `write` returns when the bytes are out; a slow reader makes it slow, which is the
backpressure the whole session relies on. A reader that went away raises `SinkClosed`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from typing import Any, BinaryIO, Protocol

import anyio
from anyio.abc import Process

from multisniff.errors import OutputError, UsageError


class SinkClosed(Exception):
    """The reader of the live output went away (closed pipe, Wireshark closed)."""


class ByteSink(Protocol):
    name: str

    async def write(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


class FdSink:
    """Writes to a file descriptor from a worker thread, so that a blocked pipe blocks only
    this writer. A write cut off by cancellation leaves the stream unusable: later writes are
    refused instead of interleaving with the abandoned one."""

    def __init__(self, fd: int, name: str, *, close: bool = False) -> None:
        self.fd = fd
        self.name = name
        self._close = close
        self._broken = False

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BrokenPipeError as exc:
                raise SinkClosed(f"the reader of {self.name} went away") from exc
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise SinkClosed(f"the reader of {self.name} went away") from exc
                reason = (exc.strerror or str(exc)).lower()
                raise OutputError(f"Cannot write {self.name}: {reason}; free space or choose "
                                  "another output with -o.") from exc
            view = view[written:]

    async def write(self, data: bytes) -> None:
        if self._broken:
            raise SinkClosed(f"{self.name} was abandoned in the middle of a write")
        self._broken = True
        await anyio.to_thread.run_sync(self._write_all, data, abandon_on_cancel=True)
        self._broken = False

    async def aclose(self) -> None:
        if self._close:
            os.close(self.fd)


def wireshark_command(program: str) -> list[str]:
    # -k: start capturing at once; -i -: read pcapng from stdin; show the NRB names.
    return [program, "-k", "-i", "-", "-o", "nameres.network_name:TRUE"]


class WiresharkSink:
    """Wireshark reading the live stream on its stdin; its closing ends the capture."""

    name = "Wireshark"

    def __init__(self, process: Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> WiresharkSink:
        program = shutil.which("wireshark")
        if program is None:
            raise UsageError("--wireshark needs the wireshark program, which is not on PATH; "
                             "install it or write to a file with -o.")
        process = await anyio.open_process(wireshark_command(program), stdin=subprocess.PIPE,
                                           stdout=subprocess.DEVNULL)
        return cls(process)

    async def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise SinkClosed("Wireshark was closed") from exc

    async def wait_closed(self) -> None:
        """Returns when Wireshark has exited: closing it must end the capture even when no
        write comes to notice it (idle pods, or a capture whose traffic is over)."""
        await self.process.wait()

    async def aclose(self) -> None:
        # Wireshark keeps showing what it got; we only end its input.
        if self.process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await self.process.stdin.aclose()


class FileObjectSink:
    """A caller's writable binary file object (an open file, a BytesIO, a socket's makefile),
    written from a worker thread so that a slow one slows only the writer. The caller owns it:
    it is flushed at the end, never closed."""

    def __init__(self, file: BinaryIO, name: str | None = None) -> None:
        self.file = file
        self.name = name or str(getattr(file, "name", None) or type(file).__name__)

    def _write_all(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except BrokenPipeError as exc:
            raise SinkClosed(f"the reader of {self.name} went away") from exc
        except (OSError, ValueError) as exc:  # ValueError: the caller closed it
            raise SinkClosed(f"{self.name} cannot be written any more ({exc})") from exc

    async def write(self, data: bytes) -> None:
        await anyio.to_thread.run_sync(self._write_all, data)

    async def aclose(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            await anyio.to_thread.run_sync(self.file.flush)


class AsyncWriter(Protocol):
    async def write(self, data: bytes, /) -> Any: ...


class AsyncWriterSink:
    """A caller's async byte sink: anything with ``async write(bytes)``, such as an anyio
    ByteSendStream wrapped to have one, or an aiofiles file. The caller owns it: it is never
    closed here."""

    def __init__(self, writer: AsyncWriter, name: str | None = None) -> None:
        self.writer = writer
        self.name = name or type(writer).__name__

    async def write(self, data: bytes) -> None:
        try:
            await self.writer.write(data)
        except (BrokenPipeError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise SinkClosed(f"the reader of {self.name} went away") from exc

    async def aclose(self) -> None:
        pass
