"""The ring buffer (--rotate-size, --rotate-every, --keep-files): dumpcap's naming, every file a
complete pcapng with every interface and name record declared so far, nothing lost or doubled
across files, the oldest files removed; tshark reads each file on its own."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode, registered
from fakes import FakeCluster, make_pod

import multisniff
from multisniff import cli
from multisniff.capture.model import Target
from multisniff.engine.rotation import RotatingFileSink, ring_files, ring_name
from multisniff.errors import ExitCode
from multisniff.pcap.blocks import InterfaceInfo, NameBlock, NameRecord
from multisniff.pcap.reading import CaptureReader, packet_fields
from multisniff.pcap.writing import PcapngWriter, encode_epb, encode_nrb

TSHARK = shutil.which("tshark")
NAME = re.compile(r"^rec_\d{5}_\d{14}\.pcapng$")


def stream() -> tuple[list[bytes], int]:
    """A live output's stream in chunks: interface a, a name record, packets, interface b
    joining later, more packets. (chunks, packets)"""
    writer = PcapngWriter()
    a = writer.add_interface(InterfaceInfo(linktype=147, name="shop/web-a", tsresol=9))
    writer.add_block(encode_nrb(NameBlock(records=[NameRecord(bytes([10, 0, 0, 1]),
                                                              ("shop/web-a",))])))
    chunks = [writer.take()]
    packets = 0
    base = 1_700_000_000 * 10**9
    for i in range(40):
        writer.add_block(encode_epb(a, base + i * 1000, f"a{i:04d}".encode() * 25))
        packets += 1
        if i == 15:
            b = writer.add_interface(InterfaceInfo(linktype=147, name="shop/web-b",
                                                   tsresol=9))
        if i >= 15:
            writer.add_block(encode_epb(b, base + i * 1000 + 1, f"b{i:04d}".encode() * 25))
            packets += 1
        if i % 4 == 3:
            chunks.append(writer.take())
    chunks.append(writer.take())
    return chunks, packets


def read(path: Path) -> tuple[list[str], list[bytes], int]:
    """(interface names, packet payloads, name records) of one file, by our reader."""
    reader = CaptureReader()
    batch = reader.feed(path.read_bytes())
    assert reader.finish() is None
    payloads = []
    for packet in batch.packets:
        raw = b"".join(packet)
        caplen = packet_fields(packet)[2]
        payloads.append(raw[28:28 + caplen])
    return [info.name or "" for info in reader.interfaces], payloads, len(batch.names)


def write_all(sink: RotatingFileSink, chunks: list[bytes]) -> None:
    for chunk in chunks:
        sink.write_blocks(chunk)
    sink._close()


def test_files_by_size_are_complete_and_hold_every_packet_once(tmp_path: Path) -> None:
    chunks, packets = stream()
    sink = RotatingFileSink(str(tmp_path / "rec.pcapng"), max_size=2000, every=None,
                            keep_files=None)
    write_all(sink, chunks)
    files = [Path(name) for name in sink.files]
    assert len(files) > 3
    assert files == ring_files(str(tmp_path / "rec.pcapng"))
    assert all(NAME.match(path.name) for path in files)
    assert [int(path.name.split("_")[1]) for path in files] == list(range(1, len(files) + 1))
    payloads: list[bytes] = []
    for number, path in enumerate(files):
        names, got, name_records = read(path)
        assert names[0] == "shop/web-a" and name_records == 1
        payloads += got
        if number > 0:
            assert got, path  # a file is begun for a packet
    assert len(payloads) == packets
    assert len(set(payloads)) == packets
    last_names, _, _ = read(files[-1])
    assert last_names == ["shop/web-a", "shop/web-b"]
    for path in files[:-1]:  # the size is reached, then the next file begins
        assert path.stat().st_size >= 2000
    if TSHARK is not None:
        total = 0
        for path in files:
            done = subprocess.run([TSHARK, "-r", str(path), "-T", "fields", "-e",
                                   "frame.interface_name"], capture_output=True, text=True,
                                  check=True)
            total += len(done.stdout.split())
        assert total == packets


def test_keep_files_removes_the_oldest(tmp_path: Path) -> None:
    chunks, _ = stream()
    sink = RotatingFileSink(str(tmp_path / "rec.pcapng"), max_size=2000, every=None,
                            keep_files=2)
    write_all(sink, chunks)
    assert len(sink.files) > 3
    assert [Path(name) for name in sink.kept] == ring_files(str(tmp_path / "rec.pcapng"))
    assert sink.kept == sink.files[-2:]
    assert all(not Path(name).exists() for name in sink.removed)


def test_files_by_duration(tmp_path: Path) -> None:
    chunks, packets = stream()
    now = [1000.0]
    sink = RotatingFileSink(str(tmp_path / "rec.pcapng"), max_size=None, every=10,
                            keep_files=None, clock=lambda: now[0])
    for chunk in chunks:
        sink.write_blocks(chunk)
        now[0] += 4
    sink._close()
    # 12 chunks, 4 s apart: a new file every third chunk.
    assert len(sink.files) == 4
    assert sink.files[0] == ring_name(str(tmp_path / "rec.pcapng"), 1, 1000.0)
    assert sum(len(read(Path(name))[1]) for name in sink.files) == packets


@pytest.fixture
def mode() -> Iterator[FakeMode]:
    def make(target: Target) -> FakeCapture:
        return FakeCapture(name=target.pod.ref.name, total=1, interval=0.002, forever=True)

    with registered(FakeMode(make=make, name="fake-ring")) as fake:
        yield fake


def test_a_capture_into_a_ring_of_files(tmp_path: Path, mode: FakeMode) -> None:
    cluster = FakeCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    cluster.add_pod(make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.0.0.3"))
    out = tmp_path / "rec.pcapng"

    async def main() -> multisniff.SessionResult:
        with anyio.fail_after(20):
            return await capture()

    async def capture() -> multisniff.SessionResult:
        async with multisniff.capture("app=web", namespace="shop", mode="fake-ring",
                                      cluster=cluster, output=out, rotate_size="4k",
                                      keep_files=3, reorder_window=0.2) as cap:
            await cap.ready(timeout=5)
            await anyio.sleep(1)
        return cap.result

    result = anyio.run(main, backend="asyncio")
    assert result.exit_code == ExitCode.OK
    files = ring_files(str(out))
    assert len(files) == 3
    assert not out.exists()
    for path in files:
        names, _, name_records = read(path)
        assert sorted(names) == ["shop/web-a", "shop/web-b"]
        assert name_records >= 1
    assert int(files[-1].name.split("_")[1]) > 3  # older files were removed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-l", "app=web", "-o", "x", "--keep-files", "3"],
         "--keep-files needs --rotate-size or --rotate-every"),
        (["-l", "app=web", "-o", "-", "--rotate-size", "10M"], "give a file with -o"),
        (["-l", "app=web", "-o", "x", "--rotate-every", "0"], "--rotate-every must be more"),
        (["-l", "app=web", "-o", "x", "--rotate-size", "big"], "'big' is not a size"),
    ],
)
def test_usage_errors(argv: list[str], message: str, caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main(argv) == ExitCode.USAGE
    assert message in caplog.text


def test_time_in_names_is_when_the_file_began() -> None:
    begun = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    assert ring_name("/x/out.pcapng", 7, begun) == "/x/out_00007_20260102030405.pcapng"
    assert ring_name("out", 1, begun) == "out_00001_20260102030405"


def test_statistics_at_the_end_stay_in_the_last_file(tmp_path: Path) -> None:
    from multisniff.pcap.blocks import InterfaceStatistics
    from multisniff.pcap.writing import encode_isb

    chunks, _ = stream()
    sink = RotatingFileSink(str(tmp_path / "rec.pcapng"), max_size=2000, every=None,
                            keep_files=None)
    for chunk in chunks:
        sink.write_blocks(chunk)
    files = list(sink.files)
    sink._size = 10**6  # the current file is full when the statistics come
    sink.write_blocks(encode_isb(InterfaceStatistics(interface_id=0, timestamp=1)))
    sink._close()
    assert sink.files == files  # no file of statistics alone
    reader = CaptureReader()
    batch = reader.feed(Path(files[-1]).read_bytes())
    assert reader.finish() is None
    assert batch.packets and len(batch.statistics) == 1
