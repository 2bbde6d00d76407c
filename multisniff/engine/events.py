"""Events on the capture's timeline: what happened to the pods and around the capture, written
into the same pcapng as the packets, at their time, on an interface of their own.

A chaos test deletes a pod, restarts a container, runs a command; whoever reads the recording
wants to see where in the traffic that happened. Each event is one packet on the interface
`multisniff/events`: its text is the packet's comment (opt_comment, so that Wireshark's
`frame.comment contains "deleted"` finds it) and also its data, as a syslog message wrapped in
Wireshark's exported-PDU link type, so that Wireshark and tshark show the text in the packet
list's Info column, in time order among the pods' packets.

Which events: a pod added, deleted or ended, a container restarted (all from the pod watch, so
with `follow`), a pod's capture started and ended, a gap in a pod's capture (`Timeline.gap`,
for whoever reconnects a broken stream), and marks: a command started or ended around the
capture (`multisniff record`) and the user's own (`Capture.mark`). The engine's own events are
written with the `events` setting; marks are always written, since someone asked for them.
Every event written is also kept in `Timeline.events` (up to `MAX_KEPT`) for the summary.
"""

from __future__ import annotations

import enum
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from multisniff.kube.model import PodEventType, PodInfo
from multisniff.pcap.blocks import OPT_COMMENT, InterfaceInfo
from multisniff.pcap.writing import encode_epb, encode_idb, encode_options, encode_shb

log = logging.getLogger("multisniff")

EVENTS_INTERFACE = "multisniff/events"
LINKTYPE_WIRESHARK_UPPER_PDU = 252
"""Wireshark's exported PDU: tags (big-endian) name the dissector for the data that follows."""
_EXP_PDU_TAG_PROTO_NAME = 12
_EXP_PDU_TAG_END_OF_OPT = 0
_EVENTS_TSRESOL = 9
MAX_KEPT = 10_000
"""Events kept in memory for the summary; the pcapng gets every one."""


class EventKind(enum.Enum):
    POD_ADDED = "pod added"
    POD_DELETED = "pod deleted"
    POD_ENDED = "pod ended"
    CONTAINER_RESTARTED = "container restarted"
    CAPTURE_STARTED = "capture started"
    CAPTURE_ENDED = "capture ended"
    GAP = "gap"
    COMMAND_STARTED = "command started"
    COMMAND_ENDED = "command ended"
    MARK = "mark"

    @property
    def is_mark(self) -> bool:
        """Asked for by someone (always written), not noticed by the engine."""
        return self in (EventKind.MARK, EventKind.COMMAND_STARTED, EventKind.COMMAND_ENDED)


# syslog severities: the packet list shows them (USER.NOTICE, USER.WARNING).
_WARNING, _NOTICE = 4, 5
_FACILITY_USER = 1


@dataclass(frozen=True, slots=True)
class Event:
    time_ns: int
    """Wall-clock time on the machine that runs multisniff, in nanoseconds."""
    kind: EventKind
    text: str
    """One line, as shown: "pod demo/web-1 deleted"."""
    warning: bool = False
    """Shown as a warning (a failed command, a gap, a pod that failed)."""


def _tag(code: int, value: bytes) -> bytes:
    # Wireshark reads the value's length with its padding to 32 bits included.
    padded = value + b"\0" * (-len(value) & 3)
    return struct.pack(">HH", code, len(padded)) + padded


_PDU_HEADER = _tag(_EXP_PDU_TAG_PROTO_NAME, b"syslog") + _tag(_EXP_PDU_TAG_END_OF_OPT, b"")


def encode_header() -> bytes:
    """The start of the events' own pcapng stream: SHB and the events interface's IDB."""
    return encode_shb() + encode_idb(InterfaceInfo(
        linktype=LINKTYPE_WIRESHARK_UPPER_PDU, name=EVENTS_INTERFACE,
        description="multisniff events: pod churn, captures, commands and marks",
        tsresol=_EVENTS_TSRESOL))


def encode_event(event: Event) -> bytes:
    """One EPB on interface 0 of the stream that `encode_header` starts."""
    severity = _WARNING if event.warning else _NOTICE
    message = f"<{_FACILITY_USER * 8 + severity}>multisniff: {event.text}".encode()
    return encode_epb(0, event.time_ns, _PDU_HEADER + message,
                      options=encode_options([(OPT_COMMENT, event.text.encode())]))


class EventSink(Protocol):
    """Where events are written: the session's output (file or live)."""

    def event(self, event: Event) -> None: ...


class Timeline:
    """The events of one session, as they happen; the session calls it where things happen."""

    def __init__(self, sink: EventSink | None, *, pod_events: bool,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.sink = sink
        self.pod_events = pod_events
        self.clock = clock
        self.events: list[Event] = []
        self.count = 0
        self._pods: dict[str, PodInfo] = {}
        self._gone: set[str] = set()

    def add(self, kind: EventKind, text: str, *, warning: bool = False) -> Event:
        event = Event(self.clock(), kind, " ".join(text.split()), warning)
        if not (self.pod_events or kind.is_mark):
            return event
        self.count += 1
        if len(self.events) < MAX_KEPT:
            self.events.append(event)
        if self.sink is not None:
            self.sink.event(event)
        return event

    def mark(self, text: str) -> Event:
        return self.add(EventKind.MARK, f"mark: {text}")

    # --- what the session tells ---------------------------------------------------------------

    def pods_at_start(self, pods: tuple[PodInfo, ...] | list[PodInfo]) -> None:
        """The pods matched when the session started: known, not added."""
        for pod in pods:
            self._pods[pod.uid] = pod

    def pod_event(self, kind: PodEventType, pod: PodInfo) -> None:
        """A pod as the watch reports it: new, going away, or with a restarted container."""
        if pod.uid in self._gone:
            return
        before = self._pods.get(pod.uid)
        self._pods[pod.uid] = pod
        if before is None and kind is not PodEventType.DELETED:
            where = f" on node {pod.node}" if pod.node else ""
            self.add(EventKind.POD_ADDED, f"pod {pod.ref} added{where}")
        if kind is PodEventType.DELETED or pod.deleting:
            self._gone.add(pod.uid)
            self.add(EventKind.POD_DELETED, f"pod {pod.ref} deleted")
            return
        if pod.phase in ("Succeeded", "Failed"):
            self._gone.add(pod.uid)
            self.add(EventKind.POD_ENDED, f"pod {pod.ref} ended: {pod.phase}",
                     warning=pod.phase == "Failed")
            return
        if before is None:
            return
        for container in pod.containers:
            old = before.container(container.name)
            if old is None:
                continue
            if container.restart_count > old.restart_count or (
                    old.container_id and container.container_id
                    and container.container_id != old.container_id):
                self.add(EventKind.CONTAINER_RESTARTED,
                         f"container {container.name} of pod {pod.ref} restarted (restart "
                         f"{container.restart_count})", warning=True)

    def capture_started(self, label: str, description: str) -> None:
        self.add(EventKind.CAPTURE_STARTED, f"capture of {label} started ({description})")

    def capture_ended(self, label: str, state: str, packets: int, error: str) -> None:
        why = f": {error}" if error else ""
        self.add(EventKind.CAPTURE_ENDED,
                 f"capture of {label} ended, {state}, {packets} packets{why}",
                 warning=state != "done")

    def gap(self, label: str, detail: str) -> None:
        """The capture of `label` missed packets for a while (its stream broke and was opened
        again): `detail` says how long and why."""
        self.add(EventKind.GAP, f"gap in the capture of {label}: {detail}", warning=True)

    def command_started(self, argv: list[str] | tuple[str, ...]) -> None:
        self.add(EventKind.COMMAND_STARTED, f"command started: {_shell_words(argv)}")

    def command_ended(self, argv: list[str] | tuple[str, ...], how: str, *,
                      failed: bool) -> None:
        self.add(EventKind.COMMAND_ENDED, f"command ended, {how}: {_shell_words(argv)}",
                 warning=failed)


def _shell_words(argv: list[str] | tuple[str, ...]) -> str:
    import shlex

    return shlex.join(argv)
