"""Live outputs at their edges: Wireshark (a stand-in program on PATH) closing ends the capture,
stdout as a pipe whose reader goes away, and the per-pod table."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode, MemorySink
from fakes import FakeCluster, make_pod
from rich.console import Console

from multisniff import ui
from multisniff.capture.model import Target
from multisniff.engine.output import FileOutput, LiveOutput
from multisniff.engine.session import Session
from multisniff.engine.sinks import FdSink, SinkClosed, WiresharkSink, wireshark_command
from multisniff.errors import ExitCode, RefusedError, UsageError
from multisniff.kube.model import PodSelector
from multisniff.pcap.reading import CaptureReader
from multisniff.profiles import Profile

pytestmark = pytest.mark.anyio

PROFILE = Profile(labels="app=web", namespace="shop", follow=False, stop_grace=5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def endless_mode() -> FakeMode:
    def make(target: Target) -> FakeCapture:
        return FakeCapture(name=target.pod.ref.name, total=1, interval=0.002, forever=True)
    return FakeMode(make=make)


def cluster() -> FakeCluster:
    fake = FakeCluster()
    fake.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    fake.add_pod(make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.0.0.3"))
    return fake


def live(sink: object) -> LiveOutput:
    return LiveOutput(sink, buffer_chunks=4, reorder_window=0.2,  # type: ignore[arg-type]
                      flush_interval=0.05, max_pending=1000, grace=5)


def test_the_file_output_makes_a_file_private_but_leaves_a_fifos_mode(tmp_path: Path) -> None:
    existing = tmp_path / "old.pcapng"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    os.close(FileOutput(str(existing), grace=1.0)._create_output())
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600 and existing.read_bytes() == b""
    # what -o /dev/null would do to the device as root: a FIFO stands in for it here
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    fifo.chmod(0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.close(FileOutput(str(fifo), grace=1.0)._create_output())
    finally:
        os.close(reader)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o644


def test_wireshark_is_asked_to_resolve_names() -> None:
    assert wireshark_command("/usr/bin/wireshark") == [
        "/usr/bin/wireshark", "-k", "-i", "-", "-o", "nameres.network_name:TRUE"]


async def test_wireshark_closing_ends_the_capture(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    got = tmp_path / "wireshark-got.pcapng"
    program = tmp_path / "wireshark"
    # Reads 3000 bytes and exits, as a user closing the window would.
    program.write_text(f"#!/bin/sh\nhead -c 3000 > {got}\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sink = await WiresharkSink.start()
    mode = endless_mode()
    output = live(sink)
    session = Session(cluster(), mode, PROFILE, output)
    output.on_closed = lambda why: session.stop(why)
    with anyio.fail_after(20):
        result = await session.run()
        await sink.process.wait()
    assert result.stop_reason == "Wireshark was closed"
    assert result.exit_code == ExitCode.OK
    assert all(capture.closed for capture in mode.opened)
    reader = CaptureReader()
    reader.feed(got.read_bytes())
    assert reader.format == "pcapng"
    await sink.process.aclose()


async def test_wireshark_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="--wireshark needs the wireshark program"):
        await WiresharkSink.start()


async def test_closed_pipe_is_sink_closed() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    sink = FdSink(write_fd, "stdout", close=True)
    with pytest.raises(SinkClosed, match="the reader of stdout went away"):
        await sink.write(b"x" * 10)
    await sink.aclose()


async def test_refusal_from_the_cluster_propagates_with_its_exit_code() -> None:
    class Refusing(FakeCluster):
        async def list_pods(self, selector: PodSelector):  # type: ignore[no-untyped-def]
            raise RefusedError("Namespace shop does not exist; check -n/--namespace.")

    session = Session(Refusing(), endless_mode(), PROFILE, live(MemorySink()))
    with pytest.raises(RefusedError) as info:
        await session.run()
    assert info.value.exit_code == ExitCode.REFUSED


async def test_live_table_shows_every_pod() -> None:
    mode = endless_mode()
    session = Session(cluster(), mode, PROFILE, output := live(MemorySink()))
    del output
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    table = ui.LiveTable(session, console)
    async with anyio.create_task_group() as tg:
        async def stop_later() -> None:
            await anyio.sleep(0.3)
            console.print(table.render())
            session.stop("test over")
        tg.start_soon(stop_later)
        await session.run()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for word in ("pod", "state", "mode", "packets", "bytes", "rate", "drops", "shop/web-a",
                 "shop/web-b", "capturing", "fake"):
        assert word in text
