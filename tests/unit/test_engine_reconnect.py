"""A capture whose exec stream breaks (the API server or the kubelet restarted) is resumed by a
new run of the same target, with a gap on the timeline and in the summary; one that cannot be
resumed within reconnect_timeout fails with a sentence; the pod watch lists again and goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode, WatchedCluster
from fakes import FakeCluster, make_pod

from multisniff.capture.model import Target
from multisniff.engine.events import EventKind
from multisniff.engine.output import FileOutput
from multisniff.engine.session import Session
from multisniff.errors import ApiRequest, ExitCode, Unreachable
from multisniff.kube.model import PodEvent, PodEventType, PodList, PodRef, PodSelector
from multisniff.pcap.reading import CaptureReader
from multisniff.profiles import Profile
from multisniff.ui import summary_json, summary_lines

pytestmark = pytest.mark.anyio

PROFILE = Profile(labels="app=web", namespace="shop", follow=False, stop_grace=1, events=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def unreachable() -> Unreachable:
    return Unreachable(ApiRequest("list", "pods", "shop"), host="127.0.0.1:6443",
                       detail="connection refused")


class OutageCluster(FakeCluster):
    """A FakeCluster whose API is down while `down` is set."""

    down = False
    lists = 0

    async def list_pods(self, selector: PodSelector) -> PodList:
        self.lists += 1
        if self.down:
            raise unreachable()
        return await super().list_pods(selector)


def interfaces(path: Path) -> list[str]:
    reader = CaptureReader()
    reader.feed(path.read_bytes())
    assert reader.finish() is None
    return [info.name or "" for info in reader.interfaces]


def breaking_mode(first: dict[str, object], then_total: int) -> FakeMode:
    """The first capture of each pod is made with `first`; the later ones send `then_total`."""
    def make(target: Target) -> FakeCapture:
        name = target.pod.ref.name
        if any(capture.name == name for capture in mode.opened):
            return FakeCapture(name=name, total=then_total, offset_us=500_000)
        return FakeCapture(name=name, total=5, **first)  # type: ignore[arg-type]
    mode = FakeMode(make=make)
    return mode


async def test_a_broken_stream_is_resumed_and_the_gap_is_told(tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    cluster = OutageCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = breaking_mode({"forever": True, "break_after": 3, "per_chunk": 1}, then_total=4)
    with anyio.fail_after(20):
        result = await Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5)).run()

    first, second = result.runs
    assert (first.state, first.packets) == ("interrupted", 3)
    assert first.outcome.startswith("interrupted by a broken stream (The exec stream broke")
    assert (second.state, second.packets, second.label) == ("done", 4, "shop/web-a")
    assert second.resumed.startswith("after a gap of ")
    assert result.exit_code == ExitCode.OK
    gaps = [event.text for event in result.events if event.kind is EventKind.GAP]
    assert len(gaps) == 1 and gaps[0].startswith("gap in the capture of shop/web-a: The exec")
    lines = summary_lines(result)
    assert lines[0].startswith("shop/web-a: interrupted by a broken stream")
    assert ", resumed after a gap of " in lines[1]
    summary = summary_json(result, exit_code=result.exit_code, output=str(out))
    assert summary["totals"]["captured"] == 2 and summary["totals"]["failed"] == 0
    assert sorted(interfaces(out)) == ["multisniff/events", "shop/web-a", "shop/web-a#2"]
    assert all(capture.closed for capture in mode.opened)
    # The probe that says the node answers again is an exec into the target.
    assert [record.command for record in cluster.execs] == [("true",)]


async def test_a_stream_that_ends_without_a_status_is_resumed_after_the_api_is_back(
        tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    cluster = OutageCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = breaking_mode({"killed": True}, then_total=2)

    async def outage() -> None:
        while not mode.opened:
            await anyio.sleep(0.01)
        cluster.down, before = True, cluster.lists
        while cluster.lists < before + 3:  # asked, and found down, a few times
            await anyio.sleep(0.01)
        cluster.down = False

    async with anyio.create_task_group() as tg:
        tg.start_soon(outage)
        with anyio.fail_after(30):
            result = await Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5)).run()

    assert [run.state for run in result.runs] == ["interrupted", "done"]
    assert result.runs[0].ended_by == \
        "a broken stream (its exec stream ended without an exit status)"
    assert [run.packets for run in result.runs] == [5, 2]
    assert result.exit_code == ExitCode.OK


async def test_a_tcpdump_stopped_as_its_stdin_was_closed_under_it_is_resumed(
        tmp_path: Path) -> None:
    # The kubelet restarting closes the exec's stdin: the watchdog stops tcpdump, which ends
    # with 0 and its statistics, though nobody asked.
    out = tmp_path / "out.pcapng"
    cluster = OutageCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = breaking_mode({"closed_under": True}, then_total=3)
    with anyio.fail_after(20):
        result = await Session(cluster, mode, PROFILE, FileOutput(str(out), grace=5)).run()

    assert [(run.state, run.packets) for run in result.runs] == [("interrupted", 5),
                                                                 ("done", 3)]
    assert "closed under it" in result.runs[0].ended_by
    assert result.exit_code == ExitCode.OK


async def test_a_capture_that_cannot_resume_in_time_fails_with_a_sentence(
        tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    cluster = OutageCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = breaking_mode({"forever": True, "break_after": 2, "per_chunk": 1}, then_total=1)
    make = mode.make

    def make_then_fail(target: Target) -> FakeCapture:
        cluster.down = True  # the API server goes away as the capture runs
        return make(target)

    mode.make = make_then_fail
    with anyio.fail_after(20):
        result = await Session(cluster, mode, PROFILE.replace(reconnect_timeout=1.5),
                               FileOutput(str(out), grace=5)).run()

    (run,) = result.runs
    assert (run.state, run.packets) == ("failed", 2)
    assert run.error.startswith("The exec stream broke: connection reset by peer, and it could "
                                "not be resumed within reconnect_timeout 1.5 s (Cannot reach")
    assert run.error.endswith("raise reconnect_timeout to wait longer for the cluster")
    assert result.exit_code == ExitCode.NOTHING
    assert interfaces(out)  # what it got is readable
    assert not [event for event in result.events if event.kind is EventKind.GAP]


async def test_a_stream_that_breaks_again_at_once_is_not_resumed_forever(
        tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    cluster = OutageCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = FakeMode(make=lambda target: FakeCapture(name="web-a", total=0, killed=True))
    with anyio.fail_after(20):
        result = await Session(cluster, mode, PROFILE.replace(reconnect_timeout=2),
                               FileOutput(str(out), grace=5)).run()

    assert 2 <= len(result.runs) <= 6
    assert all(run.state == "interrupted" for run in result.runs[:-1])
    assert result.runs[-1].state == "failed"
    assert "could not be resumed within reconnect_timeout 2 s" in result.runs[-1].error


class BreakingWatch(WatchedCluster):
    """The first watch breaks as an API server restart breaks it; the next ones are fed by
    the test."""

    watches = 0

    async def watch_pods(self, selector: PodSelector,  # type: ignore[override]
                         resource_version: str) -> AsyncIterator[PodEvent]:
        self.watches += 1
        if self.watches == 1:
            await anyio.sleep(0.2)
            raise unreachable()
        async for event in super().watch_pods(selector, resource_version):
            yield event


async def test_the_pod_watch_lists_again_and_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    cluster = BreakingWatch()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name, total=1,
                                                    interval=0.01, forever=True))
    # Meanwhile (while the watch is down) web-a went away and web-b came.
    added = make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.1.0.99")
    session = Session(cluster, mode, PROFILE.replace(follow=True), FileOutput(str(out), grace=5))

    async def churn() -> None:
        await anyio.sleep(0.05)
        del cluster.pods[PodRef("shop", "web-a")]
        cluster.add_pod(added)
        while cluster.watches < 2:
            await anyio.sleep(0.01)
        late = make_pod("web-c", namespace="shop", labels={"app": "web"}, ip="10.1.0.98")
        await cluster.send_event.send(PodEvent(PodEventType.ADDED, late))
        while len(session.runs) < 3:
            await anyio.sleep(0.01)
        session.stop("test over")

    async with anyio.create_task_group() as tg:
        tg.start_soon(churn)
        with anyio.fail_after(20):
            result = await session.run()
    cluster.close()

    assert [run.label for run in result.runs] == ["shop/web-a", "shop/web-b", "shop/web-c"]
    assert result.runs[0].state == "done"  # ended as its pod went away, what it got kept
    assert cluster.watches == 2
    told = {event.text.split(" on node")[0] for event in result.events
            if event.kind in (EventKind.POD_DELETED, EventKind.POD_ADDED)}
    assert told == {"pod shop/web-a deleted", "pod shop/web-b added", "pod shop/web-c added"}
