"""The capture session with fakes of our own interfaces: fan-out, merge, limits, churn,
backpressure and teardown. Outputs are read back with our reader and, where it matters, tshark."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode, MemorySink, WatchedCluster
from fakes import FakeCluster, make_pod

from multisniff.capture.model import Target
from multisniff.engine.output import FileOutput, LiveOutput
from multisniff.engine.session import NothingMatches, Session, dry_run
from multisniff.errors import ExitCode
from multisniff.kube.model import ContainerInfo, NodeInfo, PodEvent, PodEventType, PodInfo, PodRef
from multisniff.pcap.reading import CaptureReader, packet_fields
from multisniff.profiles import Profile
from multisniff.ui import summary_json, summary_lines

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def read_capture(data: bytes) -> tuple[list[str], list[tuple[str, bytes]], CaptureReader]:
    """(interface names, [(interface name, payload)] in file order, the reader)."""
    reader = CaptureReader()
    batch = reader.feed(data)
    assert reader.finish() is None
    names = [info.name or "" for info in reader.interfaces]
    packets = []
    for packet in batch.packets:
        oid, _, caplen, _ = packet_fields(packet)
        raw = b"".join(packet)
        packets.append((names[oid], raw[28:28 + caplen]))
    return names, packets, reader


def cluster_with(*names: str, namespace: str = "shop") -> FakeCluster:
    cluster = FakeCluster()
    for i, name in enumerate(names):
        cluster.add_pod(make_pod(name, namespace=namespace, labels={"app": "web"},
                                 ip=f"10.1.0.{i + 10}"))
    return cluster


def mode_with(counts: dict[str, int], **kwargs: object) -> FakeMode:
    def make(target: Target) -> FakeCapture:
        name = target.pod.ref.name
        index = sorted(counts).index(name) if name in counts else 0
        return FakeCapture(name=name, total=counts.get(name, 10), offset_us=index * 333,
                           **kwargs)  # type: ignore[arg-type]
    return FakeMode(make=make)


PROFILE = Profile(labels="app=web", namespace="shop", follow=False, stop_grace=5)


def live(sink: MemorySink, **kwargs: object) -> LiveOutput:
    options: dict[str, object] = dict(buffer_chunks=4, reorder_window=0.5, flush_interval=0.05,
                                      max_pending=1000, grace=5)
    options.update(kwargs)
    return LiveOutput(sink, **options)  # type: ignore[arg-type]


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "out.pcapng"


async def test_file_output_has_every_packet_once_in_time_order(out: Path) -> None:
    counts = {"web-a": 50, "web-b": 30, "web-c": 41}
    cluster = cluster_with(*counts)
    mode = mode_with(counts)
    session = Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5))
    result = await session.run()
    assert result.exit_code == ExitCode.OK
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not Path(str(out) + ".parts").exists()
    names, packets, reader = read_capture(out.read_bytes())
    assert sorted(names) == ["shop/web-a", "shop/web-b", "shop/web-c"]
    for info in reader.interfaces:
        assert "container app" in (info.description or "")
        assert "mode fake" in (info.description or "")
    for pod, count in counts.items():
        got = [data for name, data in packets if name == f"shop/{pod}"]
        assert [data[: len(pod) + 7] for data in got] == [
            f"{pod}#{seq:06d}".encode() for seq in range(count)]
    assert all(capture.closed for capture in mode.opened)
    assert [run.packets for run in result.runs] == [50, 30, 41]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
async def test_tshark_reads_interfaces_names_and_statistics(out: Path) -> None:
    counts = {"web-a": 5, "web-b": 7}
    session = Session(cluster_with(*counts), mode_with(counts), PROFILE,
                      FileOutput(str(out), grace=5))
    await session.run()
    fields = subprocess.run(
        ["tshark", "-r", str(out), "-T", "fields", "-e", "frame.interface_name",
         "-e", "frame.time_epoch"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in fields.splitlines()]
    assert sorted({name for name, _ in rows}) == ["shop/web-a", "shop/web-b"]
    times = [float(t) for _, t in rows]
    assert times == sorted(times) and len(rows) == 12
    data = out.read_bytes()
    reader = CaptureReader()
    batch = reader.feed(data)
    assert len(batch.statistics) == 2
    assert {s.ifrecv for s in batch.statistics} == {5, 7}
    assert [record.names for block in batch.names for record in block.records] == [
        ("shop/web-a",), ("shop/web-b",)]


async def test_live_output_has_every_packet_once() -> None:
    counts = {"web-a": 40, "web-b": 25}
    sink = MemorySink()
    session = Session(cluster_with(*counts), mode_with(counts), PROFILE, live(sink))
    result = await session.run()
    assert result.exit_code == ExitCode.OK
    assert sink.closed
    names, packets, _reader = read_capture(bytes(sink.data))
    assert sorted(names) == ["shop/web-a", "shop/web-b"]
    assert len(packets) == 65
    assert len({data for _, data in packets}) == 65
    for name, data in packets:
        assert data.startswith(name.split("/")[1].encode())


async def test_count_is_a_total_over_all_pods(out: Path) -> None:
    counts = {"web-a": 100, "web-b": 100}
    profile = PROFILE.replace(count=37)
    session = Session(cluster_with(*counts), mode_with(counts, forever=True), profile,
                      FileOutput(str(out), grace=5))
    result = await session.run()
    _, packets, _ = read_capture(out.read_bytes())
    assert len(packets) == 37
    assert result.packets == 37
    assert "--count" in result.stop_reason
    assert result.exit_code == ExitCode.OK


async def test_max_size_is_a_total(out: Path) -> None:
    counts = {"web-a": 100, "web-b": 100}
    profile = PROFILE.replace(max_size=10_000)
    session = Session(cluster_with(*counts), mode_with(counts, forever=True), profile,
                      FileOutput(str(out), grace=5))
    result = await session.run()
    assert 0 < sum(run.bytes for run in result.runs) <= 10_000
    assert "--max-size" in result.stop_reason


async def test_duration_stops_endless_captures(out: Path) -> None:
    counts = {"web-a": 1, "web-b": 1}
    mode = mode_with(counts, interval=0.01, forever=True)
    session = Session(cluster_with(*counts), mode, PROFILE.replace(duration=0.3),
                      FileOutput(str(out), grace=5))
    with anyio.fail_after(10):
        result = await session.run()
    assert "--duration" in result.stop_reason
    assert all(capture.stopped and capture.closed for capture in mode.opened)
    assert result.exit_code == ExitCode.OK
    assert mode.specs[0].lifetime == (
        0.3 + PROFILE.startup_timeout + PROFILE.lifetime_margin)


async def test_duration_counts_from_when_the_slowest_start_is_done(out: Path) -> None:
    counts = {"web-a": 1, "web-b": 1}
    mode = mode_with(counts, interval=0.01, forever=True)
    mode.open_delay = {"web-b": 0.6}
    session = Session(cluster_with(*counts), mode, PROFILE.replace(duration=0.3),
                      FileOutput(str(out), grace=5))
    with anyio.fail_after(10):
        result = await session.run()
    assert [run.state for run in result.runs] == ["done", "done"]
    assert all(run.packets > 5 for run in result.runs)


async def test_stalled_sink_bounds_memory_and_counts_drops() -> None:
    counts = {"web-a": 1, "web-b": 1, "web-c": 1}
    mode = mode_with(counts, interval=0.002, forever=True, kernel_buffer=8)
    sink = MemorySink()
    sink.gate = anyio.Event()
    output = live(sink, buffer_chunks=3)
    session = Session(cluster_with(*counts), mode, PROFILE.replace(max_pending=50), output)
    most = 0

    async def watch_buffer() -> None:
        nonlocal most
        while True:
            # Items waiting between the readers and the merger (bounded by buffer_chunks).
            most = max(most, output._send.statistics().current_buffer_used)
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_buffer)

        async def stall_then_stop() -> None:
            await anyio.sleep(0.5)
            assert sum(capture.dropped for capture in mode.opened) > 0
            session.stop("test over")
            assert sink.gate is not None
            sink.gate.set()

        tg.start_soon(stall_then_stop)
        with anyio.fail_after(20):
            result = await session.run()
        tg.cancel_scope.cancel()
    assert most <= 3
    _, packets, _ = read_capture(bytes(sink.data))
    produced = sum(capture.produced for capture in mode.opened)
    written = len(packets)
    dropped = sum(run.dropped for run in result.runs)
    assert written == result.packets
    assert written + dropped == produced
    assert dropped > 0
    statistics = CaptureReader().feed(bytes(sink.data)).statistics
    assert sum(isb.osdrop or 0 for isb in statistics) == sum(c.dropped for c in mode.opened)
    assert sum(isb.ifrecv or 0 for isb in statistics) == produced


@pytest.mark.parametrize("kind", ["file", "live", "live-stalled"])
async def test_cancel_leaves_no_task_and_closes_every_capture(out: Path, kind: str) -> None:
    counts = {"web-a": 1, "web-b": 1}
    mode = mode_with(counts, interval=0.002, forever=True)
    sink = MemorySink()
    if kind == "live-stalled":
        sink.gate = anyio.Event()  # never set: the reader is gone for good
    output = FileOutput(str(out), grace=5) if kind == "file" else live(sink, grace=0.5)
    session = Session(cluster_with(*counts), mode, PROFILE, output)
    before = len(anyio.get_running_tasks())  # type: ignore[attr-defined]
    # a cancelled session must not wait for a stalled reader: a hang fails here, not the run
    with anyio.fail_after(30), anyio.move_on_after(0.3):
        await session.run()
    assert len(mode.opened) == 2
    assert all(capture.closed for capture in mode.opened)
    assert len(anyio.get_running_tasks()) == before  # type: ignore[attr-defined]
    data = out.read_bytes() if kind == "file" else bytes(sink.data)
    if kind == "live-stalled":
        assert data == b""
        return
    _, packets, _ = read_capture(data)
    assert len(packets) > 0


async def test_stop_like_ctrl_c_is_interrupted_and_keeps_packets(out: Path) -> None:
    counts = {"web-a": 1, "web-b": 1}
    mode = mode_with(counts, interval=0.01, forever=True)
    session = Session(cluster_with(*counts), mode, PROFILE, FileOutput(str(out), grace=5))
    async with anyio.create_task_group() as tg:
        async def interrupt() -> None:
            await anyio.sleep(0.3)
            session.stop("interrupted (SIGINT)", interrupted=True)
        tg.start_soon(interrupt)
        result = await session.run()
    assert result.exit_code == ExitCode.INTERRUPTED
    assert all(capture.stopped and capture.closed for capture in mode.opened)
    _, packets, _reader = read_capture(out.read_bytes())
    assert len(packets) == result.packets > 0


async def test_reader_going_away_ends_the_capture_cleanly() -> None:
    class GoneSink(MemorySink):
        async def write(self, data: bytes) -> None:
            from multisniff.engine.sinks import SinkClosed
            if self.writes >= 2:
                raise SinkClosed("the reader of memory went away")
            await super().write(data)

    counts = {"web-a": 1}
    mode = mode_with(counts, interval=0.005, forever=True)
    session = Session(cluster_with(*counts), mode, PROFILE, output := live(GoneSink()))
    output.on_closed = lambda why: session.stop(why)
    with anyio.fail_after(10):
        result = await session.run()
    assert "went away" in result.stop_reason
    assert result.exit_code == ExitCode.OK
    assert all(capture.closed for capture in mode.opened)


async def test_some_pods_failing_is_partial_and_all_is_nothing(out: Path) -> None:
    counts = {"web-a": 5, "web-b": 5, "web-c": 5}
    mode = mode_with(counts)
    mode.refuse = {"web-b"}
    mode.fail_open = {"web-c"}
    result = await Session(cluster_with(*counts), mode, PROFILE,
                           FileOutput(str(out), grace=5)).run()
    assert result.exit_code == ExitCode.PARTIAL
    states = {run.label: (run.state, run.error) for run in result.runs}
    assert states["shop/web-b"] == ("refused", "the fake refuses it")
    assert states["shop/web-c"][0] == "failed" and "cannot exec" in states["shop/web-c"][1]
    mode.refuse = set(counts)
    result = await Session(cluster_with(*counts), mode, PROFILE,
                           FileOutput(str(out), grace=5)).run()
    assert result.exit_code == ExitCode.NOTHING


async def test_nothing_matches_names_the_labels_that_exist(out: Path) -> None:
    cluster = cluster_with("web-a")
    profile = PROFILE.replace(labels="app=wbe")
    with pytest.raises(NothingMatches, match="No pod in namespace shop matches app=wbe; pods "
                                             "there have app=web"):
        await Session(cluster, mode_with({}), profile, FileOutput(str(out), grace=5)).run()
    assert not out.exists()


async def test_follow_starts_new_pods_and_restarts_and_ends_deleted_ones(out: Path) -> None:
    cluster = WatchedCluster()
    first = cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = mode_with({"web-a": 1, "web-b": 1}, interval=0.005, forever=True)
    session = Session(cluster, mode, PROFILE.replace(follow=True), FileOutput(str(out), grace=5))

    async def churn() -> None:
        await anyio.sleep(0.2)
        added = make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.1.0.99")
        await cluster.send_event.send(PodEvent(PodEventType.ADDED, added))
        await anyio.sleep(0.2)
        instance = ContainerInfo("app", "app:1", running=True, container_id="containerd://2")
        await cluster.send_event.send(PodEvent(PodEventType.MODIFIED,
                                               replace(first, containers=(instance,))))
        await anyio.sleep(0.2)
        await cluster.send_event.send(PodEvent(PodEventType.DELETED, added))
        await anyio.sleep(0.2)
        session.stop("test over")

    async with anyio.create_task_group() as tg:
        tg.start_soon(churn)
        with anyio.fail_after(10):
            result = await session.run()
    cluster.close()
    labels = [run.label for run in result.runs]
    assert labels == ["shop/web-a", "shop/web-b", "shop/web-a"]
    assert [run.outcome for run in result.runs] == ["ended by a container restart", "done",
                                                    "done"]
    assert all(run.packets > 0 for run in result.runs) and result.exit_code == ExitCode.OK
    names, packets, reader = read_capture(out.read_bytes())
    assert sorted(names) == ["shop/web-a", "shop/web-a#2", "shop/web-b"]
    assert len(packets) == result.packets
    assert len(reader.interfaces) == 3
    assert all(capture.closed for capture in mode.opened)


async def test_host_network_pods_on_one_node_are_captured_once(out: Path) -> None:
    from dataclasses import replace
    cluster = FakeCluster()
    for name in ("proxy-a", "proxy-b"):
        cluster.add_pod(replace(make_pod(name, namespace="shop", labels={"app": "web"}),
                                host_network=True))
    mode = mode_with({"proxy-a": 3, "proxy-b": 3})
    result = await Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5)).run()
    assert [run.label for run in result.runs] == ["shop/proxy-a"]
    assert "host network of node node-1" in result.skipped[0].reason
    assert "shared with shop/proxy-b" in result.runs[0].description


async def test_dry_run_lists_pods_modes_and_what_is_created() -> None:
    cluster = cluster_with("web-a", "web-b")
    mode = mode_with({})
    mode.refuse = {"web-b"}
    lines = await dry_run(cluster, mode, PROFILE)
    text = "\n".join(lines)
    assert "2 pods in namespace shop match app=web" in text
    assert "shop/web-a: would capture with mode fake" in text
    assert "would create: nothing in shop/web-a" in text
    assert "shop/web-b: cannot capture with mode fake" in text
    assert not mode.opened


def test_spool_files_are_private(tmp_path: Path) -> None:
    # The parts directory is created 0700 and holds the captures while they run.
    output = FileOutput(str(tmp_path / "x.pcapng"), grace=1)

    async def main() -> None:
        async with output.open():
            assert stat.S_IMODE(os.stat(output.parts).st_mode) == 0o700

    anyio.run(main, backend="asyncio")


async def test_summary_json_shape(out: Path) -> None:
    from multisniff import ui

    counts = {"web-a": 5, "web-b": 5}
    mode = mode_with(counts)
    mode.refuse = {"web-b"}
    result = await Session(cluster_with(*counts), mode, PROFILE,
                           FileOutput(str(out), grace=5)).run()
    summary = ui.summary_json(result, exit_code=result.exit_code, output=str(out))
    assert summary["exit_code"] == ExitCode.PARTIAL
    assert summary["output"] == str(out)
    assert summary["totals"] == {"pods": 2, "captured": 1, "failed": 1, "packets": 5,
                                 "bytes": summary["totals"]["bytes"], "dropped": 0, "late": 0}
    pod = summary["pods"][0]
    assert set(pod) == {"namespace", "pod", "node", "container", "interface", "mode", "reason",
                        "state", "error", "ended_by", "resumed", "restarts", "packets", "bytes",
                        "dropped", "late"}
    assert (pod["namespace"], pod["pod"], pod["state"]) == ("shop", "web-a", "done")
    assert summary["pods"][1]["error"] == "the fake refuses it"
    assert isinstance(summary["duration"], float)
    lines = ui.summary_lines(result)
    assert lines[-1].startswith("5 packets from 2 captures written to")


async def test_peers_that_are_not_captured_have_names_too(out: Path) -> None:
    counts = {"web-a": 3}
    cluster = cluster_with(*counts)
    cluster.add_pod(make_pod("client", namespace="front", labels={"app": "client"},
                             ip="10.9.0.7"))
    await Session(cluster, mode_with(counts), PROFILE, FileOutput(str(out), grace=5)).run()
    batch = CaptureReader().feed(out.read_bytes())
    names = {bytes(record.address): record.names for block in batch.names
             for record in block.records}
    assert names[bytes([10, 9, 0, 7])] == ("front/client",)
    assert ("shop/web-a",) in names.values()


@pytest.mark.parametrize("may_list_nodes", [True, False], ids=["nodes", "no-nodes"])
async def test_node_addresses_are_named_when_nodes_may_be_listed(
        out: Path, may_list_nodes: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="multisniff")
    cluster = cluster_with("web-a")
    cluster.nodes["node-1"] = NodeInfo("node-1", "amd64", internal_ip="192.168.5.1",
                                       addresses=("192.168.5.1", "fd00::5:1"))
    cluster.may_list_nodes = may_list_nodes

    result = await Session(cluster, mode_with({"web-a": 3}), PROFILE,
                           FileOutput(str(out), grace=5)).run()

    assert result.exit_code == ExitCode.OK
    batch = CaptureReader().feed(out.read_bytes())
    names = {bytes(record.address): record.names for block in batch.names
             for record in block.records}
    node_names = {address: name for address, name in names.items()
                  if name[0].startswith("node/")}
    if may_list_nodes:
        assert node_names == {bytes([192, 168, 5, 1]): ("node/node-1",),
                              ipaddress.ip_address("fd00::5:1").packed: ("node/node-1",)}
    else:
        assert node_names == {}
        assert "Cannot list nodes for names: You may not list nodes cluster-wide" in caplog.text
    assert names[bytes([10, 1, 0, 10])] == ("shop/web-a",)


@pytest.mark.parametrize("kind", ["file", "live"])
async def test_remote_batches_stay_well_inside_the_live_reorder_window(out: Path,
                                                                       kind: str) -> None:
    # A pod's side may hold packets for flush_delay; live output holds them for the reorder
    # window only, so its batches are cut to a quarter of that window.
    profile = PROFILE.replace(flush_delay=1.0, reorder_window=2.0)
    output = FileOutput(str(out), grace=5) if kind == "file" else live(MemorySink(),
                                                                       reorder_window=2.0)
    mode = mode_with({"web-0": 3})
    await Session(cluster_with("web-0"), mode, profile, output).run()

    assert [spec.flush_delay for spec in mode.specs] == [1.0 if kind == "file" else 0.5]


@pytest.mark.parametrize("kind", ["file", "live"])
async def test_the_client_gathers_small_frames_for_file_output_and_briefly_for_live(
        out: Path, kind: str) -> None:
    # Frames that reached the client are safe from a crashing target, so file output reads a
    # pod's small frames once a second; live output only for an eighth of the reorder window.
    profile = PROFILE.replace(reorder_window=2.0)
    output = FileOutput(str(out), grace=5) if kind == "file" else live(MemorySink(),
                                                                       reorder_window=2.0)
    mode = mode_with({"web-0": 3})
    await Session(cluster_with("web-0"), mode, profile, output).run()

    assert [spec.read_linger for spec in mode.specs] == [1.0 if kind == "file" else 0.25]


async def test_a_capture_is_announced_once_its_tcpdump_listens(
        out: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The upload mode's exec opens before the bundle is unpacked and tcpdump runs: until
    # tcpdump says "listening on", the pod is not captured yet and the log must not say so.
    heard = anyio.Event()
    states: list[str] = []

    class LateCapture(FakeCapture):
        async def listening(self) -> None:
            await heard.wait()

    def make(target: Target) -> FakeCapture:
        return LateCapture(name=target.pod.ref.name, total=5, forever=True)

    session = Session(cluster_with("web-0"), FakeMode(make=make), PROFILE,
                      FileOutput(str(out), grace=5))

    async def listen_later() -> None:
        while not session.runs:
            await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        states.append(session.runs[0].state)
        heard.set()
        await anyio.sleep(0.2)
        states.append(session.runs[0].state)
        session.stop("test over")

    with caplog.at_level("INFO"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen_later)
            await session.run()

    assert states == ["starting", "capturing"]
    assert "Capturing shop/web-0" in caplog.text


def restarted(pod: PodInfo, *, container_id: str, running: bool = True) -> PodInfo:
    """The pod after its container `app` ended (and, when running, came back)."""
    info = ContainerInfo("app", "app:1", running=running, container_id=container_id,
                         restart_count=1)
    return replace(pod, containers=(info,))


async def test_a_capture_of_the_network_namespace_goes_on_across_restarts(out: Path) -> None:
    # The ephemeral mode's kind: the container's end and its new instance do not end the run,
    # nor start a second one.
    cluster = WatchedCluster()
    first = cluster.add_pod(restarted(make_pod("web-a", namespace="shop",
                                               labels={"app": "web"}),
                                      container_id="containerd://1"))
    mode = mode_with({"web-a": 1}, interval=0.005, forever=True, bound_to_container=False)
    session = Session(cluster, mode, PROFILE.replace(follow=True), FileOutput(str(out), grace=5))

    async def churn() -> None:
        while not mode.opened:
            await anyio.sleep(0.05)
        await cluster.send_event.send(PodEvent(PodEventType.MODIFIED, restarted(
            first, container_id="containerd://1", running=False)))
        await cluster.send_event.send(PodEvent(PodEventType.MODIFIED, restarted(
            first, container_id="containerd://2")))
        while mode.opened[0].produced < 20:
            await anyio.sleep(0.05)
        session.stop("test over")

    async with anyio.create_task_group() as tg:
        tg.start_soon(churn)
        with anyio.fail_after(20):
            result = await session.run()
    cluster.close()

    (run,) = result.runs
    assert (run.state, run.restarts, result.exit_code) == ("done", 1, ExitCode.OK)
    assert result.skipped == []
    names, packets, _ = read_capture(out.read_bytes())
    assert names == ["shop/web-a"] and len(packets) == run.packets > 0


async def test_a_capture_killed_with_its_container_is_ended_not_failed(out: Path) -> None:
    # The upload mode's kind: tcpdump dies with the container, the stream ends without an
    # exit status; the pod then shows a new container. No watch (--no-follow): the session
    # asks the API.
    cluster = cluster_with("web-a", "web-b")
    ref = PodRef("shop", "web-a")
    cluster.pods[ref] = restarted(cluster.pods[ref], container_id="containerd://1")
    mode = mode_with({"web-a": 5, "web-b": 5})
    make = mode.make
    mode.make = lambda target: replace(make(target), killed=target.pod.ref == ref)

    async def restart() -> None:
        while not mode.opened:
            await anyio.sleep(0.01)
        cluster.pods[ref] = restarted(cluster.pods[ref], container_id="containerd://2")

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart)
        with anyio.fail_after(20):
            result = await Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5)).run()

    runs = {run.label: run for run in result.runs}
    assert (runs["shop/web-a"].state, runs["shop/web-a"].error) == ("ended", "")
    assert runs["shop/web-a"].packets == 5
    assert result.exit_code == ExitCode.OK
    assert summary_lines(result)[0].startswith(
        "shop/web-a: ended by a container restart, 5 packets")
    assert summary_json(result, exit_code=result.exit_code, output=str(out))["totals"][
        "failed"] == 0
    _, _, reader = read_capture(out.read_bytes())
    assert any("ended by a container restart" in comment
               for stats in CaptureReader().feed(out.read_bytes()).statistics
               for comment in stats.comments)
    assert len(reader.interfaces) == 2


async def test_a_capture_cut_off_while_its_container_lives_on_is_not_ended(out: Path) -> None:
    # A broken stream is not a restart: asked for a while (stop_grace here), the API still
    # shows the same container running.
    cluster = cluster_with("web-a")
    mode = mode_with({"web-a": 0}, killed=True)
    result = await Session(cluster, mode, PROFILE.replace(stop_grace=1, reconnect_timeout=2),
                           FileOutput(str(out), grace=5)).run()

    assert all(run.state != "ended" for run in result.runs)


@pytest.mark.parametrize(("interface", "kind"), [("any", "file"), ("eth0", "file"),
                                                 ("any", "live")])
async def test_a_capture_that_sent_nothing_has_its_interface_and_statistics(
        out: Path, interface: str, kind: str) -> None:
    # Killed before tcpdump's header arrived: the interface is declared all the same, with
    # tcpdump's link type for the interface (LINUX_SLL2 for any).
    cluster = cluster_with("web-a", "web-b")
    ref = PodRef("shop", "web-a")
    mode = mode_with({"web-a": 0, "web-b": 3})
    make = mode.make
    mode.make = lambda target: replace(make(target), silent=target.pod.ref == ref)
    sink = MemorySink()
    output = FileOutput(str(out), grace=5) if kind == "file" else live(sink)
    await Session(cluster, mode, PROFILE.replace(interface=interface, stop_grace=1),
                  output).run()
    if kind == "live":
        out.write_bytes(bytes(sink.data))

    reader = CaptureReader()
    batch = reader.feed(out.read_bytes())
    assert reader.finish() is None
    interfaces = {info.name: info for info in reader.interfaces}
    assert set(interfaces) == {"shop/web-a", "shop/web-b"}
    assert interfaces["shop/web-a"].linktype == (276 if interface == "any" else 1)
    assert interfaces["shop/web-a"].tsresol == 9
    assert len(batch.statistics) == 2
    if shutil.which("capinfos") is not None:
        info = subprocess.run(["capinfos", "-I", str(out)], capture_output=True, text=True,
                              check=True).stdout
        assert "shop/web-a" in info and "shop/web-b" in info
