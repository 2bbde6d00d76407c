"""The two outputs of a session: a live stream (stdout, Wireshark) and an exactly ordered file.

Both take each run's pcapng stream (see `runs.Transcoder`) in chunks, the names of pod IPs, and
the end of each run; both write NRBs and one ISB per run.

`LiveOutput`: one bounded memory stream carries every run's chunks to the merger task, which
owns a live `TimelineMerger` (bounded reorder window, a clock tick so idle pods don't hold the
output back); the writer task writes what the merger releases to the sink. A slow sink blocks the
writer, then the merger, then the stream fills and the capture readers stop reading: memory is
set by `buffer_chunks` and `max_pending`, not by traffic.

`FileOutput`: each run is spooled to its own pcapng file in OUT.parts/ (awaited writes in a worker
thread, so a slow disk slows the readers; a run's chunks are gathered up to SPOOL_BYTES or
SPOOL_SECONDS first, since handing each small chunk to a thread costs more CPU than writing it);
the spool files are readable up to their last block after a crash, and
`multisniff merge OUT.parts/*` recovers them. At the end they are merged exactly (the exact mode
of the same merger as `multisniff merge`) into OUT with NRB and ISBs, and removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from multisniff.engine.events import EVENTS_INTERFACE, Event, encode_event, encode_header
from multisniff.engine.runs import CaptureRun
from multisniff.engine.sinks import ByteSink, SinkClosed, WiresharkSink
from multisniff.errors import OutputError
from multisniff.pcap.blocks import NameBlock, NameRecord
from multisniff.pcap.merging import Source, TimelineMerger
from multisniff.pcap.writing import encode_nrb

log = logging.getLogger("multisniff")

CHUNK = 1 << 20
SPOOL_BYTES = 64 * 1024
SPOOL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Data:
    run: CaptureRun
    data: bytes


@dataclass(frozen=True, slots=True)
class _End:
    run: CaptureRun


@dataclass(frozen=True, slots=True)
class _Names:
    block: NameBlock


_Item = _Data | _End | _Names


class LiveOutput:
    def __init__(self, sink: ByteSink, *, buffer_chunks: int, reorder_window: float,
                 flush_interval: float, max_pending: int, grace: float,
                 on_closed: Callable[[str], None] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.sink = sink
        self.path = "-" if sink.name == "stdout" else sink.name
        self.merger = TimelineMerger(reorder_window=int(reorder_window * 1e9),
                                     max_pending=max_pending)
        self.buffer_chunks = buffer_chunks
        self._send: MemoryObjectSendStream[_Item]
        self._receive: MemoryObjectReceiveStream[_Item]
        self._out_send: MemoryObjectSendStream[bytes]
        self._out_receive: MemoryObjectReceiveStream[bytes]
        self._sources: dict[CaptureRun, Source] = {}
        self.flush_interval = flush_interval
        self.grace = grace
        self.on_closed = on_closed
        self.clock = clock
        self.reader_gone: str | None = None
        self.bytes_written = 0
        self._finished = False
        self._open = False
        self._events: Source | None = None

    # --- the session's side -------------------------------------------------------------------

    async def names(self, records: list[NameRecord]) -> None:
        if records:
            await self._send.send(_Names(NameBlock(records=records)))

    async def write(self, run: CaptureRun, data: bytes) -> None:
        await self._send.send(_Data(run, data))

    async def end(self, run: CaptureRun) -> None:
        await self._send.send(_End(run))

    def event(self, event: Event) -> None:
        """An event, fed to the merger at once: it is as old as the clock says, so the events'
        source is caught up to the clock at every tick and never holds the others back."""
        if not self._open or self._finished:
            log.debug("Not written, the output is closed: %s", event.text)
            return
        if self._events is None:
            self._events = self.merger.add_source(EVENTS_INTERFACE)
            self.merger.feed(self._events, encode_header())
        self.merger.feed(self._events, encode_event(event))

    # --- merger and writer --------------------------------------------------------------------

    def _handle(self, item: _Item) -> None:
        merger = self.merger
        if isinstance(item, _Names):
            merger.writer.add_block(encode_nrb(item.block))
            return
        run = item.run
        source = self._sources.get(run)
        if isinstance(item, _Data):
            if source is None:
                source = self._sources[run] = merger.add_source(run.label)
            merger.feed(source, item.data)
            run.late = source.late
            return
        if source is None:
            return
        merger.end_source(source)
        run.late = source.late
        stats = run.statistics()
        if stats is not None and source.interface_ids:
            merger.add_statistics(source, 0, stats)

    async def _merge_loop(self) -> None:
        last_tick = self.clock()
        tick = int(self.flush_interval * 1e9)
        async with self._out_send:
            while True:
                ended = False
                with anyio.move_on_after(self.flush_interval):
                    try:
                        item = await self._receive.receive()
                    except anyio.EndOfStream:
                        ended = True
                    else:
                        self._handle(item)
                if ended:
                    break
                now = self.clock()
                if now - last_tick >= tick:
                    if self._events is not None:
                        self.merger.mark_caught_up(self._events, now)
                    self.merger.advance(now)
                    last_tick = now
                data = self.merger.pull()
                if data:
                    await self._out_send.send(data)
            self._finished = True
            data = self.merger.finish()
            if data:
                await self._out_send.send(data)

    def _reader_went_away(self, why: str) -> None:
        if self.reader_gone is not None:
            return
        self.reader_gone = why
        log.info("%s; stopping the capture.", why.capitalize())
        if self.on_closed is not None:
            self.on_closed(why)

    async def _write(self, data: bytes) -> None:
        if self.reader_gone is not None:
            return
        try:
            await self.sink.write(data)
        except SinkClosed as exc:
            self._reader_went_away(str(exc))
        else:
            self.bytes_written += len(data)

    async def _watch_reader(self, sink: WiresharkSink, scope: anyio.CancelScope) -> None:
        with scope:
            await sink.wait_closed()
            self._reader_went_away("Wireshark was closed")

    async def _write_loop(self) -> None:
        async for data in self._out_receive:
            await self._write(data)

    async def _flush_remaining(self) -> None:
        """After the loops ended (or were cancelled): what is still queued goes out."""
        while True:
            try:
                self._handle(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        while True:
            try:
                await self._write(self._out_receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        if not self._finished:
            self._finished = True
            for run in list(self._sources):
                self._handle(_End(run))
            await self._write(self.merger.finish())

    @asynccontextmanager
    async def open(self) -> AsyncIterator[LiveOutput]:
        # The streams exist only while open, so that a session that fails before has none
        # to leak.
        self._send, self._receive = anyio.create_memory_object_stream[_Item](self.buffer_chunks)
        self._out_send, self._out_receive = anyio.create_memory_object_stream[bytes](1)
        self._open = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._merge_loop)
                tg.start_soon(self._write_loop)
                watch_scope = anyio.CancelScope()
                if isinstance(self.sink, WiresharkSink):
                    tg.start_soon(self._watch_reader, self.sink, watch_scope)
                try:
                    yield self
                finally:
                    watch_scope.cancel()
                    self._send.close()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.grace) as scope:
                try:
                    await self._flush_remaining()
                finally:
                    self._receive.close()
                    self._out_send.close()
                    self._out_receive.close()
                    await self.sink.aclose()
            if scope.cancelled_caught:
                log.error("The output could not be flushed within %.0f s; %s may end early.",
                          self.grace, self.path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FileOutput:
    def __init__(self, path: str, *, grace: float) -> None:
        self.path = path
        self.parts = Path(path + ".parts")
        self.grace = grace
        self._fds: dict[CaptureRun, int] = {}
        self._pending: dict[CaptureRun, tuple[float, list[bytes], int]] = {}
        """Per run: when its oldest unwritten chunk came, the chunks, their size."""
        self._files: list[tuple[CaptureRun, Path]] = []
        self._names: list[NameRecord] = []
        self.bytes_written = 0
        self.reader_gone: str | None = None
        self._events_fd: int | None = None
        self._events_path = self.parts / "00-multisniff-events.pcapng"
        self._open = False

    async def names(self, records: list[NameRecord]) -> None:
        self._names.extend(records)

    def _open_part(self, run: CaptureRun) -> int:
        name = _UNSAFE.sub("_", f"{run.number:02d}-{run.label.replace('/', '-')}")
        path = self.parts / f"{name}.pcapng"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OutputError(f"Cannot create {path}: {reason}; check the directory and its "
                              "permissions.") from exc
        self._files.append((run, path))
        return fd

    @staticmethod
    def _write_all(fd: int, data: bytes, name: str) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise OutputError(f"Cannot write {name}: {reason}; free space or choose "
                                  "another output with -o.") from exc

    async def write(self, run: CaptureRun, data: bytes) -> None:
        since, chunks, size = self._pending.get(run) or (time.monotonic(), [], 0)
        chunks.append(data)
        size += len(data)
        if size < SPOOL_BYTES and time.monotonic() - since < SPOOL_SECONDS:
            self._pending[run] = (since, chunks, size)
            return
        self._pending.pop(run, None)
        await self._spool(run, b"".join(chunks))

    async def _spool(self, run: CaptureRun, data: bytes) -> None:
        fd = self._fds.get(run)
        if fd is None:
            fd = self._fds[run] = self._open_part(run)
        await anyio.to_thread.run_sync(self._write_all, fd, data, str(self.parts))

    async def end(self, run: CaptureRun) -> None:
        pending = self._pending.pop(run, None)
        try:
            if pending is not None:
                await self._spool(run, b"".join(pending[1]))
        finally:
            fd = self._fds.pop(run, None)
            if fd is not None:
                os.close(fd)

    def event(self, event: Event) -> None:
        """An event, spooled at once (a few hundred bytes, written in place rather than in a
        worker thread: an event is rare, and this way it is on disk before anything after it)."""
        if not self._open:
            log.debug("Not written, the output is closed: %s", event.text)
            return
        try:
            if self._events_fd is None:
                self._events_fd = os.open(self._events_path, os.O_WRONLY | os.O_CREAT |
                                          os.O_TRUNC | os.O_CLOEXEC, 0o600)
                self._write_all(self._events_fd, encode_header(), str(self.parts))
            self._write_all(self._events_fd, encode_event(event), str(self.parts))
        except (OSError, OutputError) as exc:
            log.error("Cannot write an event to %s (%s): %s", self._events_path, exc, event.text)

    def _create_output(self) -> int:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            # An existing file keeps its mode through O_CREAT: tighten it. Only a file: -o
            # /dev/null (or a FIFO) run as root must not make the device private.
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OutputError(f"Cannot create {self.path}: {reason}; check the directory and "
                              "its permissions.") from exc
        return fd

    def _merge(self) -> None:
        merger = TimelineMerger()
        if self._names:
            merger.writer.add_block(encode_nrb(NameBlock(records=self._names)))
        inputs: list[tuple[CaptureRun, Source, int]] = []
        fds: dict[int, int] = {}
        """Input file of each source, by the source's index."""
        out = self._create_output()
        try:
            for run, path in self._files:
                source = merger.add_source(run.label)
                fds[source.index] = os.open(path, os.O_RDONLY)
                inputs.append((run, source, fds[source.index]))
            if self._events_path.exists():
                source = merger.add_source(EVENTS_INTERFACE)
                fds[source.index] = os.open(self._events_path, os.O_RDONLY)

            def step(source: Source, fd: int) -> None:
                data = os.read(fd, CHUNK)
                if data:
                    merger.feed(source, data)
                else:
                    merger.end_source(source)

            for source in merger.sources:
                step(source, fds[source.index])
            # a chunk's worth at a time: one step may let the merge write a chunk of every
            # spool at once
            limit = merger.step_limit(CHUNK)
            while True:
                self._write_all(out, merger.pull(limit), self.path)
                while merger.held_back:
                    self._write_all(out, merger.pull(limit), self.path)
                wanted = merger.wanted()
                if wanted is None:
                    break
                step(wanted, fds[wanted.index])
            for run, source, _ in inputs:
                stats = run.statistics()
                if stats is not None and source.interface_ids:
                    merger.add_statistics(source, 0, stats)
            data = merger.pull() + merger.finish()
            self._write_all(out, data, self.path)
            self.bytes_written = os.fstat(out).st_size
        finally:
            os.close(out)
            for fd in fds.values():
                os.close(fd)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[FileOutput]:
        try:
            self.parts.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OutputError(f"Cannot create {self.parts}: {reason}; check the directory and "
                              "its permissions.") from exc
        self._open = True
        try:
            yield self
        finally:
            self._open = False
            if self._events_fd is not None:
                os.close(self._events_fd)
                self._events_fd = None
            with anyio.CancelScope(shield=True):
                for run in list({**self._pending, **self._fds}):
                    try:
                        await self.end(run)
                    except OutputError as exc:  # the merge keeps what did reach the disk
                        log.error("%s", exc)
                await self._finish()

    async def _finish(self) -> None:
        try:
            # Local files only: the merge is bounded by their size, so no time bound here.
            await anyio.to_thread.run_sync(self._merge)
        except (OutputError, OSError) as exc:
            log.error("Could not merge the capture into %s (%s); the per-pod captures are kept "
                      "in %s: run `multisniff merge -o %s %s/*`.", self.path, exc, self.parts,
                      self.path, self.parts)
            return
        shutil.rmtree(self.parts, ignore_errors=True)
