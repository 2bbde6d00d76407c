"""Fakes of our own interfaces for the engine's tests: a capture mode whose remote captures
produce generated pcap, a cluster whose watch is fed by the test, and sinks that are slow.

Each generated packet's payload says which pod sent it and its sequence number, so a test can
check that every packet arrived exactly once, under the right interface.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from fakes import FakeCluster

from multisniff.capture import registry
from multisniff.capture.model import Assessment, CaptureReport, CaptureSpec, Target
from multisniff.kube.model import PodEvent, PodSelector

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
BASE_SECONDS = 1_700_000_000


def payload(pod: str, seq: int) -> bytes:
    return f"{pod}#{seq:06d}".encode().ljust(60, b".")


def pcap_record(seconds: int, micros: int, data: bytes) -> bytes:
    return struct.pack("<IIII", seconds, micros, len(data), len(data)) + data


@dataclass(eq=False)
class FakeCapture:
    """A remote tcpdump: `total` packets, delivered in chunks of `per_chunk`.

    With `interval`, packets are produced by a clock into a `kernel_buffer` of that many
    packets, and those that do not fit (the reader is not reading) are dropped, as the kernel
    does; `wait()` then reports them as tcpdump would."""

    name: str
    total: int
    offset_us: int = 0
    step_us: int = 1000
    per_chunk: int = 7
    interval: float | None = None
    kernel_buffer: int = 16
    forever: bool = False
    bound_to_container: bool = True
    killed: bool = False
    """Its stream ends as a killed container's would: no exit status, no statistics."""
    silent: bool = False
    """Killed before tcpdump wrote anything, its header included."""
    closed_under: bool = False
    """It ends as a watchdog whose stdin was closed under it ends tcpdump: exit 0, unasked."""
    break_after: int | None = None
    """Its exec stream breaks (read() raises ClusterError) once this many packets went out."""
    produced: int = 0
    delivered: int = 0
    dropped: int = 0
    stopped: bool = False
    closed: bool = False
    reads: int = 0
    _header_sent: bool = False
    _buffer: deque[bytes] = field(default_factory=deque)
    _wake: anyio.Event = field(default_factory=anyio.Event)

    def _packet(self, seq: int) -> bytes:
        micros = self.offset_us + seq * self.step_us
        return pcap_record(BASE_SECONDS + micros // 1_000_000, micros % 1_000_000,
                           payload(self.name, seq))

    def _done(self) -> bool:
        return self.stopped or (not self.forever and self.produced >= self.total)

    async def produce(self) -> None:
        """The clock-driven producer (only with `interval`)."""
        assert self.interval is not None
        while not self._done():
            await anyio.sleep(self.interval)
            if self._done():
                break
            if len(self._buffer) < self.kernel_buffer:
                self._buffer.append(self._packet(self.produced))
            else:
                self.dropped += 1
            self.produced += 1
            self._wake.set()
        self._wake.set()

    async def read(self) -> bytes:
        self.reads += 1
        await anyio.sleep(0)
        if self.silent:
            return b""
        if not self._header_sent:
            self._header_sent = True
            return PCAP_HEADER
        if self.break_after is not None and self.delivered >= self.break_after:
            from multisniff.errors import ClusterError

            raise ClusterError("The exec stream broke: connection reset by peer.")
        if self.interval is None:
            if self._done():
                return b""
            count = min(self.per_chunk, self.total - self.produced) if not self.forever \
                else self.per_chunk
            chunk = b"".join(self._packet(self.produced + i) for i in range(count))
            self.produced += count
            self.delivered += count
            return chunk
        while not self._buffer:
            if self._done():
                return b""
            self._wake = anyio.Event()
            await self._wake.wait()
        chunk = b"".join(self._buffer)
        self.delivered += len(self._buffer)
        self._buffer.clear()
        return chunk

    async def listening(self) -> None:
        await anyio.sleep(0)

    async def stop(self) -> None:
        self.stopped = True
        self._wake.set()

    async def wait(self) -> CaptureReport:
        if self.killed or self.silent:
            return CaptureReport(exit_code=None, message="container not running")
        return CaptureReport(exit_code=0, captured=self.delivered + len(self._buffer),
                             received=self.produced, dropped_by_kernel=self.dropped,
                             unasked=self.closed_under and not self.stopped)


@dataclass(eq=False)
class FakeMode:
    """A CaptureMode: `captures` maps pod name to a factory of its FakeCapture."""

    make: Callable[[Target], FakeCapture]
    name: str = "fake"
    refuse: set[str] = field(default_factory=set)
    fail_open: set[str] = field(default_factory=set)
    open_delay: dict[str, float] = field(default_factory=dict)
    """Seconds that starting the capture of a pod takes (an upload, an image pull)."""
    opened: list[FakeCapture] = field(default_factory=list)
    specs: list[CaptureSpec] = field(default_factory=list)
    sessions_closed: int = 0
    """How often the engine ended the mode's session (once per session)."""

    async def aclose(self) -> None:
        self.sessions_closed += 1

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        return set(namespaces)

    async def assess(self, target: Target) -> Assessment:
        if target.pod.ref.name in self.refuse:
            return Assessment(False, "the fake refuses it")
        return Assessment(True, "the fake can", creates=(f"nothing in {target.label}",))

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[FakeCapture]:
        from multisniff.errors import ClusterError

        if target.pod.ref.name in self.fail_open:
            raise ClusterError(f"The fake cannot exec into {target.label}; it said so.")
        await anyio.sleep(self.open_delay.get(target.pod.ref.name, 0))
        capture = self.make(target)
        self.opened.append(capture)
        self.specs.append(spec)
        try:
            async with anyio.create_task_group() as tg:
                if capture.interval is not None:
                    tg.start_soon(capture.produce)
                yield capture
                capture.stopped = True
                capture._wake.set()
        finally:
            capture.closed = True


@contextmanager
def registered(mode: FakeMode) -> Iterator[FakeMode]:
    """`mode` in the registry under its name while the block runs, so that
    `multisniff.capture(mode=NAME, cluster=...)` uses it."""
    registry.register(registry.ModeEntry(mode.name, lambda cluster, options: mode,
                                         "a fake of our own", in_auto=False))
    try:
        yield mode
    finally:
        registry.unregister(mode.name)


class WatchedCluster(FakeCluster):
    """A FakeCluster whose watch yields what the test sends, for as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.send_event: MemoryObjectSendStream[PodEvent]
        self._receive: MemoryObjectReceiveStream[PodEvent]
        self.send_event, self._receive = anyio.create_memory_object_stream[PodEvent](100)

    async def watch_pods(self, selector: PodSelector,  # type: ignore[override]
                         resource_version: str) -> AsyncIterator[PodEvent]:
        async for event in self._receive:
            yield event

    def close(self) -> None:
        self.send_event.close()
        self._receive.close()


class MemorySink:
    """A sink that keeps what it gets; `gate` (when set) makes writes wait for the test."""

    name = "memory"

    def __init__(self) -> None:
        self.data = bytearray()
        self.gate: anyio.Event | None = None
        self.closed = False
        self.writes = 0

    async def write(self, data: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.writes += 1
        self.data += data

    async def aclose(self) -> None:
        self.closed = True
