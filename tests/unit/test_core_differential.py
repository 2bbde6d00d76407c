"""The compiled pcap core against the pure-Python one, its reference: fed the same bytes in the
same chunks, readers must hand out the same batches (merge keys, EPB bytes, interfaces,
statistics, names, copied blocks) and end in the same state (error with its offset, damage
recovered, counts); mergers over several such inputs, driven by the same calls, must write the
same bytes and keep the same counters, in exact and in live mode.

Inputs are random captures built here from the specifications (both formats and byte orders,
every block type, options, extreme timestamps, if_tsoffset and if_tsresol, several sections),
the fuzz bases and hand-made damaged files of damagedfiles, and either of those damaged by the
fuzz damage of damagedfiles (flipped bytes, block, option and captured lengths, byte order,
interface ids, timestamps at both extremes, if_tsoffset, if_tsresol, blocks removed or repeated,
truncation). Chunkings are random: the whole input, one byte at a time, small and large random
sizes, cuts next to block boundaries.

An exception out of either core is a failure as well (errors are results, never raised), and so
are a call that does not return (HANG_LIMIT) and a panic of the compiled core: pyo3 raises it as
PanicException, which derives from BaseException and would get past `except Exception`. A hang
of the pure-Python core fails too: it is a bug of the reference (this test found one in the
live merger's bound, now fixed and tested in test_pcap_merging).

MULTISNIFF_DIFF_CASES sets the number of cases (DEFAULT_CASES by default, `make fuzz-diff` runs
many more), MULTISNIFF_DIFF_SEED the seed, MULTISNIFF_DIFF_CASE=N runs case N alone. A failing
case is kept (in MULTISNIFF_DIFF_FAILURES, by default the test's temporary directory) as its
input files and a JSON file with the chunking, the settings and the first difference, all named
in the failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import capturefiles as cf
import damagedfiles as df
import pytest
from test_pcap_reading import sample_pcapng

from multisniff.pcap import core
from multisniff.pcap.blocks import InterfaceInfo, InterfaceStatistics
from multisniff.pcap.merging import TimelineMerger
from multisniff.pcap.reading import CaptureError, CaptureReader, unpack

DEFAULT_CASES = 150
CASES = int(os.environ.get("MULTISNIFF_DIFF_CASES", str(DEFAULT_CASES)))
SEED = int(os.environ.get("MULTISNIFF_DIFF_SEED", "12"))
ONLY = os.environ.get("MULTISNIFF_DIFF_CASE")
MAX_FAILURES = 10
"""Cases kept and told per test; the run stops there."""

CORES = (core.PYTHON, core.COMPILED)


@pytest.fixture(autouse=True)
def both_cores() -> None:
    try:
        with core.use(core.COMPILED):
            pass
    except core.CoreUnavailable as exc:
        if os.environ.get("MULTISNIFF_CORE", "").strip().lower() == core.COMPILED:
            pytest.fail(f"MULTISNIFF_CORE=compiled, but {exc}.", pytrace=False)
        pytest.skip(f"nothing to compare: {exc} (under MULTISNIFF_CORE=compiled this fails)")


def case_numbers(count: int) -> range:
    if ONLY is not None:
        return range(int(ONLY), int(ONLY) + 1)
    return range(count)


# --- running both cores in lockstep -----------------------------------------------------------


class Divergence(Exception):
    """The cores disagree (or one raised, or panicked) at `step`."""

    def __init__(self, step: str, difference: str) -> None:
        super().__init__(f"{step}: {difference}")
        self.step = step
        self.difference = difference


Outcome = tuple[str, Any]

HANG_LIMIT = 5.0
"""Seconds one call on one small input may take before it counts as a hang (they take
milliseconds)."""


class Hang(BaseException):
    """Raised by the alarm in a call that did not return within HANG_LIMIT."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


def outcome(name: str, call: Callable[[], Any]) -> Outcome:
    """Run `call` with core `name` active: ("ok", result), ("raised", what), ("hang", what) or
    ("panic", what). Results are made into plain values inside the call, so that nothing of one
    core is looked at while the other is active."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, HANG_LIMIT)
    try:
        with core.use(name):
            try:
                return "ok", call()
            except Exception as exc:
                return "raised", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
            except Hang:
                return "hang", f"did not return within {HANG_LIMIT:g} s"
            except BaseException as exc:
                if type(exc).__name__ == "PanicException":  # pyo3_runtime's, made at run time
                    return "panic", f"{type(exc).__qualname__}: {exc}"
                raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # the per-test timeout's alarm, less the time spent here
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started),
                                                     0.001))


class Lockstep:
    """One object made under each core (a reader, a merger) and the same calls made on both."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self.twins: dict[str, Any] = {}
        self.call("made", lambda twin: None, make=make)

    def call(self, step: str, action: Callable[[Any], Any],
             make: Callable[[str], Any] | None = None) -> Any:
        """`action(twin)` on both twins, under their cores; the result (plain values) if they
        agree, else Divergence."""
        results: dict[str, Outcome] = {}
        for name in CORES:
            if make is not None:
                made = outcome(name, lambda name=name: make(name))
                if made[0] != "ok":
                    results[name] = made
                    continue
                self.twins[name] = made[1]
            results[name] = outcome(name, lambda name=name: action(self.twins[name]))
            if results[name][0] == "hang":  # not worth another wait for the other core
                raise Divergence(step, f"the {name} core {results[name][1]}")
        py, compiled = results[core.PYTHON], results[core.COMPILED]
        if compiled[0] == "panic":
            raise Divergence(step, f"the compiled core panicked: {compiled[1]}")
        for name, result in results.items():
            if result[0] == "raised":
                raise Divergence(step, f"the {name} core raised {result[1]}")
            if result[0] == "hang":
                raise Divergence(step, f"the {name} core {result[1]}")
        if py != compiled:
            raise Divergence(step, difference(py[1], compiled[1]))
        return py[1]


def difference(py: Any, compiled: Any, path: str = "") -> str:
    """Where two plain values first differ, in words."""
    if isinstance(py, dict) and isinstance(compiled, dict):
        for key in [*py, *(key for key in compiled if key not in py)]:
            if py.get(key, _MISSING) != compiled.get(key, _MISSING):
                return difference(py.get(key, _MISSING), compiled.get(key, _MISSING),
                                  f"{path}.{key}" if path else str(key))
    if isinstance(py, list | tuple) and isinstance(compiled, list | tuple):
        if len(py) != len(compiled):
            return (f"{path or 'value'}: {len(py)} items (python) != {len(compiled)} "
                    f"(compiled); python {_short(py)}, compiled {_short(compiled)}")
        for index, (a, b) in enumerate(zip(py, compiled, strict=True)):
            if a != b:
                return difference(a, b, f"{path}[{index}]")
    if isinstance(py, bytes) and isinstance(compiled, bytes):
        at = next((i for i, (a, b) in enumerate(zip(py, compiled, strict=False)) if a != b),
                  min(len(py), len(compiled)))
        return (f"{path or 'bytes'}: {len(py)} bytes (python) and {len(compiled)} (compiled) "
                f"differ from byte {at}: python {py[at:at + 16].hex()}, compiled "
                f"{compiled[at:at + 16].hex()}")
    return f"{path or 'value'}: python {_short(py)}, compiled {_short(compiled)}"


_MISSING = "<missing>"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 400 else text[:400] + "..."


# --- what is compared -------------------------------------------------------------------------


def error_facts(error: CaptureError | None) -> tuple[object, ...] | None:
    if error is None:
        return None
    return (f"{type(error).__module__}.{type(error).__qualname__}", str(error), error.reason,
            error.offset, getattr(error, "expected", None), getattr(error, "got", None),
            getattr(error, "remedy", None))


def batch_facts(batch: Any) -> dict[str, object]:
    """Every field of a Batch; a packet as the bytes of its EPB, whatever pieces hold it (a
    merger's reader packs classic pcap records into its pieces: unpacked here, so that both
    cores must agree on what they stand for)."""
    if getattr(batch, "packed", 0):
        unpack(batch)
    return {
        "keys": list(batch.keys),
        "keys are ints": all(type(key) is int for key in batch.keys),
        "packets": [b"".join(packet) for packet in batch.packets],
        "flat": batch.flat,
        "pieces": b"".join(map(bytes, batch.pieces)),
        "ends": list(batch.ends),
        "interfaces": list(batch.interfaces),
        "statistics": list(batch.statistics),
        "names": list(batch.names),
        "blocks": [bytes(block) for block in batch.blocks],
    }


def reader_facts(reader: Any) -> dict[str, object]:
    return {
        "format": reader.format,
        "interfaces": list(reader.interfaces),
        "interface_ids": list(reader.interface_ids),
        "packets": reader.packets,
        "skipped_blocks": reader.skipped_blocks,
        "recovered": [error_facts(damage) for damage in reader.recovered],
        "recovered_count": reader.recovered_count,
        "error": error_facts(reader.error),
    }


def source_facts(source: Any) -> dict[str, object]:
    return {
        "label": source.label,
        "index": source.index,
        "received": source.received,
        "late": source.late,
        "ended": source.ended,
        "pending": source.pending,
        "error": error_facts(source.error),
        "interface_ids": list(source.interface_ids),
        "reader": reader_facts(source.reader),
    }


def merger_facts(merger: Any) -> dict[str, object]:
    return {
        "packets_written": merger.packets_written,
        "forced": merger.forced,
        "late_packets": merger.late_packets,
        "sources": [source_facts(source) for source in merger.sources],
    }


# --- inputs -----------------------------------------------------------------------------------


LINKTYPES = (1, 1, 1, 101, 113, 0, 231, 249, 279, 0xFFFF)
TSRESOLS = (None, None, 6, 9, 0, 3, 19, 127, 0x80 | 20, 0x80, 0x80 | 63, 0xFF)
TSOFFSETS = (None, None, 0, -10, 10, 1_700_000_000, 10**13, -(2**40), -(2**63), 2**63 - 1)
EPB_OPTIONS = ((1, b"a comment"), (2, struct.pack("<I", 1)), (2, b"\7\0"), (3, b"\x02abcd"),
               (4, struct.pack("<Q", 3)), (4, bytes(4)), (5, struct.pack("<Q", 77)),
               (7, b"\x01" + bytes(8)), (7, b""), (2988, b"\0\0\x7f\x00data"), (2988, b"\0"),
               (0x8001, b"unknown"))


def _timestamp(rng: random.Random, base: int) -> int:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([0, 1, (1 << 32) - 1, 1 << 32, (1 << 63), (1 << 64) - 1])
    if roll < 0.12:
        return max(base - rng.randrange(1 << 20), 0)  # backwards
    return base + rng.randrange(1 << rng.choice([4, 12, 24]))


def random_pcap(rng: random.Random) -> bytes:
    order = rng.choice("<>")
    nano = rng.random() < 0.5
    units = 10**9 if nano else 10**6
    linktype = rng.choice([*LINKTYPES, 1 | 0x04000000 | (2 << 28)])
    snaplen = rng.choice([0, 64, 65535, 262144, 0xFFFFFFFF])
    second = rng.choice([0, 1_700_000_000, (1 << 32) - 5, rng.randrange(1 << 32)])
    records = []
    for _ in range(rng.randrange(40)):
        second = min(second + rng.choice([0, 0, 1, 2]), (1 << 32) - 1)
        fraction = rng.randrange(units) if rng.random() < 0.95 else rng.randrange(1 << 32)
        size = rng.choice([0, 1, 3, 14, 60, rng.randrange(300), rng.randrange(2000)])
        original = rng.choice([size, size + rng.randrange(1 << 16), rng.randrange(1 << 32)])
        records.append((second, fraction, rng.randbytes(size), original))
    if rng.random() < 0.05:  # a packet as long as the link type allows, or one byte more
        size = 262_144 + rng.choice([0, 1])
        records.append((second, 0, bytes(size), size))
    return cf.pcap_file(records, order=order, nano=nano, linktype=linktype, snaplen=snaplen)


def random_pcapng(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        order = rng.choice("<>")
        parts.append(cf.shb(order, [(2, b"hw"), (4, b"random")] if rng.random() < 0.3 else []))
        interfaces = rng.choice([0, 1, 1, 2, 3])
        for number in range(interfaces):
            extra = []
            if rng.random() < 0.3:
                extra = rng.sample([(3, b"description"), (11, b"\0port 53"), (11, b""),
                                    (8, struct.pack(order + "Q", 10**9)), (13, b"\4"),
                                    (12, b"Linux"), (15, b"nic"), (2989, b"\1"),
                                    (0x8001, b"?")], rng.randint(1, 3))
            parts.append(cf.idb(order, linktype=rng.choice(LINKTYPES),
                                snaplen=rng.choice([0, 0, 60, 65535]),
                                name=rng.choice([None, f"if{number}", "eth0", "é\0x"]),
                                tsresol=rng.choice(TSRESOLS), tsoffset=rng.choice(TSOFFSETS),
                                extra=extra))
        base = rng.choice([0, 1 << 40, 1_700_000_000_000_000, 1_700_000_000_000_000_000])
        for _ in range(rng.randrange(30)):
            base = _timestamp(rng, base)
            ts = base & ((1 << 64) - 1)
            interface = rng.randrange(interfaces) if interfaces and rng.random() < 0.95 else (
                rng.choice([interfaces, 7]))
            data = rng.randbytes(rng.choice([0, 1, 5, 60, rng.randrange(400)]))
            kind = rng.random()
            if kind < 0.7:
                options = rng.sample(EPB_OPTIONS, rng.choice([0, 0, 0, 1, 2, 4]))
                if order == ">":
                    options = [(code, value) for code, value in options if code in (1, 0x8001)]
                parts.append(cf.epb(interface, ts, data, order=order, opts=options,
                                    orig=rng.choice([None, len(data) + 100, 0])))
            elif kind < 0.76:
                parts.append(cf.spb(data, order=order, orig=rng.choice([None, 3, 10**6])))
            elif kind < 0.82:
                parts.append(cf.packet_block(interface, ts, data, order=order,
                                             drops=rng.choice([0xFFFF, 0, 9])))
            elif kind < 0.88:
                parts.append(cf.isb(interface, ts, order=order,
                                    ifrecv=rng.choice([None, 10]), ifdrop=rng.choice([None, 2]),
                                    osdrop=rng.choice([None, 0])))
            elif kind < 0.92:
                parts.append(cf.nrb([(b"\x7f\0\0\x01", ["localhost", "lo"]),
                                     (b"\0" * 15 + b"\1", ["ip6-lo"])], order=order))
            else:
                block_type = rng.choice([0x0000000A, 0x00000009, 0x00000BAD, 0x40000BAD,
                                         0x00001234])
                body = {0x0000000A: struct.pack(order + "II", 0x544C534B, 8) + b"SECRETS!",
                        0x00000009: b"__REALTIME_TIMESTAMP=1700000000000000\nMESSAGE=hi\n"
                        }.get(block_type, b"\0\0\x7f\x00custom")
                parts.append(cf.block(block_type, body, order))
    return b"".join(parts)


def random_bytes(rng: random.Random) -> bytes:
    """Noise, mostly behind a valid start so that the parsers get past the magic."""
    start = rng.choice([b"", cf.shb(), cf.shb(">"), cf.shb() + cf.idb(), cf.pcap_file([]),
                        cf.pcap_file([], order=">", nano=True), b"\xa1\xb2\xc3"])
    return start + rng.randbytes(rng.randrange(200))


def bases() -> dict[str, Callable[[], bytes]]:
    """The fixed inputs: fuzz bases, hand-made damaged files, the reading tests' sample."""
    fixed: dict[str, Callable[[], bytes]] = {
        name: (lambda data=data: data) for name, data in df.generated().items()}
    fixed.update({name: build for name, build in df.ALL.items() if name != "packet-of-16-mib"})
    fixed["sample"] = sample_pcapng
    return fixed


BASES = bases()


def some_input(rng: random.Random) -> tuple[bytes, list[str]]:
    """An input and what it is, in words."""
    roll = rng.random()
    if roll < 0.3:
        name = rng.choice(sorted(BASES))
        data, what = BASES[name](), [name]
    elif roll < 0.55:
        data, what = random_pcap(rng), ["random pcap"]
    elif roll < 0.93:
        data, what = random_pcapng(rng), ["random pcapng"]
    else:
        return random_bytes(rng), ["random bytes"]
    if data and rng.random() < 0.6:
        data, said = df.damage(rng, data)
        what += said
    return data, what


def block_starts(data: bytes) -> Iterator[int]:
    """Where the blocks (or records) of a possibly damaged capture start, as far as their
    lengths can be followed."""
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        at, order = 0, "<"
        while at + 12 <= len(data):
            yield at
            if data[at : at + 4] == b"\x0a\x0d\x0d\x0a":
                order = "<" if data[at + 8 : at + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            length = struct.unpack_from(order + "I", data, at + 4)[0]
            if length < 12:
                return
            at += length
    else:
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        at = 24
        while at + 16 <= len(data):
            yield at
            at += 16 + struct.unpack_from(order + "I", data, at + 8)[0]


def chunking(rng: random.Random, data: bytes) -> list[int]:
    """Chunk sizes that add up to len(data) (zero included)."""
    kind = rng.choice(["whole", "bytes", "small", "small", "large", "boundaries"])
    if kind == "whole" or not data:
        return [len(data)]
    if kind == "bytes" and len(data) <= 4096:
        return [1] * len(data)
    if kind == "boundaries":
        starts = list(block_starts(data))
        cuts = sorted({min(max(at + rng.randint(-9, 9), 0), len(data)) for at in starts})
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        return sizes
    most = 37 if kind == "small" else len(data)
    if len(data) // max(most // 2, 1) > 20_000:
        most = len(data) // 1000
    sizes, left = [], len(data)
    while left:
        size = min(rng.randint(0, most), left)
        sizes.append(size)
        left -= size
    return sizes


# --- keeping failures -------------------------------------------------------------------------


@dataclasses.dataclass
class Failures:
    directory: Path
    told: list[str] = dataclasses.field(default_factory=list)

    def keep(self, test: str, number: int, inputs: list[bytes], facts: dict[str, object],
             divergence: Divergence, *, selector: str) -> None:
        stem = self.directory / f"{test}-seed{SEED}-case{number}"
        paths = []
        for index, data in enumerate(inputs):
            path = stem.with_name(f"{stem.name}-input{index}.cap")
            path.write_bytes(data)
            paths.append(str(path))
        record = {"seed": SEED, "case": number, "step": divergence.step,
                  "difference": divergence.difference, "inputs": paths, **facts,
                  "replay": f"MULTISNIFF_DIFF_SEED={SEED} MULTISNIFF_DIFF_CASE={number} "
                            f"pytest tests/unit/test_core_differential.py -k '{selector}'"}
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(record, indent=1, default=repr))
        self.told.append(f"case {number} ({path}, inputs {', '.join(paths)}): {divergence}")

    def check(self, cases: int) -> None:
        told = "\n".join(self.told)
        assert not self.told, (f"{len(self.told)} of {cases} cases differ between the cores "
                               f"(seed {SEED}):\n{told}")

    @property
    def full(self) -> bool:
        return len(self.told) >= MAX_FAILURES


@pytest.fixture
def failures(tmp_path: Path) -> Failures:
    directory = Path(os.environ.get("MULTISNIFF_DIFF_FAILURES", tmp_path))
    directory.mkdir(parents=True, exist_ok=True)
    return Failures(directory)


# --- readers ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSettings:
    key_resolution: int = 1_000_000_000
    max_block_size: int | None = None
    max_packet_size: int | None = None
    assign: str = "default"
    """"default", or "spaced": ids 5, 8, 11, ... handed out by a callback that records calls."""
    mode: str = "feed"
    """"feed", "flat" or "mixed" (each chunk by either, as a coin says)."""
    records: bool = False
    """A merger's reader (`CaptureReader(records=True)`)."""


def random_reader_settings(rng: random.Random) -> ReaderSettings:
    return ReaderSettings(
        key_resolution=rng.choice([10**9, 10**9, 10**6, 1, 1000, 3, 1 << 20, 10**12]),
        max_block_size=None if rng.random() < 0.9 else rng.choice([64, 1024]),
        max_packet_size=None if rng.random() < 0.85 else rng.choice([0, 10, 1500]),
        assign=rng.choice(["default", "spaced"]),
        mode=rng.choice(["feed", "flat", "mixed"]),
        records=rng.random() < 0.5,
    )


def make_reader(settings: ReaderSettings) -> tuple[CaptureReader, list[InterfaceInfo]]:
    calls: list[InterfaceInfo] = []

    def spaced(info: InterfaceInfo) -> int:
        calls.append(info)
        return 5 + 3 * (len(calls) - 1)

    limits: dict[str, Any] = {}
    if settings.max_block_size is not None:
        limits["max_block_size"] = settings.max_block_size
    reader = CaptureReader(key_resolution=settings.key_resolution,
                           assign_interface=spaced if settings.assign == "spaced" else None,
                           max_packet_size=settings.max_packet_size,
                           records=settings.records, **limits)
    return reader, calls


def compare_readers(data: bytes, chunks: list[int], settings: ReaderSettings,
                    flat_coins: list[bool]) -> None:
    """Feed both readers; Divergence at the first difference."""
    twins = Lockstep(lambda name: make_reader(settings))
    at = 0
    for number, (size, coin) in enumerate(zip(chunks, flat_coins, strict=True)):
        chunk = data[at : at + size]
        flat = settings.mode == "flat" or (settings.mode == "mixed" and coin)

        def feed(twin: tuple[CaptureReader, list[InterfaceInfo]],
                 chunk: bytes = chunk, flat: bool = flat) -> dict[str, object]:
            reader, calls = twin
            batch = reader.feed_flat(chunk) if flat else reader.feed(chunk)
            return {"batch": batch_facts(batch), "reader": reader_facts(reader),
                    "assigned": list(calls)}

        twins.call(f"feed {number} ({'flat, ' if flat else ''}{size} bytes at {at})", feed)
        at += size

    def finish(twin: tuple[CaptureReader, list[InterfaceInfo]]) -> dict[str, object]:
        reader, _ = twin
        return {"finish": error_facts(reader.finish()), "again": error_facts(reader.finish()),
                "reader": reader_facts(reader)}

    twins.call("finish", finish)


def test_readers_agree_on_random_and_damaged_inputs(failures: Failures) -> None:
    numbers = case_numbers(CASES)
    for number in numbers:
        rng = random.Random(f"reader:{SEED}:{number}")
        data, what = some_input(rng)
        chunks = chunking(rng, data)
        settings = random_reader_settings(rng)
        coins = [rng.random() < 0.5 for _ in chunks]
        try:
            compare_readers(data, chunks, settings, coins)
        except Divergence as divergence:
            failures.keep("readers", number, [data], {
                "input": what, "chunks": chunks, "settings": dataclasses.asdict(settings),
                "flat coins": coins}, divergence, selector="readers_agree_on_random")
            if failures.full:
                break
    failures.check(len(numbers))


def test_readers_agree_on_the_large_hand_made_files(failures: Failures) -> None:
    """The 16 MiB packet, which the random cases leave out: in a few large chunkings."""
    data = df.packet_of_16_mib()
    for number, chunks in enumerate([[len(data)], [1 << 20] * 16 + [len(data) - (16 << 20)],
                                     [df.OPTION_BLOCK_AT + 100, len(data)]]):
        chunks = [*chunks[:-1], len(data) - sum(chunks[:-1])]
        try:
            compare_readers(data, chunks, ReaderSettings(mode="flat" if number else "feed"),
                            [False] * len(chunks))
        except Divergence as divergence:
            failures.keep("large", number, [data], {"chunks": chunks}, divergence,
                          selector="large")
    failures.check(3)


# --- mergers ----------------------------------------------------------------------------------


def merger_inputs(rng: random.Random) -> tuple[list[bytes], list[str]]:
    """Two to five sources, most of them sound, on overlapping timelines."""
    inputs, said = [], []
    for _ in range(rng.randint(2, 5)):
        if rng.random() < 0.6:
            data = random_pcap(rng) if rng.random() < 0.4 else random_pcapng(rng)
            what = ["random"]
            if rng.random() < 0.4:
                data, damage = df.damage(rng, data) if data else (data, [])
                what += damage
        else:
            data, what = some_input(rng)
        inputs.append(data)
        said.append("; ".join(what))
    return inputs, said


def pulled(merger: TimelineMerger, blocks: bool) -> dict[str, object]:
    out = b"".join(merger.pull_blocks()) if blocks else merger.pull()
    return {"out": out, "merger": merger_facts(merger)}


def compare_exact_mergers(rng: random.Random, inputs: list[bytes]) -> None:
    """As `multisniff merge` drives the merger: a chunk of every source, then of the source
    the merger wants, pulling in between."""
    resolution = rng.choice([10**9, 10**6, 1])
    multi = [rng.random() < 0.3 for _ in inputs]
    labels = [rng.choice(["a", "b", "web", "web"]) for _ in inputs]

    def make(name: str) -> TimelineMerger:
        merger = TimelineMerger(key_resolution=resolution)
        for label, many in zip(labels, multi, strict=True):
            merger.add_source(label, multi_interface=many)
        return merger

    twins = Lockstep(make)
    offsets = [0] * len(inputs)
    steps = 0

    def step(index: int) -> None:
        nonlocal steps
        size = rng.choice([1, 7, 64, 500, 4096, 1 << 20])
        data = inputs[index][offsets[index] : offsets[index] + size]
        offsets[index] += len(data)
        steps += 1
        if data:
            twins.call(f"step {steps}: feed source {index} {len(data)} bytes",
                       lambda merger: merger.feed(merger.sources[index], data))
        else:
            twins.call(f"step {steps}: end source {index}",
                       lambda merger: error_facts(merger.end_source(merger.sources[index])))

    for index in range(len(inputs)):
        step(index)
    while True:
        blocks = rng.random() < 0.5
        twins.call(f"step {steps}: pull", lambda merger, blocks=blocks: pulled(merger, blocks))
        wanted = twins.call(f"step {steps}: wanted", lambda merger: (
            None if merger.wanted() is None else merger.wanted().index))
        if wanted is None:
            break
        step(wanted)
    twins.call("finish", lambda merger: {"out": merger.finish(), "merger": merger_facts(merger)})


def keys_of(inputs: list[bytes], resolution: int) -> list[int]:
    """The merge keys of the inputs' packets (by the reference core): times near them make
    the clock and the caught-up marks of the live tests release packets, not everything or
    nothing."""
    keys: list[int] = []
    with core.use(core.PYTHON):
        for data in inputs:
            keys += CaptureReader(key_resolution=resolution).feed(data).keys
    return keys


def compare_live_mergers(rng: random.Random, inputs: list[bytes]) -> None:
    """As the capture engine drives it: sources come and go, bytes arrive in any order, the
    clock advances, sources are marked caught up, statistics are added, output is pulled."""
    window = rng.choice([0, 1, 10**6, 10**9, 10**12, 1 << 64])
    resolution = rng.choice([10**9, 10**9, 10**6, 1])
    most = rng.choice([1, 5, 50, 200_000])
    twins = Lockstep(lambda name: TimelineMerger(reorder_window=window,
                                                 key_resolution=resolution, max_pending=most))
    offsets = [0] * len(inputs)
    added: list[int] = []  # input index of each source, in the order added
    times = [0, 1, 1 << 62, (1 << 64) - 1, *keys_of(inputs, resolution)]
    for number in range(rng.randint(5, 80)):
        waiting = [i for i in range(len(inputs)) if i not in added]
        roll = rng.random()
        if waiting and (not added or roll < 0.15):
            index = rng.choice(waiting)
            label = rng.choice(["pod-a", "pod-b", "events", "pod-a"])
            twins.call(f"op {number}: add source for input {index}",
                       lambda merger, label=label: merger.add_source(label) and None)
            added.append(index)
            continue
        slot = rng.randrange(len(added))
        index = added[slot]
        if roll < 0.55:
            size = rng.choice([1, 16, 200, 4096, 1 << 20])
            data = inputs[index][offsets[index] : offsets[index] + size]
            offsets[index] += len(data)
            twins.call(f"op {number}: feed input {index} {len(data)} bytes",
                       lambda merger, s=slot, d=data: merger.feed(merger.sources[s], d))
        elif roll < 0.7:
            blocks = rng.random() < 0.5
            twins.call(f"op {number}: pull", lambda merger, b=blocks: pulled(merger, b))
        elif roll < 0.78:
            now = rng.choice(times) + rng.randrange(1 << rng.choice([0, 20, 40]))
            twins.call(f"op {number}: advance to {now}", lambda merger, n=now: merger.advance(n))
            times.append(now)
        elif roll < 0.86:
            key = rng.choice(times) + rng.randrange(1 << 30)
            twins.call(f"op {number}: source {slot} caught up to {key}",
                       lambda merger, s=slot, k=key: merger.mark_caught_up(merger.sources[s], k))
        elif roll < 0.92:
            stats = InterfaceStatistics(interface_id=0, timestamp=rng.randrange(1 << 64),
                                        ifrecv=rng.randrange(1000), ifdrop=rng.randrange(10))
            twins.call(f"op {number}: statistics for source {slot}",
                       lambda merger, s=slot, st=stats: (
                           merger.add_statistics(merger.sources[s], 0, st)
                           if merger.sources[s].interface_ids else None))
        else:
            twins.call(f"op {number}: end source {slot}",
                       lambda merger, s=slot: error_facts(merger.end_source(merger.sources[s])))
        twins.call(f"op {number}: facts", merger_facts)
    twins.call("finish", lambda merger: {"out": merger.finish(), "merger": merger_facts(merger)})


@pytest.mark.parametrize("mode", ["exact", "live"])
def test_mergers_agree_on_random_and_damaged_sources(mode: str, failures: Failures) -> None:
    cases = max(CASES // 3, 1)
    compare = compare_exact_mergers if mode == "exact" else compare_live_mergers
    numbers = case_numbers(cases)
    for number in numbers:
        rng = random.Random(f"merger-{mode}:{SEED}:{number}")
        inputs, said = merger_inputs(rng)
        try:
            compare(rng, inputs)
        except Divergence as divergence:
            failures.keep(f"merger-{mode}", number, inputs, {"inputs said": said}, divergence,
                          selector=f"mergers and {mode}")
            if failures.full:
                break
    failures.check(len(numbers))


# --- the comparison itself --------------------------------------------------------------------


class PanicException(BaseException):
    """What pyo3 raises for a panic: a BaseException, in a module made at run time."""


def test_the_harness_tells_a_difference_an_exception_a_panic_and_a_hang(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lockstep over a stand-in whose compiled twin misbehaves in each way in turn: each is
    told apart from agreement, with the step and what differs."""
    monkeypatch.setattr(sys.modules[__name__], "HANG_LIMIT", 0.2)
    twins = Lockstep(lambda name: name)
    assert twins.call("same", lambda twin: {"a": [1, b"xy"]}) == {"a": [1, b"xy"]}

    def differs(twin: str) -> object:
        return {"a": [1, b"xy" if twin == core.PYTHON else b"xz"]}

    def raises(twin: str) -> object:
        if twin == core.COMPILED:
            raise ValueError("bad")
        return None

    def panics(twin: str) -> object:
        if twin == core.COMPILED:
            raise PanicException("index out of bounds: the len is 3 but the index is 7")
        return None

    def hangs(twin: str) -> object:
        while twin == core.COMPILED:
            pass
        return None

    expected = {
        differs: ("a[1]: 2 bytes (python) and 2 (compiled) differ from byte 1: python 79, "
                  "compiled 7a"),
        raises: "the compiled core raised builtins.ValueError: bad",
        panics: "the compiled core panicked: PanicException: index out of bounds",
        hangs: "the compiled core did not return within 0.2 s",
    }
    for action, said in expected.items():
        with pytest.raises(Divergence) as caught:
            twins.call(f"calling {action.__name__}", action)
        assert caught.value.step == f"calling {action.__name__}"
        assert caught.value.difference.startswith(said), caught.value.difference
