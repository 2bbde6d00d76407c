"""What `multisniff merge` writes, judged by tools nobody here wrote: tshark, capinfos, mergecap.

Inputs are real tcpdump captures of UDP on the loopback interface (one with nanosecond, one with
microsecond timestamps), taken in the test, plus generated files in both byte orders. Needs root
(to capture) and the Wireshark command-line tools; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
import capturefiles as cf

TOOLS = ("tcpdump", "tshark", "capinfos", "mergecap")
pytestmark = [
    pytest.mark.usefixtures("pcap_core"),
    pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo with tcpdump needs root"),
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} on PATH"),
]



def _free_ports(n: int) -> tuple[int, ...]:
    """Ports nobody listens on now: a fixed pair would also catch a concurrent run's datagrams."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = tuple(sock.getsockname()[1] for sock in sockets)
    for sock in sockets:
        sock.close()
    return ports


PORTS = _free_ports(2)


def port_index(n: int) -> int:
    """Datagram n goes to PORTS[port_index(n)]: runs of 7 alternate between the two."""
    return (n // 7) % 2


SENT = tuple(sum(1 for n in range(300) if port_index(n) == i) for i in range(2))
"""Datagrams sent to each port: 153 and 147."""


def multisniff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multisniff", *args], capture_output=True,
                          text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-n", "-r", str(path), "-T", "fields"]
    for name in fields:
        argv += ["-e", name]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [line.split("\t") for line in result.stdout.splitlines()]


def capinfos(path: Path, *flags: str) -> dict[str, str]:
    result = subprocess.run(["capinfos", "-M", *flags, str(path)], capture_output=True,
                            text=True, check=True)
    info = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            info[key.strip()] = value.strip()
    return info


def start_tcpdump(path: Path, port: int, precision: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-B", "8192", "-Z", "root",
         "--time-stamp-precision", precision, "-w", str(path), "udp", "dst", "port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    assert process.stderr is not None
    line = process.stderr.readline()  # "listening on lo, ..." once the capture runs
    assert b"listening" in line, line
    return process


def packets_in(path: Path) -> int:
    """Complete packet records in a classic pcap that tcpdump is still writing."""
    data = path.read_bytes()
    if len(data) < 24:
        return 0
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    offset, packets = 24, 0
    while offset + 16 <= len(data):
        (caplen,) = struct.unpack_from(order + "I", data, offset + 8)
        if offset + 16 + caplen > len(data):
            break
        offset += 16 + caplen
        packets += 1
    return packets


def wait_until_written(paths: dict[Path, int]) -> None:
    """Wait until tcpdump has written every packet sent to it, or has written nothing new for
    3 s: on a busy machine it may lag far behind, and SIGINT would cut it short."""
    counts: dict[Path, int] = {}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 3:
        now = {path: packets_in(path) for path in paths}
        if all(now[path] >= expected for path, expected in paths.items()):
            return
        if now != counts:
            counts, quiet_since = now, time.monotonic()
        time.sleep(0.1)


CAPTURED: dict[Path, int] = {}
"""What each tcpdump said it captured ("N packets captured"), after it ended."""


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """300 UDP datagrams to two ports on 127.0.0.1, in runs of 7, each one received
    before the next is sent (so the captures see them at their own pace)."""
    directory = tmp_path_factory.mktemp("loopback")
    nano = directory / "pod-a.pcap"
    micro = directory / "pod-b.pcap"
    receivers = []
    for port in PORTS:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", port))
        receiver.settimeout(10)
        receivers.append(receiver)
    dumps = [start_tcpdump(nano, PORTS[0], "nano"), start_tcpdump(micro, PORTS[1], "micro")]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for n in range(300):
                index = port_index(n)
                sender.sendto(f"packet {n:04d} ".encode() * (1 + n % 40),
                              ("127.0.0.1", PORTS[index]))
                receivers[index].recv(65536)
        wait_until_written({nano: SENT[0], micro: SENT[1]})
    finally:
        for path, dump in zip((nano, micro), dumps, strict=True):
            if dump.poll() is None:
                dump.send_signal(signal.SIGINT)
                dump.wait(timeout=30)
            if dump.stderr is not None:
                said = re.search(rb"(\d+) packets? captured", dump.stderr.read())
                if said:
                    CAPTURED[path] = int(said.group(1))
                dump.stderr.close()
        for receiver in receivers:
            receiver.close()
    yield nano, micro


def test_inputs_are_what_they_should_be(captures: tuple[Path, Path]) -> None:
    # 300 datagrams, each received before the next was sent, in alternating runs of 7; on a
    # loaded machine the kernel may drop some before tcpdump reads them (seen in CI: 82 of
    # 153), so the file must hold exactly what tcpdump says it captured, and no more than sent
    for path, sent in zip(captures, SENT, strict=True):
        assert 0 < count(path) == CAPTURED[path] <= sent


def count(path: Path) -> int:
    return int(capinfos(path, "-c")["Number of packets"])


def test_merge_is_read_by_tshark_with_names_and_exact_ordered_times(
        captures: tuple[Path, Path], tmp_path: Path) -> None:
    nano, micro = captures
    out = tmp_path / "merged.pcapng"
    result = multisniff("merge", str(nano), str(micro), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = tshark_fields(out, "frame.interface_name", "frame.time_epoch", "udp.dstport")
    assert len(rows) == count(nano) + count(micro)
    assert {row[0] for row in rows} == {"pod-a", "pod-b"}
    assert all(row[0] == ("pod-a" if row[2] == str(PORTS[0]) else "pod-b") for row in rows)
    times = [row[1] for row in rows]
    as_ns = [int(t.replace(".", "")) for t in times]
    assert as_ns == sorted(as_ns)
    inputs = sorted(row[0] for path in captures for row in tshark_fields(path,
                                                                          "frame.time_epoch"))
    assert sorted(times) == inputs  # every timestamp exact, nanoseconds kept as nanoseconds
    info = capinfos(out, "-t", "-c", "-I")
    assert info["File type"] == "pcapng"
    assert info["Number of packets"] == str(len(rows))
    assert info["Number of interfaces in file"] == "2"


def test_merge_order_is_mergecaps(captures: tuple[Path, Path], tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.pcapng", tmp_path / "theirs.pcapng"
    assert multisniff("merge", *map(str, captures), "-o", str(ours)).returncode == 0
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(theirs), *map(str, captures)],
                   check=True, capture_output=True)
    fields = ("frame.time_epoch", "udp.dstport", "udp.length", "frame.len")
    assert tshark_fields(ours, *fields) == tshark_fields(theirs, *fields)


def test_inspect_agrees_with_capinfos(captures: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged.pcapng"
    assert multisniff("merge", *map(str, captures), "-o", str(out)).returncode == 0
    result = multisniff("inspect", str(out), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    info = capinfos(out, "-c", "-d", "-S", "-a", "-e")
    assert document["packets"] == int(info["Number of packets"])
    assert sum(i["bytes"] for i in document["interfaces"]) == int(info["Data size"].split()[0])
    firsts = sorted(i["first"] for i in document["interfaces"])
    lasts = sorted(i["last"] for i in document["interfaces"])
    # capinfos prints microseconds here; ours has every digit of the interface's resolution
    assert firsts[0].startswith(info["First packet time"][:17])
    assert lasts[-1].startswith(info["Last packet time"][:17])
    assert [i["name"] for i in document["interfaces"]] == ["pod-a", "pod-b"]


def test_a_merged_file_merged_again_keeps_interfaces_apart(
        captures: tuple[Path, Path], tmp_path: Path) -> None:
    first = tmp_path / "first.pcapng"
    again = tmp_path / "again.pcapng"
    assert multisniff("merge", *map(str, captures), "-o", str(first)).returncode == 0
    result = multisniff("merge", str(first), str(captures[0]), "-o", str(again))
    assert result.returncode == 0, result.stderr
    names = {row[0] for row in tshark_fields(again, "frame.interface_name")}
    assert names == {"first:pod-a", "first:pod-b", "pod-a"}


def test_generated_inputs_in_both_byte_orders(tmp_path: Path) -> None:
    big_pcap = tmp_path / "be.pcap"
    big_pcap.write_bytes(cf.pcap_file(
        [(1_700_000_000, n * 3, bytes(60) + bytes([n]), 60 + n) for n in range(50)],
        order=">", nano=True))
    big_ng = tmp_path / "be.pcapng"
    big_ng.write_bytes(cf.shb(">") + cf.idb(">", name="x", tsresol=0x80 | 10, snaplen=100)
                       + b"".join(cf.epb(0, (1_700_000_000 << 10) + n, bytes(64), order=">",
                                         opts=[(1, b"note")]) for n in range(50))
                       + cf.isb(0, 1_700_000_001 << 10, ifdrop=3, order=">"))
    out = tmp_path / "out.pcapng"
    result = multisniff("merge", str(big_pcap), str(big_ng), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = tshark_fields(out, "frame.interface_name", "frame.time_epoch", "frame.len",
                         "frame.comment")
    assert len(rows) == 100
    assert {row[0] for row in rows} == {"be", "be#2"}
    assert rows[0][1] == "1700000000.000000000"
    assert all(row[3] == "note" for row in rows if row[0] == "be#2")
    assert sorted(int(row[2]) for row in rows if row[0] == "be") == list(range(60, 110))
    info = capinfos(out, "-c", "-I")
    assert info["Number of packets"] == "100"
