"""One capture of one target, as the session, the outputs and the user interface see it.

A `CaptureRun` is created for each target that is started (a restarted container is a new run,
unless the capture holds only the pod's network namespace and goes on) and carries its
counters; its `Transcoder` turns tcpdump's pcap bytes into a pcapng stream of its own (SHB, one
IDB named namespace/pod with a description, EPBs) so that both outputs, and a spool file read
after a crash, see the pod's name and details. Every run that ran a tcpdump has its interface,
even one whose tcpdump never sent its header (killed with its container at once).
"""

from __future__ import annotations

import dataclasses
import time
from bisect import bisect_right
from dataclasses import dataclass, field

from multisniff.capture.model import CaptureReport, Target
from multisniff.pcap.blocks import InterfaceInfo, InterfaceStatistics, units_per_second
from multisniff.pcap.reading import CaptureError, CaptureReader
from multisniff.pcap.writing import PcapngWriter

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL2 = 276
NANOSECONDS = 9
"""if_tsresol of tcpdump --time-stamp-precision=nano, as every mode runs it."""
CAPTURED = ("done", "ended", "interrupted")
"""The states of a run that captured what it could: not failures."""


@dataclass(eq=False)
class CaptureRun:
    number: int
    target: Target
    mode: str
    reason: str = ""
    interface: str = "any"
    bpf_filter: str = ""
    snaplen: int = 262144
    shared_with: tuple[str, ...] = ()
    state: str = "starting"
    """starting, capturing, stopping, done, failed, refused, ended: its container ended
    under it (`ended_by`), or interrupted: its exec stream broke (`ended_by`) and a new run
    of the same target took over. What an ended or interrupted run captured is kept, and it
    is not a failure."""
    ended_by: str = ""
    """Why an ended or interrupted run ended, as "ended by ...": "a container restart"."""
    resumed: str = ""
    """For a run that took over from an interrupted one: the gap, as "after N s without"."""
    restarts: int = 0
    """Restarts of the target container that the capture went on across."""
    packets: int = 0
    bytes: int = 0
    cut: int = 0
    """Packets tcpdump sent that --count/--max-size left out."""
    late: int = 0
    error: str = ""
    report: CaptureReport | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    tsresol: int | None = None
    """if_tsresol of the run's interface, once tcpdump's header arrived."""

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def outcome(self) -> str:
        """The state in words: "done", "failed", "ended by a container restart", ..."""
        if self.state == "ended":
            return f"ended by {self.ended_by}"
        if self.state == "interrupted":
            return f"interrupted by {self.ended_by}"
        return self.state

    @property
    def description(self) -> str:
        pod = self.target.pod
        parts = [f"container {self.target.container}", f"node {pod.node or '?'}",
                 f"pod IP {pod.ip or '?'}", f"mode {self.mode}", f"interface {self.interface}"]
        if self.bpf_filter:
            parts.append(f"filter {self.bpf_filter}")
        if pod.host_network:
            parts.append("host network" + (f" (shared with {', '.join(self.shared_with)})"
                                           if self.shared_with else ""))
        return ", ".join(parts)

    @property
    def dropped(self) -> int:
        """Packets tcpdump saw but that are not in the output: dropped by the kernel, or
        captured by tcpdump but never delivered to us, or cut by the limits."""
        report = self.report
        kernel = (report.dropped_by_kernel or 0) if report else 0
        undelivered = 0
        if report is not None and report.captured is not None:
            undelivered = max(0, report.captured - self.packets - self.cut)
        return kernel + undelivered + self.cut

    def statistics(self, interface_id: int = 0) -> InterfaceStatistics | None:
        """The ISB for this run's interface (None before any interface was declared).

        From tcpdump's closing statistics: isb_ifrecv = "received by filter", isb_osdrop =
        "dropped by kernel" (the OS's buffer was full), isb_usrdeliv = "captured" (delivered
        to tcpdump); a comment adds what multisniff wrote, late and dropped in all."""
        if self.tsresol is None:
            return None
        units = units_per_second(self.tsresol)
        end = self.ended if self.ended is not None else time.time()
        report = self.report
        comments = [f"multisniff: mode {self.mode}, {self.packets} packets written, "
                    f"{self.late} late, {self.dropped} dropped"]
        if self.state in ("ended", "interrupted"):
            comments.append(f"multisniff: {self.outcome}")
        if self.resumed:
            comments.append(f"multisniff: resumed {self.resumed}")
        if self.restarts:
            comments.append(f"multisniff: went on across {self.restarts} container restart"
                            f"{'s' if self.restarts != 1 else ''}")
        if self.error:
            comments.append(f"multisniff: {self.error}")
        return InterfaceStatistics(
            interface_id=interface_id,
            timestamp=int(end * units),
            starttime=int(self.started * units),
            endtime=int(end * units),
            ifrecv=report.received if report else None,
            osdrop=report.dropped_by_kernel if report else None,
            usrdeliv=report.captured if report else None,
            comments=tuple(comments),
        )


class Transcoder:
    """Raw tcpdump bytes of one run -> complete pcapng blocks, cut to a packet budget."""

    def __init__(self, run: CaptureRun) -> None:
        self.run = run
        # The interface says what the capture was as it started: tcpdump's header, which
        # declares it, may come only with the first packet (batched), and pods that join the
        # host network later are told in the log and the summary.
        self.description = run.description
        self.writer = PcapngWriter()
        self.reader = CaptureReader(assign_interface=self._declare)

    def _declare(self, info: InterfaceInfo) -> int:
        named = dataclasses.replace(info, name=self.run.label, description=self.description,
                                    filter=self.run.bpf_filter or None)
        if self.run.tsresol is None:
            self.run.tsresol = info.tsresol
        return self.writer.add_interface(named)

    def feed(self, data: bytes, *, packets_left: int | None,
             bytes_left: int | None) -> tuple[bytes, int, int]:
        """(pcapng bytes, packets, bytes) taken from `data`; packets beyond the budget are
        counted in `run.cut`. Bytes are those of the packets' blocks."""
        batch = self.reader.feed_flat(data)
        ends = batch.ends  # where each packet's block ends in b"".join(batch.pieces)
        count = keep = len(ends)
        if packets_left is not None:
            keep = min(keep, max(0, packets_left))
        if bytes_left is not None:
            keep = min(keep, bisect_right(ends, bytes_left))
        self.run.cut += count - keep
        size = ends[keep - 1] if keep else 0
        if keep == count:
            self.writer.add_blocks(batch.pieces)
        elif keep:
            self.writer.add_blocks((b"".join(batch.pieces)[:size],))
        return self.writer.take(), keep, size

    def missing_interface(self) -> bytes:
        """The pcapng of the run's interface when tcpdump's header never came (b"" when it
        did), so that the run is in the output with its statistics all the same. The link
        type is the one tcpdump 4.99 with libpcap 1.10 declares: LINUX_SLL2 for ``any``, else
        Ethernet (which Linux's loopback is too)."""
        if self.writer.interfaces:
            return b""
        linktype = LINKTYPE_LINUX_SLL2 if self.run.interface == "any" else LINKTYPE_ETHERNET
        self._declare(InterfaceInfo(linktype=linktype, snaplen=self.run.snaplen,
                                    tsresol=NANOSECONDS))
        return self.writer.take()

    @property
    def error(self) -> CaptureError | None:
        return self.reader.error

    def finish(self) -> CaptureError | None:
        return self.reader.finish()
