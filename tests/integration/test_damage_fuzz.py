"""Damaged captures, many of them: `inspect` and `merge` never raise, never hang, write only what
capinfos reads to the end, and never keep fewer packets than mergecap keeps from the same file.

Bases are real captures (tcpdump on the loopback interface, taken here; the same packets as
pcapng by editcap, and two interfaces in one pcapng by mergecap) and generated ones (both byte
orders, every block type, options, if_tsoffset, nanosecond and binary resolutions). Each case
damages one base in one to three ways, chosen by a seeded random generator: truncation, flipped
bytes, block lengths, option lengths, captured lengths, byte order, interface ids, timestamps at
both extremes, if_tsoffset and if_tsresol, blocks removed or repeated.

Damage to the first records of a classic pcap can make Wireshark take the file for one of the
pcap variants it guesses at (Nokia's, Red Hat's, ...: `captype` says so) and read the rest of it
as records of that variant; multisniff reads none of those variants, so for such a file the
packet count is not compared (everything else is).

MULTISNIFF_FUZZ_CASES sets the number of cases (40 by default, `make fuzz` runs many more) and
MULTISNIFF_FUZZ_SEED the seed. A failing case is kept as a file (in MULTISNIFF_FUZZ_FAILURES,
by default the test's temporary directory) and named in the failure with the damage done to it,
so that it can be replayed with `multisniff merge`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
import capturefiles as cf
import damagedfiles
from test_merge_tshark import wait_until_written

from multisniff.cli import main
from multisniff.errors import ExitCode

TOOLS = ("tcpdump", "editcap", "capinfos", "mergecap", "captype")
pytestmark = [
    pytest.mark.usefixtures("pcap_core"),
    pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo with tcpdump needs root"),
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} on PATH"),
]

CASES = int(os.environ.get("MULTISNIFF_FUZZ_CASES", "40"))
SEED = int(os.environ.get("MULTISNIFF_FUZZ_SEED", "9"))
TIME_LIMIT = 30.0
"""Seconds one command may take on one damaged file (the largest base takes well under 1 s)."""


# --- bases ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("bases")
    real = _loopback_captures(directory)
    return {**real, **_generated()}


def _loopback_captures(directory: Path) -> dict[str, bytes]:
    """120 UDP datagrams of growing size on 127.0.0.1, captured by tcpdump with nanosecond and
    with microsecond timestamps; the pair also as pcapng made by editcap and mergecap."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        paths = {precision: directory / f"lo-{precision}.pcap" for precision in ("nano", "micro")}
        dumps = [subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-Z", "root",
             "--time-stamp-precision", precision, "-w", str(path), "udp", "dst", "port",
             str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for precision, path in paths.items()]
        try:
            for dump in dumps:
                assert dump.stderr is not None
                assert b"listening" in dump.stderr.readline()
            receiver.settimeout(10)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for n in range(120):
                    sender.sendto(bytes([n]) * (1 + 13 * n), ("127.0.0.1", port))
                    receiver.recv(65536)
            wait_until_written(dict.fromkeys(paths.values(), 120))
        finally:
            for dump in dumps:
                dump.send_signal(signal.SIGINT)
                dump.wait(timeout=30)
                if dump.stderr is not None:
                    dump.stderr.close()
    ng = directory / "lo.pcapng"
    both = directory / "lo-both.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(paths["nano"]), str(ng)], check=True,
                   capture_output=True)
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(both), *map(str, paths.values())],
                   check=True, capture_output=True)
    files = {path.name: path.read_bytes() for path in (*paths.values(), ng, both)}
    assert all(len(data) > 1000 for data in files.values()), {k: len(v) for k, v in
                                                              files.items()}
    return files


def _generated() -> dict[str, bytes]:
    records = [(1_700_000_000 + n // 3, n * 1000, bytes([n]) * (14 + 7 * n), 14 + 9 * n)
               for n in range(30)]
    epb_options = [(1, b"a comment"), (2, struct.pack("<I", 1)), (3, b"\x02abcd"),
                   (4, struct.pack("<Q", 3)), (5, struct.pack("<Q", 77)),
                   (7, b"\x01" + bytes(8)), (2988, b"\0\0\x7f\x00data")]
    le = b"".join([
        cf.shb(opts=[(2, b"x86_64"), (4, b"generator")]),
        cf.idb(name="eth0", snaplen=65535, extra=[(3, b"first"), (11, b"\0port 53"),
                                                   (8, struct.pack("<Q", 10**9))]),
        cf.idb(name="ns", tsresol=9, tsoffset=-10),
        cf.idb(name="bin", tsresol=0x80 | 20, tsoffset=1_700_000_000, linktype=101),
        *(cf.epb(n % 3, (1 << 40) + n * 997, bytes([n]) * (20 + n), opts=epb_options[: n % 8])
          for n in range(24)),
        cf.spb(b"simple packet"),
        cf.packet_block(1, 12345, b"obsolete", drops=2),
        cf.block(0x0000000A, struct.pack("<II", 0x544C534B, 8) + b"SECRETS!"),
        cf.block(0x00000009, b"__REALTIME_TIMESTAMP=1700000000000000\nMESSAGE=hi\n"),
        cf.block(0x00000BAD, b"\0\0\x7f\x00custom"),
        cf.nrb([(b"\x7f\0\0\x01", ["localhost"]), (b"\0" * 15 + b"\1", ["ip6-lo"])]),
        cf.isb(0, 1 << 40, ifrecv=30, ifdrop=1, osdrop=2),
        cf.isb(2, 5, ifdrop=0),
    ])
    be = b"".join([
        cf.shb(">"),
        cf.idb(">", name="be0", tsresol=6, tsoffset=-(2**40)),
        cf.idb(">", name="be1", tsresol=9),
        *(cf.epb(n % 2, 1_700_000_000_000_000 + n, b"BE" * (n + 1), order=">",
                 opts=[(2, struct.pack(">I", n))] if n % 2 else ()) for n in range(16)),
        cf.packet_block(0, 99, b"old", drops=4, order=">"),
        cf.nrb([(b"\x0a\0\0\x01", ["ten"])], order=">"),
        cf.isb(1, 1_700_000_000_000_000_100, ifdrop=5, order=">"),
    ])
    return {
        "gen-le.pcapng": le,
        "gen-sections.pcapng": le + be,
        "gen-be.pcap": cf.pcap_file(records, order=">", nano=True, linktype=113),
        "gen-le.pcap": cf.pcap_file(records, linktype=1, snaplen=262144),
    }


# --- where things are in a file ---------------------------------------------------------------


@dataclass
class Block:
    at: int
    type: int
    length: int
    order: str


@dataclass
class Layout:
    """The blocks (pcapng) or records (pcap: type -1) of an undamaged file, and its options."""

    blocks: list[Block]
    options: list[tuple[int, str]]  # (offset of an option header, byte order)
    pcap: bool


def layout(data: bytes) -> Layout:
    if data[:4] != b"\x0a\x0d\x0d\x0a":
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        records, at = [], 24
        while at + 16 <= len(data):
            incl = struct.unpack_from(order + "I", data, at + 8)[0]
            records.append(Block(at, -1, 16 + incl, order))
            at += 16 + incl
        return Layout(records, [], pcap=True)
    blocks, options, at, order = [], [], 0, "<"
    while at + 12 <= len(data):
        if data[at : at + 4] == b"\x0a\x0d\x0d\x0a":
            order = "<" if data[at + 8 : at + 12] == b"\x4d\x3c\x2b\x1a" else ">"
        block_type, length = struct.unpack_from(order + "II", data, at)
        block = Block(at, block_type, length, order)
        blocks.append(block)
        start = {0x0A0D0D0A: 24, 1: 16, 5: 20}.get(block_type)
        if block_type in (2, 6):
            caplen = struct.unpack_from(order + "I", data, at + 20)[0]
            start = 28 + ((caplen + 3) & -4)
        if start is not None:
            options += [(o, order) for o in _option_offsets(data, at + start,
                                                            at + length - 4, order)]
        at += length
    return Layout(blocks, options, pcap=False)


def _option_offsets(data: bytes, at: int, end: int, order: str) -> Iterator[int]:
    while at + 4 <= end:
        code, size = struct.unpack_from(order + "HH", data, at)
        yield at
        if code == 0:
            return
        at += 4 + size + (-size & 3)


# --- damage -----------------------------------------------------------------------------------


EXTREMES = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _put(data: bytearray, at: int, fmt: str, value: int) -> None:
    """Write `value` (cut to the field's width) at `at`, if the field is inside `data`."""
    size = struct.calcsize(fmt)
    if fmt[-1] in "HI":
        value &= (1 << 8 * size) - 1
    if at >= 0 and at + size <= len(data):
        struct.pack_into(fmt, data, at, value)


def _flip(rng: random.Random, data: bytearray, shape: Layout) -> str:
    spots = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
    for spot in spots:
        data[spot] = rng.randrange(256)
    return f"bytes at {spots} set at random"


def _block_length(rng: random.Random, data: bytearray, shape: Layout) -> str:
    block = rng.choice(shape.blocks)
    value = rng.choice([0, 4, 8, 12, 16, block.length + 4, block.length - 4, block.length + 1,
                        block.length * 2, 0xFFFFFFFC, rng.randrange(1 << 32)])
    if shape.pcap:
        _put(data, block.at + 8, block.order + "I", value % (1 << 32))
        return f"record at {block.at}: captured length {value}"
    where = rng.choice(["leading", "trailing", "both"])
    if where in ("leading", "both"):
        _put(data, block.at + 4, block.order + "I", value % (1 << 32))
    if where in ("trailing", "both"):
        _put(data, block.at + block.length - 4, block.order + "I", value % (1 << 32))
    return f"block at {block.at}: {where} length {value}"


def _option_length(rng: random.Random, data: bytearray, shape: Layout) -> str:
    if not shape.options:
        return _flip(rng, data, shape)
    at, order = rng.choice(shape.options)
    value = rng.choice([0, 1, 3, 4, 5, 8, 9, 255, 0xFFFF, rng.randrange(1 << 16)])
    if rng.random() < 0.3:
        code = rng.choice([0, 1, 2, 4, 5, 7, 9, 11, 14, 2988, 0x8001])
        _put(data, at, order + "H", code)
    _put(data, at + 2, order + "H", value)
    return f"option at {at}: length {value}"


def _packet_field(rng: random.Random, data: bytearray, shape: Layout) -> str:
    """A packet's captured length, interface id or timestamp."""
    packets = [b for b in shape.blocks if b.type in (-1, 2, 5, 6)]
    if not packets:
        return _flip(rng, data, shape)
    block = rng.choice(packets)
    if block.type == -1:  # pcap record: seconds, fraction, captured length, original length
        field = rng.randrange(4)
        value = rng.choice([*EXTREMES, 262_145, 16_777_184, rng.randrange(1 << 32)])
        _put(data, block.at + 4 * field, block.order + "I", value)
        return f"record at {block.at}: field {field} = {value}"
    kind = rng.choice(["interface", "timestamp", "caplen"])
    if kind == "interface":
        value = rng.choice([1, 2, 3, 5, 0xFFFF, 0xFFFFFFFF])
        _put(data, block.at + 8, block.order + ("H" if block.type == 2 else "I"), value)
    elif kind == "timestamp":
        value = rng.choice([0, (1 << 64) - 1, 1 << 63, (1 << 32) - 1])
        _put(data, block.at + 12, block.order + "I", value >> 32)
        _put(data, block.at + 16, block.order + "I", value & 0xFFFFFFFF)
    else:
        value = rng.choice([0, 1, block.length - 28, block.length, 262_145, 0xFFFFFFFF])
        _put(data, block.at + 20, block.order + "I", value)
    return f"block at {block.at}: {kind} = {value}"


def _interface_options(rng: random.Random, data: bytearray, shape: Layout) -> str:
    """if_tsoffset or if_tsresol of an interface to an extreme."""
    interfaces = [b for b in shape.blocks if b.type == 1]
    if not interfaces:
        return _packet_field(rng, data, shape)
    block = rng.choice(interfaces)
    options = [(at, order) for at, order in shape.options
               if block.at < at < block.at + block.length]
    for at, order in options:
        code, size = struct.unpack_from(order + "HH", data, at)
        if code == 14 and size == 8:
            value = rng.choice([-(1 << 63), (1 << 63) - 1, -(1 << 40), 1 << 40])
            _put(data, at + 4, order + "q", value)
            return f"if_tsoffset at {at} = {value}"
        if code == 9 and size == 1:
            value = rng.choice([0, 19, 20, 127, 0x80 | 63, 0xFF])
            data[at + 4] = value
            return f"if_tsresol at {at} = {value}"
    # no such option: make the interface's snaplen or link type extreme instead
    value = rng.choice([0, 1, 189, 231, 279, 0xFFFF])
    _put(data, block.at + 8, block.order + "H", value)
    return f"interface at {block.at}: link type {value}"


def _byte_order(rng: random.Random, data: bytearray, shape: Layout) -> str:
    if shape.pcap:
        data[0:4] = data[0:4][::-1]
        return "pcap magic in the other byte order"
    sections = [b for b in shape.blocks if b.type == 0x0A0D0D0A]
    block = rng.choice(sections)
    data[block.at + 8 : block.at + 12] = data[block.at + 8 : block.at + 12][::-1]
    return f"section at {block.at}: byte-order magic reversed"


def _blocks(rng: random.Random, data: bytearray, shape: Layout) -> str:
    block = rng.choice(shape.blocks[1:] or shape.blocks)
    piece = bytes(data[block.at : block.at + block.length])
    if rng.random() < 0.5:
        del data[block.at : block.at + block.length]
        return f"block at {block.at} removed"
    data[block.at : block.at] = piece * rng.randint(1, 3)
    return f"block at {block.at} repeated"


DAMAGE: list[Callable[[random.Random, bytearray, Layout], str]] = [
    _flip, _block_length, _option_length, _packet_field, _interface_options, _byte_order,
    _blocks,
]


def damage(rng: random.Random, base: bytes) -> tuple[bytes, list[str]]:
    data = bytearray(base)
    shape = layout(base)
    said = [rng.choice(DAMAGE)(rng, data, shape) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        cut = rng.randrange(len(data))
        del data[cut:]
        said.append(f"cut at {cut}")
    return bytes(data), said


# --- the checks -------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


def run(argv: list[str]) -> tuple[int, str]:
    """`multisniff ARGV` in this process, under TIME_LIMIT: (exit code, stdout)."""
    out = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue()


def packets_read(path: Path) -> tuple[int | None, str]:
    """(packets capinfos counts, its complaint): None when it cannot read the file to its end."""
    result = subprocess.run(["capinfos", "-M", "-c", str(path)], capture_output=True,
                            text=True, check=False)
    counts = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
              if line.startswith("Number of packets")]
    count = int(counts[0]) if counts else 0
    return (count if result.returncode == 0 else None), result.stderr.strip()


def check(path: Path, workdir: Path) -> str | None:
    """What is wrong with what multisniff does with `path`, or None."""
    try:
        code, printed = run(["inspect", str(path), "--json"])
        if code not in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.NOTHING):
            return f"inspect exited {code}"
        if code != ExitCode.NOTHING:
            json.loads(printed)
        ours = workdir / "ours.pcapng"
        ours.unlink(missing_ok=True)
        code, _ = run(["merge", str(path), "-o", str(ours)])
    except Hang:
        return f"a command took more than {TIME_LIMIT} s"
    except Exception as exc:  # what the user would have seen as a traceback
        return f"{type(exc).__name__}: {exc}"
    if code not in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.NOTHING):
        return f"merge exited {code}"
    # when Wireshark guesses another format, its packets are not comparable
    kept = _kept_by_mergecap(path, workdir) if _read_as_pcap_or_pcapng(path) else 0
    if code == ExitCode.NOTHING:
        return None if kept == 0 else f"merge wrote nothing, mergecap kept {kept} packets"
    written, complaint = packets_read(ours)
    if written is None:
        return f"capinfos cannot read the merged file to its end: {complaint}"
    if written < kept:
        return f"merge kept {written} packets, mergecap {kept}"
    return None


def _read_as_pcap_or_pcapng(path: Path) -> bool:
    result = subprocess.run(["captype", str(path)], capture_output=True, text=True,
                            check=False)
    return result.stdout.rsplit(":", 1)[-1].strip() in ("pcap", "nsecpcap", "pcapng")


def _kept_by_mergecap(path: Path, workdir: Path) -> int:
    theirs = workdir / "theirs.pcapng"
    theirs.unlink(missing_ok=True)
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(theirs), str(path)],
                   capture_output=True, check=False)
    return (packets_read(theirs)[0] or 0) if theirs.exists() else 0


def test_damaged_captures(bases: dict[str, bytes], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    keep = Path(os.environ.get("MULTISNIFF_FUZZ_FAILURES", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    names = sorted(bases)
    failures: list[str] = []
    for number in range(CASES):
        name = names[number % len(names)]
        data, said = damage(rng, bases[name])
        path = tmp_path / f"case{number}-{name}"
        path.write_bytes(data)
        problem = check(path, tmp_path)
        if problem is None:
            path.unlink()
        else:
            path = path.rename(keep / f"seed{SEED}-{path.name}")
            failures.append(f"{path} ({name}: {'; '.join(said)}): {problem}")
    assert not failures, (f"{len(failures)} of {CASES} cases failed (seed {SEED}):\n"
                          + "\n".join(failures[:20]))


def test_the_undamaged_bases_merge_as_mergecap_does(bases: dict[str, bytes],
                                                    tmp_path: Path) -> None:
    for name, data in bases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert check(path, tmp_path) is None, name


@pytest.mark.parametrize("name", sorted(damagedfiles.ALL))
def test_the_hand_made_damaged_files(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pcapng"
    path.write_bytes(damagedfiles.ALL[name]())
    assert check(path, tmp_path) is None
