"""A stalled consumer of the live stream: memory stays bounded and every packet is accounted for.

`multisniff -o -` (upload mode, small buffers from a profile) writes into a pipe that the test
stops reading for PAUSE seconds while a workload pod floods the target with UDP. Backpressure
must stop the readers, the exec streams and finally the remote tcpdump, whose kernel ring then
overflows: the packets are dropped *there*, counted by the kernel, not piled up in multisniff.

Buffers between the wire and the test, all together (BUFFERS below):
  multisniff:  BUFFER_CHUNKS chunks of at most CHUNK bytes (exec frames) + MAX_PENDING packets
               held for reordering + as much again in the one chunk between merger and writer;
  kernel/path: tcpdump's ring (libpcap's default 2 MiB; we pass no -B), three pipes of 64 KiB
               (tcpdump -> runtime, stdout of multisniff, and one for slack), and the TCP buffers
               of the exec connection: multisniff's own (rb + tb, measured with `ss` during the
               pause), counted three times for the client, apiserver and kubelet hops.
The test asserts that the kernel dropped more than ten times BUFFERS worth of packets, so the
traffic during the pause did exceed them tenfold; and that multisniff's RSS during the pause
stays below its RSS before the pause plus a ceiling derived from its own buffers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import start_pod, wait_for

from multisniff.pcap.blocks import InterfaceStatistics
from multisniff.pcap.reading import CaptureReader

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(400)]


BUFFER_CHUNKS = 4
MAX_PENDING = 1000
PAYLOAD = 1200
RATE = 20_000  # datagrams per second asked of the sender; what it reaches is measured
PAUSE = 35.0  # seconds the test does not read multisniff's stdout

PACKET = PAYLOAD + 28 + 16 + 32  # UDP+IP, SLL header of "any", EPB framing
CHUNK = 64 * 1024  # largest exec stdout frame we expect (kubelet copies 32 KiB at a time)
MULTISNIFF_BUFFERS = BUFFER_CHUNKS * CHUNK + 2 * MAX_PENDING * PACKET
TCPDUMP_RING = 2 * 1024 * 1024
PIPES = 3 * 64 * 1024
# Python holds each packet a few times over (exec frame, pcapng block, merger, joined output)
# and the allocator keeps freed arenas: RSS may grow by this much over the buffers' bound.
RSS_FACTOR = 4
RSS_SLACK = 32 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def socket_buffers(pid: int) -> int:
    """rb + tb of every TCP socket of `pid`, from `ss -tmp`."""
    out = subprocess.run(["ss", "-tmpn"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    total = 0
    owner = False
    for line in out.splitlines():
        if "users:" in line:
            owner = f"pid={pid}," in line
        match = re.search(r"skmem:\(r\d+,rb(\d+),t\d+,tb(\d+)", line)
        if match and owner:
            total += int(match.group(1)) + int(match.group(2))
    return total


class PipeReader(threading.Thread):
    """Copies a pipe into a file while `reading` is set; leaves the pipe alone otherwise."""

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__(daemon=True)
        self.fd, self.path = fd, path
        self.reading = threading.Event()
        self.reading.set()
        self.total = 0

    def run(self) -> None:
        with self.path.open("wb") as out:
            while True:
                self.reading.wait()
                data = os.read(self.fd, 1 << 20)
                if not data:
                    return
                out.write(data)
                self.total += len(data)


def wait_until_quiet(reader: PipeReader, *, quiet: float = 3.0, limit: float = 120.0) -> None:
    """Until no byte came for `quiet` seconds: the backlog is drained."""
    deadline = time.monotonic() + limit
    last, since = reader.total, time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "multisniff's output never went quiet"
        time.sleep(0.5)
        if reader.total != last:
            last, since = reader.total, time.monotonic()


def packets_per_interface(capture: Path) -> dict[str, int]:
    result = subprocess.run(["tshark", "-r", str(capture), "-T", "fields", "-e",
                             "frame.interface_name"], capture_output=True, check=True,
                            timeout=300)
    counts: dict[str, int] = {}
    for name in result.stdout.decode().split():
        counts[name] = counts.get(name, 0) + 1
    return counts


def statistics_per_interface(capture: Path) -> dict[str, InterfaceStatistics]:
    reader = CaptureReader()
    names: list[str] = []
    found: dict[str, InterfaceStatistics] = {}
    with capture.open("rb") as file:
        while data := file.read(1 << 20):
            batch = reader.feed(data)
            names.extend(info.name or "" for _, info in batch.interfaces)
            for stats in batch.statistics:
                found[names[stats.interface_id]] = stats
    assert reader.finish() is None
    return found


def test_a_stalled_reader_bounds_memory_and_drops_are_counted(cluster: Any,
                                                              tmp_path: Path) -> None:
    profile = tmp_path / "stall.toml"
    profile.write_text(f"buffer_chunks = {BUFFER_CHUNKS}\nmax_pending = {MAX_PENDING}\n"
                       "reorder_window = 0.5\n")
    out = tmp_path / "stall.pcapng"
    summary = tmp_path / "summary.json"
    stderr_path = tmp_path / "multisniff.stderr"
    with throwaway_namespace(cluster, "msnf-stall") as namespace:
        target_ip = start_pod(cluster, namespace, "target",
                              ["udp-listen", "-listen", ":9999", "-quiet"])
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
                 "--profile", str(profile), "-l", "app=target", "-n", namespace,
                 "--mode", "upload", "-f", "udp port 9999", "-o", "-",
                 "--summary-json", str(summary)],
                stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        reader = PipeReader(process.stdout.fileno(), out)
        reader.start()
        try:
            wait_for(stderr_path, "Capturing ", process, 90)
            start_pod(cluster, namespace, "sender",
                      ["udp", "-targets", f"{target_ip}:9999", "-rate", str(RATE), "-size",
                       str(PAYLOAD), "-report", "0", "-pod", "sender"])
            time.sleep(3)  # flowing while read: the RSS of a busy multisniff
            baseline = rss(process.pid)
            written_before = reader.total
            reader.reading.clear()
            peak = baseline
            sockets = 0
            paused_until = time.monotonic() + PAUSE
            while time.monotonic() < paused_until:
                time.sleep(0.5)
                assert process.poll() is None, stderr_path.read_text()
                peak = max(peak, rss(process.pid))
                sockets = max(sockets, socket_buffers(process.pid))
            reader.reading.set()
            time.sleep(2)
            cluster.kubectl("delete", "pod", "sender", "-n", namespace, "--wait=true",
                            "--timeout=60s", timeout=90)
            wait_until_quiet(reader)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
            reader.join(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.reading.set()
            reader.join(timeout=60)
            process.stdout.close()
        log = stderr_path.read_text()
        assert process.returncode == 130, log
        assert written_before > 0, log

        buffers = MULTISNIFF_BUFFERS + TCPDUMP_RING + PIPES + 3 * sockets
        ceiling = baseline + RSS_FACTOR * (MULTISNIFF_BUFFERS + sockets) + RSS_SLACK
        assert peak < ceiling, (f"RSS grew from {baseline} to {peak} bytes during the pause, "
                                f"above {ceiling}")

        interface = f"{namespace}/target"
        written = packets_per_interface(out).get(interface, 0)
        stats = statistics_per_interface(out)[interface]
        assert stats.ifrecv is not None and stats.osdrop is not None, stats
        assert stats.usrdeliv is not None, stats
        # Every packet that passed tcpdump's filter was either written or dropped by the
        # kernel, and every packet tcpdump captured reached the output.
        assert written + stats.osdrop == stats.ifrecv, (written, stats)
        assert written == stats.usrdeliv, (written, stats)
        # The test bites: the kernel dropped, and more than ten times all buffers' worth.
        assert stats.osdrop * PACKET > 10 * buffers, (stats, buffers)

        pods = {f"{pod['namespace']}/{pod['pod']}": pod
                for pod in json.loads(summary.read_text())["pods"]}
        assert pods[interface]["packets"] == written
        assert pods[interface]["dropped"] == stats.osdrop
        left = cluster.kubectl("exec", "-n", namespace, "target", "--", "ps", "-o",
                               "pid,args").stdout.decode()
        assert "tcpdump" not in left
