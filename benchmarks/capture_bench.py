"""Benchmark a live `multisniff` capture against what a user would write instead, in the same run.

Why: the point of multisniff is capturing many pods at once. Without it a user runs one
`kubectl exec POD -- tcpdump -U -w - ...` per pod in parallel, each into a file, and merges the
files with `mergecap` afterwards. That is the baseline here. The targets (issue text): with 30 pods,
every pod capturing within 15 s of the start in both upload and ephemeral modes; client CPU and
peak memory below the baseline's; zero loss in our layer (packets tcpdump captured == packets
written). What is measured here is the contract: change the code under test, never this.

What it does:

1. Creates a namespace msnf-bench-<random> and, per pod count (10 and 30 by default), a batch of
   target pods from the tools image (tcpdump, sh, tar; runs as uid 0, so both the baseline's
   `kubectl exec tcpdump` and the upload mode work on the very same pods) running `sleep`, and one
   sender pod (workload image, `udp`) sending --rate datagrams per second per target pod (100 by
   default; 3,000/s in total for 30 pods), round robin to UDP port 9999 of every target. The
   sender runs throughout the measurements of its batch; counts come from tcpdump's own
   statistics, not from the sender. Ephemeral containers stay in a pod for good, so the ephemeral
   run gets a fresh batch of its own (and its own sender); baseline and upload share one.
2. Runs, one after another, the baseline and `multisniff --mode upload` on batch A and
   `multisniff --mode ephemeral` on batch B; the order alternates between pod counts. Both sides
   capture `udp port 9999` on interface any for --duration seconds. Each side runs in its own
   cgroup v1 pair /sys/fs/cgroup/{cpuacct,memory}/msnf-bench-<side>-<n>-<random>/, every process
   it starts included (all kubectl processes and mergecap for the baseline; multisniff's whole
   process tree): CPU is cpuacct.usage at the end; memory is the peak of the summed PSS of the
   group's processes (/proc/PID/smaps_rollup) sampled every 0.2 s (judged: unlike summed RSS it
   counts the pages 30 kubectl processes share once, not 30 times) and
   memory.max_usage_in_bytes (shown; it also counts the page cache of the files each side
   writes, and the baseline writes every packet twice).
3. Time to capturing, the same definition for both sides: from the start of the side until the
   first packet of its last pod, by the packets' own timestamps (tcpdump's kernel timestamps on
   this one-node cluster; at 100/s per pod that is at most about 10 ms after tcpdump opened its
   capture). Shown next to it: when every tcpdump said "listening on" (baseline, kubectl's stderr)
   and when multisniff logged "Capturing <pod>" for every pod (its exec to tcpdump was open).
4. Loss: the baseline compares each tcpdump's "packets captured" with the packets in its file and
   in the merged file (capinfos counts them). For ours, tcpdump's counts arrive as the interface
   statistics block of each pod in the pcapng (isb_usrdeliv = captured, isb_ifrecv = received
   by filter, isb_osdrop = dropped by kernel), parsed here and set against the packets written
   per interface; capinfos counts the file's packets too.

5. The high-rate case, `--flood` (issue 12; pods 1 and 4 by default): no background sender;
   each side starts capturing as above, and once every pod is capturing (every "listening on" /
   every "Capturing" log) a fresh sender pod floods the targets as fast as it can (the workload
   image's `udp` with no pacing: -rate 1e9), --datagrams (1,500,000) per target pod, round
   robin. When the sender has exited and 3 s more have passed (tcpdump hands over what its
   ring still holds), the side is stopped: the baseline's tcpdumps get SIGINT from a
   `kubectl exec POD -- sh -c 'kill -INT $(pidof tcpdump)'` run outside the side's cgroups,
   multisniff gets SIGINT (exit 130 is then its normal end). Shown per side: datagrams the
   sender sent (its own count) and the rate it reached (sent / time from the first to the last
   packet captured), tcpdump's received, captured and kernel-dropped counts, packets written,
   client CPU and microseconds per captured packet (also without the start-up's CPU, until
   every pod was capturing; and the baseline's without mergecap), peak PSS. Judged: every
   pod's packets written == its tcpdump's captured (zero loss in our layer), fewer kernel drops
   than the baseline, client CPU per captured packet at most the baseline's.

Exit status: 0 when everything ran (targets met or not: read the table); 1 when a side failed.
Needs root (cgroups), KUBECONFIG and kubectl on PATH (`eval "$(tests/cluster/clusterctl env)"`),
mergecap and capinfos. Developers: `python benchmarks/capture_bench.py --quick` (3 pods, 15 s);
`--flood --quick`: 1 pod, 200,000 datagrams.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOOLS_IMAGE = "multisniff.local/tools:1"
WORKLOAD_IMAGE = "multisniff.local/workload:1"
PORT = 9999
BPF = f"udp port {PORT}"
CGROUP_ROOT = Path("/sys/fs/cgroup")

START_TARGET_S = 15.0
"""Every pod capturing within this many seconds (at 30 pods, each of our modes; issue text)."""
START_TARGET_PODS = 30
FLOOD_RATE = 1e9
"""The sender's -rate for a flood: its pacer never waits, so it sends as fast as it can."""
SETTLE_S = 3.0
"""After the flood, before stopping a side: tcpdump hands over its ring's blocks within 1 s."""
SAFETY_S = 3600
"""A flooded side's tcpdump (baseline) stops by itself after this long, whatever happens."""


class BenchError(Exception):
    """A side failed or the setup did not come up: the figures cannot be trusted."""


# --- kubectl ----------------------------------------------------------------------------------


def kubectl(*args: str, stdin: str | None = None, timeout: float = 300) -> str:
    result = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(f"kubectl {shlex.join(args)[:200]} failed: {result.stderr.strip()}")
    return result.stdout


def pod_manifest(name: str, labels: dict[str, str], image: str, args: list[str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                            "args": args} if image == WORKLOAD_IMAGE else
                           {"name": "main", "image": image, "imagePullPolicy": "Never",
                            "command": ["sleep", "1000000"]}],
        },
    }


@dataclass
class Batch:
    """N target pods and the sender pod that sends to them (none for a flood batch)."""

    namespace: str
    label: str
    pods: list[str]
    ips: list[str]
    sender: str | None


def create_batch(namespace: str, label: str, count: int, rate_per_pod: float | None) -> Batch:
    pods = [f"{label}-{index:02d}" for index in range(count)]
    items = [pod_manifest(name, {"batch": label, "role": "target"}, TOOLS_IMAGE, [])
             for name in pods]
    kubectl("apply", "-n", namespace, "-f", "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod", "-l",
            f"batch={label},role=target", "--timeout=300s", timeout=320)
    listing = json.loads(kubectl("get", "pods", "-n", namespace, "-l",
                                 f"batch={label},role=target", "-o", "json"))
    by_name = {item["metadata"]["name"]: item["status"]["podIP"] for item in listing["items"]}
    ips = [by_name[name] for name in pods]
    uid = kubectl("exec", "-n", namespace, pods[0], "--", "id", "-u").strip()
    if uid != "0":
        raise BenchError(f"target pods run as uid {uid}, not 0: tcpdump cannot capture there")
    if rate_per_pod is None:
        return Batch(namespace, label, pods, ips, None)
    sender = f"{label}-sender"
    manifest = pod_manifest(
        sender, {"batch": label, "role": "sender"}, WORKLOAD_IMAGE,
        ["udp", "-targets", ",".join(f"{ip}:{PORT}" for ip in ips),
         "-rate", f"{rate_per_pod * count:g}", "-pod", sender, "-report", "10s"])
    kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", f"pod/{sender}",
            "--timeout=120s", timeout=140)
    return Batch(namespace, label, pods, ips, sender)


def flood(batch: Batch, name: str, per_pod: int) -> int:
    """Run a sender pod that sends per_pod datagrams to every target as fast as it can.

    Returns the datagrams it says it sent, once it has exited successfully.
    """
    sender = f"{batch.label}-{name}-{secrets.token_hex(2)}"  # never an old, finished one
    count = per_pod * len(batch.pods)
    manifest = pod_manifest(
        sender, {"batch": batch.label, "role": "sender"}, WORKLOAD_IMAGE,
        ["udp", "-targets", ",".join(f"{ip}:{PORT}" for ip in batch.ips),
         "-rate", f"{FLOOD_RATE:g}", "-count", str(count), "-pod", sender, "-report", "0"])
    kubectl("apply", "-n", batch.namespace, "-f", "-", stdin=json.dumps(manifest))
    kubectl("wait", "-n", batch.namespace, f"pod/{sender}", "--timeout=1800s",
            "--for=jsonpath={.status.containerStatuses[0].state.terminated.exitCode}",
            timeout=1820)
    code = kubectl("get", "pod", "-n", batch.namespace, sender, "-o", "jsonpath="
                   "{.status.containerStatuses[0].state.terminated.exitCode}").strip()
    log = kubectl("logs", "-n", batch.namespace, sender)
    if code != "0":
        raise BenchError(f"sender {sender} exited {code}: {log[-500:].strip()}")
    sent = re.findall(r"udp: (\d+) sent, (\d+) failed", log)
    if not sent:
        raise BenchError(f"sender {sender} did not say what it sent: {log[-500:].strip()}")
    return int(sent[-1][0])


def wait_until(ready: Any, processes: list[subprocess.Popen], what: str,
               timeout: float = 300) -> None:
    """Wait until ready() is true; fail when a process ends first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not ready():
        if any(process.poll() is not None for process in processes):
            raise BenchError(f"{what}: a process ended before every pod was capturing")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not every pod was capturing after {timeout:g} s")
        time.sleep(0.1)


def delete_batch(batch: Batch) -> None:
    kubectl("delete", "pods", "-n", batch.namespace, "-l", f"batch={batch.label}",
            "--wait=true", "--timeout=180s", timeout=200)


# --- cgroups and sampling ---------------------------------------------------------------------


class Group:
    """One side's cgroup v1 pair (cpuacct + memory) and a sampler of its summed PSS."""

    def __init__(self, name: str) -> None:
        self.cpu = CGROUP_ROOT / "cpuacct" / name
        self.memory = CGROUP_ROOT / "memory" / name
        self.cpu.mkdir()
        self.memory.mkdir()
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def enter(self) -> None:
        """preexec_fn: move the child (and so everything it starts) into both groups."""
        pid = str(os.getpid())
        (self.cpu / "cgroup.procs").write_text(pid)
        (self.memory / "cgroup.procs").write_text(pid)

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            try:
                pids = (self.memory / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except OSError:
                    continue
                match = re.search(r"^Pss:\s+(\d+) kB", status, re.MULTILINE)
                if match:
                    total += int(match.group(1)) * 1024
            self.peak_pss = max(self.peak_pss, total)

    def finish(self) -> tuple[float, int, int]:
        """CPU seconds, peak summed PSS and the memory group's max usage, in bytes."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        cpu = int((self.cpu / "cpuacct.usage").read_text()) / 1e9
        max_usage = int((self.memory / "memory.max_usage_in_bytes").read_text())
        return cpu, self.peak_pss, max_usage

    def remove(self) -> None:
        for directory in (self.cpu, self.memory):
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


# --- capture files ----------------------------------------------------------------------------


@dataclass
class FileFacts:
    """Per interface (pcapng) or for the whole file (classic pcap)."""

    packets: dict[int, int] = field(default_factory=dict)
    first_ts: dict[int, float] = field(default_factory=dict)
    last_ts: dict[int, float] = field(default_factory=dict)
    usrdeliv: dict[int, int] = field(default_factory=dict)
    ifrecv: dict[int, int] = field(default_factory=dict)
    osdrop: dict[int, int] = field(default_factory=dict)


def read_pcap(path: Path) -> FileFacts:
    """Packets and first timestamp of a classic pcap file (tcpdump -w), as interface 0."""
    facts = FileFacts()
    data = path.read_bytes()
    if len(data) < 24:
        return facts
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    record = struct.Struct(endian + "IIII")
    offset, count, last = 24, 0, 0
    while offset + 16 <= len(data):
        seconds, fraction, caplen, _ = record.unpack_from(data, offset)
        if count == 0:
            facts.first_ts[0] = seconds + fraction / (1e9 if nano else 1e6)
        count += 1
        last = offset
        offset += 16 + caplen
    facts.packets[0] = count
    if count:
        seconds, fraction, _, _ = record.unpack_from(data, last)
        facts.last_ts[0] = seconds + fraction / (1e9 if nano else 1e6)
    return facts


def read_pcapng(path: Path) -> FileFacts:
    """Packets, first timestamp and ISB counters per interface of a pcapng file."""
    facts = FileFacts()
    data = path.read_bytes()
    offset, endian = 0, "<"
    resolutions: list[float] = []
    while offset + 12 <= len(data):
        block_type = struct.unpack_from(endian + "I", data, offset)[0]
        if block_type == 0x0A0D0D0A:
            endian = "<" if data[offset + 8:offset + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            resolutions = []
        length = struct.unpack_from(endian + "I", data, offset + 4)[0]
        body = data[offset + 8:offset + length - 4]
        if block_type == 1:  # IDB: options after linktype, reserved, snaplen
            resolution = 1e-6
            for code, value in options(body[8:], endian):
                if code == 9:
                    raw = value[0]
                    resolution = 2.0 ** -(raw & 0x7F) if raw & 0x80 else 10.0 ** -raw
            resolutions.append(resolution)
        elif block_type == 6:  # EPB
            interface, high, low = struct.unpack_from(endian + "III", body, 0)
            facts.packets[interface] = facts.packets.get(interface, 0) + 1
            stamp = ((high << 32) | low) * resolutions[interface]
            if interface not in facts.first_ts:
                facts.first_ts[interface] = stamp
            facts.last_ts[interface] = max(stamp, facts.last_ts.get(interface, stamp))
        elif block_type == 5:  # ISB
            interface = struct.unpack_from(endian + "I", body, 0)[0]
            for code, value in options(body[12:], endian):
                counter = {4: facts.ifrecv, 7: facts.osdrop, 8: facts.usrdeliv}.get(code)
                if counter is not None and len(value) == 8:
                    counter[interface] = struct.unpack(endian + "Q", value)[0]
        offset += length
    return facts


def options(data: bytes, endian: str) -> list[tuple[int, bytes]]:
    found, offset = [], 0
    while offset + 4 <= len(data):
        code, length = struct.unpack_from(endian + "HH", data, offset)
        if code == 0:
            break
        found.append((code, data[offset + 4:offset + 4 + length]))
        offset += 4 + (length + 3) // 4 * 4
    return found


def capinfos_count(path: Path) -> int:
    out = subprocess.run(["capinfos", "-M", "-c", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r"Number of packets:\s*(\d+)", out).group(1))


# --- the two sides ----------------------------------------------------------------------------


@dataclass
class Result:
    side: str
    pods: int
    wall_s: float = 0.0
    first_packet_s: float | None = None
    """Start until the first packet of the last pod to send one (packet timestamps)."""
    ready_s: float | None = None
    """Start until every tcpdump said "listening on" (baseline) / every "Capturing" log (ours)."""
    pods_with_packets: int = 0
    cpu_s: float = 0.0
    peak_pss: int = 0
    cgroup_max_usage: int = 0
    received: int = 0
    """tcpdump: packets received by filter, summed."""
    kernel_dropped: int = 0
    captured: int = 0
    """tcpdump: packets captured, summed."""
    written: int = 0
    """Packets in the merged file (capinfos)."""
    loss_ours: int = 0
    """Packets tcpdump captured that the client's files lack."""
    exit_code: int = 0
    sent: int = 0
    """Flood: datagrams the sender said it sent."""
    send_rate: float | None = None
    """Flood: sent / time from the first to the last packet captured, per second."""
    cpu_capture_s: float | None = None
    """Flood, baseline: CPU seconds of the kubectl processes alone, before mergecap."""
    cpu_ready_s: float | None = None
    """Flood: CPU seconds the side had used when every pod was capturing (start-up)."""
    unequal_pods: int = 0
    """Pods whose packets written differ from their tcpdump's captured (or lack its counts)."""

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / self.written * 100_000 if self.written else float("inf")

    @property
    def us_per_captured(self) -> float:
        return self.cpu_s / self.captured * 1e6 if self.captured else float("inf")

    @property
    def us_per_captured_after_ready(self) -> float:
        if not self.captured or self.cpu_ready_s is None:
            return float("inf")
        return (self.cpu_s - self.cpu_ready_s) / self.captured * 1e6


def send_rate(sent: int, facts: list[FileFacts]) -> float | None:
    first = min((ts for f in facts for ts in f.first_ts.values()), default=None)
    last = max((ts for f in facts for ts in f.last_ts.values()), default=None)
    if first is None or last is None or last <= first:
        return None
    return sent / (last - first)


def run_baseline(batch: Batch, *, duration: int, workdir: Path, tag: str,
                 flood_per_pod: int = 0) -> Result:
    """The baseline; with flood_per_pod, capture until a flood of that many has passed."""
    result = Result("baseline", len(batch.pods))
    group = Group(f"msnf-bench-baseline-{len(batch.pods)}-{tag}")
    files = [workdir / f"baseline-{pod}.pcap" for pod in batch.pods]
    listening: dict[str, float] = {}
    stderr_text: dict[str, str] = {}
    threads, processes = [], []
    try:
        group.start()
        started_wall, started = time.time(), time.monotonic()
        for pod, path in zip(batch.pods, files, strict=True):
            argv = ["kubectl", "exec", "-n", batch.namespace, pod, "--", "timeout", "-s", "INT",
                    str(SAFETY_S if flood_per_pod else duration), "tcpdump", "-U", "-w", "-",
                    "-i", "any", "-n", BPF]
            with path.open("wb") as out:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.PIPE, preexec_fn=group.enter)
            processes.append(process)

            def follow(pod: str = pod, process: subprocess.Popen = process) -> None:
                lines = []
                for raw in process.stderr:
                    line = raw.decode(errors="replace")
                    if "listening on" in line and pod not in listening:
                        listening[pod] = time.monotonic() - started
                    lines.append(line)
                stderr_text[pod] = "".join(lines)

            thread = threading.Thread(target=follow, daemon=True)
            thread.start()
            threads.append(thread)
        if flood_per_pod:
            wait_until(lambda: len(listening) == len(batch.pods), processes, "baseline")
            result.cpu_ready_s = int((group.cpu / "cpuacct.usage").read_text()) / 1e9
            result.sent = flood(batch, "flood-baseline", flood_per_pod)
            time.sleep(SETTLE_S)
            for pod in batch.pods:
                kubectl("exec", "-n", batch.namespace, pod, "--", "sh", "-c",
                        "kill -INT $(pidof tcpdump)")
        codes = [process.wait(timeout=(SAFETY_S if flood_per_pod else duration) + 120)
                 for process in processes]
        for thread in threads:
            thread.join()
        if flood_per_pod:
            result.cpu_capture_s = int((group.cpu / "cpuacct.usage").read_text()) / 1e9
        merged = workdir / "baseline-merged.pcapng"
        mergecap = subprocess.run(["mergecap", "-F", "pcapng", "-w", str(merged),
                                   *map(str, files)], capture_output=True, text=True,
                                  preexec_fn=group.enter, check=False)
        result.wall_s = time.monotonic() - started
        result.cpu_s, result.peak_pss, result.cgroup_max_usage = group.finish()
        bad = [(pod, code) for pod, code in zip(batch.pods, codes, strict=True)
               if code not in (0, 124)]
        if bad or mergecap.returncode != 0:
            result.exit_code = 1
            detail = "; ".join(f"{pod} exit {code}: {stderr_text.get(pod, '')[-300:].strip()}"
                               for pod, code in bad[:3]) or mergecap.stderr[-500:]
            raise BenchError(f"baseline failed: {detail}")
        firsts, every = [], []
        for pod, path in zip(batch.pods, files, strict=True):
            facts = read_pcap(path)
            every.append(facts)
            stats = dict((what, int(count)) for count, what in re.findall(
                r"^\s*(\d+) packets? (captured|received by filter|dropped by kernel)",
                stderr_text.get(pod, ""), re.MULTILINE))
            result.captured += stats.get("captured", 0)
            result.received += stats.get("received by filter", 0)
            result.kernel_dropped += stats.get("dropped by kernel", 0)
            result.loss_ours += max(0, stats.get("captured", 0) - facts.packets.get(0, 0))
            if "captured" not in stats or stats["captured"] != facts.packets.get(0, 0):
                result.unequal_pods += 1
            if 0 in facts.first_ts:
                firsts.append(facts.first_ts[0] - started_wall)
        result.pods_with_packets = len(firsts)
        result.first_packet_s = max(firsts) if len(firsts) == len(batch.pods) else None
        result.ready_s = max(listening.values()) if len(listening) == len(batch.pods) else None
        result.written = capinfos_count(merged)
        if flood_per_pod:
            result.send_rate = send_rate(result.sent, every)
        return result
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        group.finish()
        group.remove()


def run_ours(batch: Batch, mode: str, *, duration: int, workdir: Path, tag: str,
             flood_per_pod: int = 0) -> Result:
    """multisniff in one mode; with flood_per_pod, until a flood of that many has passed."""
    result = Result(f"multisniff {mode}", len(batch.pods))
    group = Group(f"msnf-bench-{mode}-{len(batch.pods)}-{tag}")
    output = workdir / f"ours-{mode}.pcapng"
    summary = workdir / f"ours-{mode}.json"
    output.unlink(missing_ok=True)
    here = Path(sys.executable).parent / "multisniff"
    program = str(here if here.exists() else REPO / ".venv" / "bin" / "multisniff")
    argv = [program, "-l", f"batch={batch.label},role=target", "-n", batch.namespace,
            "-o", str(output), "--mode", mode, "-f", BPF, "--summary-json", str(summary)]
    if not flood_per_pod:
        argv += ["--duration", f"{duration}s"]
    if mode == "ephemeral":
        argv += ["--ephemeral-image", TOOLS_IMAGE]
    capturing: dict[str, float] = {}
    lines: list[str] = []
    process = None
    try:
        group.start()
        started_wall, started = time.time(), time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, preexec_fn=group.enter)

        def follow(process: subprocess.Popen = process) -> None:
            for raw in process.stderr:
                line = raw.decode(errors="replace")
                lines.append(line)
                match = re.search(r"Capturing (\S+) \(", line)
                if match and match.group(1) not in capturing:
                    capturing[match.group(1)] = time.monotonic() - started

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        if flood_per_pod:
            wait_until(lambda: len(capturing) == len(batch.pods), [process], f"multisniff {mode}")
            result.cpu_ready_s = int((group.cpu / "cpuacct.usage").read_text()) / 1e9
            result.sent = flood(batch, f"flood-{mode}", flood_per_pod)
            time.sleep(SETTLE_S)
            process.send_signal(signal.SIGINT)
        result.exit_code = process.wait(timeout=(300 if flood_per_pod else duration + 180))
        thread.join()
        result.wall_s = time.monotonic() - started
        result.cpu_s, result.peak_pss, result.cgroup_max_usage = group.finish()
        stopped = 130 if flood_per_pod else 0  # SIGINT ends a capture with 130, as documented
        if result.exit_code != stopped or not output.exists():
            raise BenchError(f"multisniff --mode {mode} exited {result.exit_code}:\n"
                             + "".join(lines[-15:]))
        facts = read_pcapng(output)
        firsts = [ts - started_wall for ts in facts.first_ts.values()]
        result.pods_with_packets = len(firsts)
        result.first_packet_s = max(firsts) if len(firsts) == len(batch.pods) else None
        result.ready_s = max(capturing.values()) if len(capturing) == len(batch.pods) else None
        result.captured = sum(facts.usrdeliv.values())
        result.received = sum(facts.ifrecv.values())
        result.kernel_dropped = sum(facts.osdrop.values())
        result.loss_ours = sum(max(0, count - facts.packets.get(interface, 0))
                               for interface, count in facts.usrdeliv.items())
        if len(facts.usrdeliv) != len(batch.pods):
            result.loss_ours = -1  # tcpdump's counts missing for some pod: cannot tell
        result.unequal_pods = max(0, len(batch.pods) - len(facts.usrdeliv)) + sum(
            1 for interface, count in facts.usrdeliv.items()
            if count != facts.packets.get(interface, 0))
        result.written = capinfos_count(output)
        if flood_per_pod:
            result.send_rate = send_rate(result.sent, [facts])
        return result
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        group.finish()
        group.remove()


# --- report -----------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f}"


def print_table(results: list[Result]) -> None:
    print()
    print(f"{'side':<20} {'pods':>4} {'first':>6} {'ready':>6} {'CPU s':>7} {'CPU/100k':>8} "
          f"{'PSS MiB':>8} {'cg MiB':>7} {'received':>9} {'captured':>9} {'written':>9} "
          f"{'kdrop':>6} {'lost':>5}")
    for r in results:
        print(f"{r.side:<20} {r.pods:>4} {seconds(r.first_packet_s)} {seconds(r.ready_s)} "
              f"{r.cpu_s:7.2f} {r.cpu_per_100k:8.2f} {r.peak_pss / 2**20:8.1f} "
              f"{r.cgroup_max_usage / 2**20:7.1f} {r.received:>9,} {r.captured:>9,} "
              f"{r.written:>9,} {r.kernel_dropped:>6,} {r.loss_ours:>5}")
    print("first: start until the last pod's first packet; ready: until every tcpdump said "
          "'listening on' (baseline) / multisniff logged 'Capturing' for every pod;\nlost: packets "
          "tcpdump captured that the client's files lack (-1: tcpdump's counts missing)")


def print_flood_table(results: list[Result]) -> None:
    print()
    print(f"{'side':<20} {'pods':>4} {'sent':>10} {'rate/s':>8} {'received':>10} "
          f"{'captured':>10} {'kdrop':>9} {'kdrop%':>6} {'written':>10} {'unequal':>7} "
          f"{'CPU s':>7} {'us/pkt':>6} {'flood':>6} {'PSS MiB':>8}")
    for r in results:
        rate = "n/a" if r.send_rate is None else f"{r.send_rate:,.0f}"
        share = r.kernel_dropped / r.received * 100 if r.received else 0.0
        print(f"{r.side:<20} {r.pods:>4} {r.sent:>10,} {rate:>8} {r.received:>10,} "
              f"{r.captured:>10,} {r.kernel_dropped:>9,} {share:6.2f} {r.written:>10,} "
              f"{r.unequal_pods:>7} {r.cpu_s:7.2f} {r.us_per_captured:6.2f} "
              f"{r.us_per_captured_after_ready:6.2f} {r.peak_pss / 2**20:8.1f}")
        if r.cpu_capture_s is not None and r.cpu_ready_s is not None and r.captured:
            print(f"{'  kubectl alone':<20} {'':>4} {'':>10} {'':>8} {'':>10} {'':>10} {'':>9} "
                  f"{'':>6} {'':>10} {'':>7} {r.cpu_capture_s:7.2f} "
                  f"{r.cpu_capture_s / r.captured * 1e6:6.2f} "
                  f"{(r.cpu_capture_s - r.cpu_ready_s) / r.captured * 1e6:6.2f}")
    print("rate: datagrams sent / time from the first to the last packet captured; received, "
          "captured, kdrop: tcpdump's counts (kdrop% of received);\nunequal: pods whose packets "
          "written differ from their tcpdump's captured; us/pkt: client CPU per captured packet "
          "(the baseline's with mergecap;\n'kubectl alone': before mergecap); flood: the same "
          "without the CPU used until every pod was capturing (start-up)")


def flood_verdicts(results: list[Result]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    by = {(r.side, r.pods): r for r in results}
    for (side, pods), r in sorted(by.items(), key=lambda item: (item[0][1], item[0][0])):
        if side == "baseline":
            continue
        found.append({"check": f"flood {side} {pods} pods: zero loss in our layer (pods with "
                               f"written != captured)", "value": r.unequal_pods,
                      "pass": r.unequal_pods == 0 and r.captured > 0})
        base = by.get(("baseline", pods))
        if base is None:
            continue
        found.append({"check": f"flood {side} {pods} pods: fewer kernel drops than the "
                               f"baseline's {base.kernel_dropped:,}", "value": r.kernel_dropped,
                      "pass": r.kernel_dropped < base.kernel_dropped
                      or r.kernel_dropped == base.kernel_dropped == 0})
        ratio = r.us_per_captured / base.us_per_captured if base.captured else float("inf")
        found.append({"check": f"flood {side} {pods} pods: CPU per captured packet at most the "
                               f"baseline's", "value": round(ratio, 3), "pass": ratio <= 1.0})
    return found


def verdicts(results: list[Result]) -> list[dict[str, Any]]:
    found = []
    by = {(r.side, r.pods): r for r in results}
    for (side, pods), r in sorted(by.items(), key=lambda item: (item[0][1], item[0][0])):
        if side == "baseline":
            continue
        base = by.get(("baseline", pods))
        if pods >= START_TARGET_PODS or pods == max(p for _, p in by):
            ok = r.first_packet_s is not None and r.first_packet_s <= START_TARGET_S
            found.append({"check": f"{side} {pods} pods capturing within {START_TARGET_S:g} s",
                          "value": r.first_packet_s, "pass": ok})
        if base is not None:
            for name, ours, theirs in (
                ("CPU per 100k packets", r.cpu_per_100k, base.cpu_per_100k),
                ("peak PSS", r.peak_pss, base.peak_pss),
            ):
                ratio = ours / theirs if theirs else float("inf")
                found.append({"check": f"{side} {pods} pods {name} below the baseline's",
                              "value": round(ratio, 3), "pass": ratio < 1.0})
        found.append({"check": f"{side} {pods} pods zero loss in our layer",
                      "value": r.loss_ours, "pass": r.loss_ours == 0})
    return found


def print_verdicts(found: list[dict[str, Any]]) -> None:
    print()
    for item in found:
        value = item["value"]
        shown = ("n/a" if value is None else
                 f"ratio ours/baseline {value:.2f}" if item["check"].endswith("baseline's") else
                 f"{value:,}" if isinstance(value, int) else
                 f"{value:.1f} s" if isinstance(value, float) else f"{value}")
        print(f"{'PASS' if item['pass'] else 'FAIL'}  {item['check']}: {shown}")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, nargs="+",
                        help="pod counts to measure (default: 10 30; with --flood: 1 4)")
    parser.add_argument("--duration", type=int, default=60,
                        help="seconds each side captures (default: 60)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="datagrams per second per target pod (default: 100)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/multisniff-capture-bench"),
                        help="where the capture files go (default: %(default)s)")
    parser.add_argument("--flood", action="store_true",
                        help="the high-rate case instead: each side's targets flooded by a "
                             "sender as fast as it can, --datagrams per target pod")
    parser.add_argument("--datagrams", type=int, default=1_500_000,
                        help="with --flood: datagrams per target pod (default: 1,500,000)")
    parser.add_argument("--quick", action="store_true",
                        help="3 pods, 15 s (with --flood: 1 pod, 200,000 datagrams): for "
                             "developers")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.quick and args.flood:
        args.pods, args.datagrams = [1], 200_000
    elif args.quick:
        args.pods, args.duration = [3], 15
    elif args.pods is None:
        args.pods = [1, 4] if args.flood else [10, 30]
    if args.datagrams < 1 or min(args.pods) < 1:
        parser.error("--datagrams and --pods take numbers of at least 1")
    return args


def core_name() -> str:
    """The pcap core multisniff runs with, as its --version says."""
    here = Path(sys.executable).parent / "multisniff"
    program = str(here if here.exists() else REPO / ".venv" / "bin" / "multisniff")
    out = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    said = (out.stdout + out.stderr).strip()
    return said.splitlines()[-1] if said else "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("kubectl", "mergecap", "capinfos"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH; for kubectl: eval \"$(tests/cluster/clusterctl env)\"",
                  file=sys.stderr)
            return 1
    if os.geteuid() != 0 or not (CGROUP_ROOT / "cpuacct").is_dir():
        print("needs root and cgroup v1 cpuacct+memory under /sys/fs/cgroup", file=sys.stderr)
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Measure multisniff as installed: pip compiles a package's bytecode at install time, while
    # an editable checkout run with PYTHONDONTWRITEBYTECODE set would compile every module at
    # every start (about 70 ms of CPU that no user pays).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "multisniff")],
                   stdout=subprocess.DEVNULL, check=False)
    tag = secrets.token_hex(3)
    namespace = f"msnf-bench-{tag}"
    if args.flood:
        print(f"namespace {namespace}; pods {args.pods}; flood of {args.datagrams:,} datagrams "
              f"per target pod; filter '{BPF}'; core {core_name()}", flush=True)
    else:
        print(f"namespace {namespace}; pods {args.pods}; {args.duration} s per side; "
              f"{args.rate:g} datagrams/s per target pod; filter '{BPF}'", flush=True)
    results: list[Result] = []
    failed = False
    kubectl("create", "namespace", namespace)
    try:
        for index, count in enumerate(args.pods):
            shared_first = index % 2 == 0
            plan = ["shared", "fresh"] if shared_first else ["fresh", "shared"]
            for which in plan:
                label = f"{'a' if which == 'shared' else 'b'}{count}"
                print(f"creating {count} target pods + 1 sender ({label}) ...", flush=True)
                batch = create_batch(namespace, label, count,
                                     None if args.flood else args.rate)
                if not args.flood:
                    time.sleep(3)  # the sender's first datagrams reach every target
                sides = (["baseline", "upload"] if shared_first else ["upload", "baseline"]) \
                    if which == "shared" else ["ephemeral"]
                for side in sides:
                    print(f"  {count} pods: {side} ...", flush=True)
                    try:
                        flood_per_pod = args.datagrams if args.flood else 0
                        if side == "baseline":
                            result = run_baseline(batch, duration=args.duration,
                                                  workdir=args.workdir, tag=tag,
                                                  flood_per_pod=flood_per_pod)
                        else:
                            result = run_ours(batch, side, duration=args.duration,
                                              workdir=args.workdir, tag=tag,
                                              flood_per_pod=flood_per_pod)
                    except BenchError as exc:
                        print(f"  FAILED: {exc}", flush=True)
                        failed = True
                        continue
                    results.append(result)
                    if args.flood:
                        print(f"    {result.sent:,} sent, {result.captured:,} captured, "
                              f"{result.kernel_dropped:,} kernel drops, {result.written:,} "
                              f"written, {result.cpu_s:.2f} CPU s", flush=True)
                        continue
                    print(f"    first packet of every pod after {seconds(result.first_packet_s)} s"
                          f", {result.cpu_s:.2f} CPU s, {result.written:,} packets written, "
                          f"peak PSS {result.peak_pss / 2**20:.1f} MiB", flush=True)
                delete_batch(batch)
    finally:
        print(f"deleting namespace {namespace} ...", flush=True)
        try:
            kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=300s",
                    timeout=320)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"could not delete namespace {namespace}: {exc}; "
                  f"kubectl delete namespace {namespace}", file=sys.stderr)
    if args.flood:
        print_flood_table(results)
        found = flood_verdicts(results)
    else:
        print_table(results)
        found = verdicts(results)
    print_verdicts(found)
    if args.json:
        case = ({"flood_datagrams_per_pod": args.datagrams, "core": core_name()} if args.flood
                else {"duration_s": args.duration, "rate_per_pod": args.rate})
        Path(args.json).write_text(json.dumps(case | {
            "filter": BPF,
            "results": [asdict(r) | {"cpu_per_100k": r.cpu_per_100k,
                                     "us_per_captured": r.us_per_captured,
                                     "us_per_captured_after_ready":
                                         r.us_per_captured_after_ready} for r in results],
            "verdicts": found,
        }, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
