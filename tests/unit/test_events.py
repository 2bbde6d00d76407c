"""Events on the timeline: pod churn, captures starting and ending, and marks, written into the
pcapng on the interface multisniff/events at their time among the pods' packets, in the exact
file output and the live one. tshark reads what we write."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from enginefakes import BASE_SECONDS, FakeCapture, FakeMode, WatchedCluster, registered
from fakes import make_pod

import multisniff
from multisniff.capture.model import Target
from multisniff.engine.events import (
    EVENTS_INTERFACE,
    Event,
    EventKind,
    Timeline,
    encode_event,
    encode_header,
)
from multisniff.kube.model import ContainerInfo, PodEvent, PodEventType, PodInfo

pytestmark = pytest.mark.anyio

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Frame:
    number: int
    time: Decimal
    interface: str
    comment: str
    info: str


def frames(path: Path, display_filter: str = "") -> list[Frame]:
    assert TSHARK is not None
    command = [TSHARK, "-r", str(path), "-T", "fields", "-E", "separator=\t",
               "-e", "frame.number", "-e", "frame.time_epoch", "-e", "frame.interface_name",
               "-e", "frame.comment", "-e", "_ws.col.Info"]
    if display_filter:
        command += ["-Y", display_filter]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = []
    for line in done.stdout.splitlines():
        number, epoch, interface, comment, info = line.split("\t")
        result.append(Frame(int(number), Decimal(epoch), interface, comment, info))
    return result


@needs_tshark
def test_tshark_shows_an_event_as_text_and_finds_it_by_its_comment(tmp_path: Path) -> None:
    path = tmp_path / "events.pcapng"
    start = time.time_ns()
    events = [Event(start, EventKind.POD_DELETED, "pod demo/web-1 deleted"),
              Event(start + 1500, EventKind.MARK, "mark: phase two", warning=True)]
    path.write_bytes(encode_header() + b"".join(encode_event(event) for event in events))
    found = frames(path, 'frame.comment contains "deleted"')
    assert [(f.number, f.interface, f.comment) for f in found] == [
        (1, EVENTS_INTERFACE, "pod demo/web-1 deleted")]
    assert found[0].info == "USER.NOTICE: multisniff: pod demo/web-1 deleted"
    assert found[0].time == Decimal(start) / 10**9
    second = frames(path, 'frame.comment contains "phase"')[0]
    assert second.info == "USER.WARNING: multisniff: mark: phase two"
    assert second.time == Decimal(start + 1500) / 10**9


class Recorded:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def event(self, event: Event) -> None:
        self.events.append(event)


def test_the_watch_becomes_added_restarted_and_deleted_once_each() -> None:
    sink = Recorded()
    timeline = Timeline(sink, pod_events=True)
    old = make_pod("web-a", namespace="shop")
    timeline.pods_at_start([old])
    new = make_pod("web-b", namespace="shop")
    timeline.pod_event(PodEventType.ADDED, new)
    timeline.pod_event(PodEventType.MODIFIED, new)
    restarted = replace(old, containers=(ContainerInfo("app", "app:1", running=True,
                                                       restart_count=1),))
    timeline.pod_event(PodEventType.MODIFIED, restarted)
    timeline.pod_event(PodEventType.MODIFIED, replace(new, deleting=True))
    timeline.pod_event(PodEventType.DELETED, new)
    timeline.pod_event(PodEventType.MODIFIED, replace(restarted, phase="Failed"))
    timeline.mark("by hand")
    assert [(event.kind, event.text) for event in sink.events] == [
        (EventKind.POD_ADDED, "pod shop/web-b added on node node-1"),
        (EventKind.CONTAINER_RESTARTED, "container app of pod shop/web-a restarted (restart 1)"),
        (EventKind.POD_DELETED, "pod shop/web-b deleted"),
        (EventKind.POD_ENDED, "pod shop/web-a ended: Failed"),
        (EventKind.MARK, "mark: by hand"),
    ]
    assert timeline.events == sink.events


def test_without_the_events_setting_only_marks_are_written() -> None:
    sink = Recorded()
    timeline = Timeline(sink, pod_events=False)
    timeline.pod_event(PodEventType.ADDED, make_pod("web-b"))
    timeline.command_started(["./chaos.sh", "two words"])
    timeline.mark("m")
    timeline.command_ended(["./chaos.sh", "two words"], "exit code 3", failed=True)
    assert [event.text for event in sink.events] == [
        "command started: ./chaos.sh 'two words'", "mark: m",
        "command ended, exit code 3: ./chaos.sh 'two words'"]
    assert timeline.events == sink.events


def now_capture(target: Target) -> FakeCapture:
    """Packets stamped with the wall clock, about as they are made, so that events fall
    between them."""
    offset = int((time.time() - BASE_SECONDS) * 1e6)
    return FakeCapture(name=target.pod.ref.name, total=1, interval=0.005, step_us=5000,
                       offset_us=offset, forever=True)


@pytest.fixture
def mode() -> Iterator[FakeMode]:
    with registered(FakeMode(make=now_capture, name="fake-now")) as fake:
        yield fake


async def churn_and_mark(cap: multisniff.Capture, cluster: WatchedCluster,
                         first: PodInfo) -> PodInfo:
    await cap.ready(timeout=5)
    await anyio.sleep(0.1)
    added = make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.1.0.99")
    await cluster.send_event.send(PodEvent(PodEventType.ADDED, added))
    await anyio.sleep(0.1)
    cap.mark("between the churn")
    await anyio.sleep(0.1)
    await cluster.send_event.send(PodEvent(PodEventType.DELETED, added))
    await anyio.sleep(0.1)
    return added


@needs_tshark
@pytest.mark.parametrize("output", ["file", "live"])
async def test_events_are_in_the_recording_in_time_order_among_the_packets(
        tmp_path: Path, mode: FakeMode, output: str) -> None:
    cluster = WatchedCluster()
    first = cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    path = tmp_path / "rec.pcapng"
    live = io.BytesIO()
    window = 0.5
    with anyio.fail_after(20):
        async with multisniff.capture(
                "app=web", namespace="shop", mode="fake-now", events=True, cluster=cluster,
                reorder_window=window, output=path if output == "file" else live) as cap:
            await churn_and_mark(cap, cluster, first)
        cluster.close()
    if output == "live":
        path.write_bytes(live.getvalue())
    result = cap.result
    every = frames(path)
    events = [f for f in every if f.interface == EVENTS_INTERFACE]
    assert [f.comment.split(" (")[0] for f in events] == [
        "capture of shop/web-a started",
        "pod shop/web-b added on node node-1",
        "capture of shop/web-b started",
        "mark: between the churn",
        "pod shop/web-b deleted",
        "capture of shop/web-b ended, done, "
        f"{result.runs[1].packets} packets",
        "capture of shop/web-a ended, done, "
        f"{result.runs[0].packets} packets",
    ]
    assert [e.text for e in result.events] == [f.comment for f in events]
    assert [f.number for f in frames(path, 'frame.comment contains "deleted"')] == [
        events[4].number]
    packets = [f for f in every if f.interface != EVENTS_INTERFACE]
    assert len(packets) == result.packets
    # Events fall among the packets: some packets before the mark, some after it.
    mark = events[3]
    assert packets[0].time < mark.time < packets[-1].time
    if output == "file":
        assert [f.time for f in every] == sorted(f.time for f in every)
    else:
        for f in every:
            for e in events:
                if f.number > e.number:
                    assert f.time >= e.time - Decimal(str(window))
                else:
                    assert f.time <= e.time + Decimal(str(window))


def test_the_events_flag_and_profile_key_turn_the_engines_events_on() -> None:
    from multisniff import cli

    def events_of(*argv: str) -> bool:
        return cli.profile_from_args(cli.build_capture_parser().parse_args(list(argv))).events

    assert events_of("-l", "app=web") is False
    assert events_of("-l", "app=web", "--events") is True
    assert multisniff.settings_for(None, labels="app=web", events=True).events is True


async def test_the_summary_json_lists_the_events(tmp_path: Path, mode: FakeMode) -> None:
    from multisniff import ui

    cluster = WatchedCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    with anyio.fail_after(20):
        async with multisniff.capture("app=web", namespace="shop", mode="fake-now",
                                      cluster=cluster, output=tmp_path / "x.pcapng") as cap:
            await cap.ready(timeout=5)
            before = time.time()
            cap.mark("one")
        cluster.close()
    summary = ui.summary_json(cap.result, exit_code=0, output="x.pcapng")
    assert [(e["kind"], e["text"]) for e in summary["events"]] == [("mark", "mark: one")]
    assert summary["events"][0]["time"] >= before


def test_a_gap_is_a_warning_on_the_timeline() -> None:
    sink = Recorded()
    timeline = Timeline(sink, pod_events=True)
    timeline.gap("shop/web-a", "its stream broke for 2.1 s and was opened again")
    (event,) = sink.events
    assert event.kind is EventKind.GAP and event.warning
    assert event.text == ("gap in the capture of shop/web-a: its stream broke for 2.1 s and "
                          "was opened again")
    assert b"<12>multisniff: gap in the capture" in encode_event(event)  # USER.WARNING
