"""`multisniff merge` and `multisniff inspect`: the IO edge around the sans-IO pcap core.

Both work on capture files only and import nothing of the cluster side, so that they start fast
and run where no Kubernetes client is installed. Files are read in 256 KiB chunks (with the
compiled core by its read-ahead thread, else with plain `os.read`) and the merge is written with
`os.writev`, the output file created with mode 0600 because captures hold secrets.

Damaged inputs lose no more than with mergecap: every complete packet before damage that ends
the file is used, a damaged block whose length fields hold is left out (or only its damaged
options are) and reading goes on, one sentence per damage names the file and the byte offset,
and the exit code is PARTIAL.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import stat
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from multisniff.errors import ExitCode, InputError, OutputError, UsageError
from multisniff.pcap import blocks as b
from multisniff.pcap import core
from multisniff.pcap.blocks import InterfaceInfo, InterfaceStatistics, format_timestamp
from multisniff.pcap.merging import TimelineMerger
from multisniff.pcap.reading import (
    CaptureError,
    CaptureReader,
    NotACaptureError,
    RecoveredDamage,
    TruncatedCaptureError,
    packet_fields,
)
from multisniff.pcap.writing import Block

log = logging.getLogger("multisniff")

CHUNK = 256 * 1024
"""Bytes per read: large enough that per-call costs vanish, small enough to keep memory flat."""

COMPILED_CHUNK = 192 * 1024
"""CHUNK with the compiled core, whose merge holds about n + 4 chunks for n inputs (one queued
per input, two read ahead, the one being fed, the output of a step): on 8 x 250,000 packets 128
KiB made it 25% slower, 256 KiB added 1 MiB of peak RSS for 3% of speed (README, Performance).
The pure-Python merge's cost per chunk is higher: 192 KiB made it 3% slower."""

MAX_KEY_RESOLUTION = 10**12
"""Merge keys finer than this (mixing binary and decimal resolutions) are floored to ns."""

LINKTYPE_NAMES = {0: "NULL", 1: "ETHERNET", 101: "RAW", 105: "IEEE802_11", 113: "LINUX_SLL",
                  127: "IEEE802_11_RADIOTAP", 228: "IPV4", 229: "IPV6", 276: "LINUX_SLL2"}


# --- opening files ----------------------------------------------------------------------------


def _open_error(path: str, exc: OSError) -> InputError:
    if exc.errno == errno.ENOENT:
        return InputError(f"Cannot open {path}: there is no such file; check the path.")
    if exc.errno == errno.EACCES:
        return InputError(f"Cannot open {path}: permission denied; make it readable or run "
                          "as a user who may read it.")
    if exc.errno == errno.EISDIR:
        return InputError(f"Cannot read {path}: it is a directory; give capture files.")
    reason = (exc.strerror or str(exc)).lower()
    return InputError(f"Cannot read {path}: {reason}; check the file and try again.")


def open_input(path: str) -> int:
    """A file descriptor for reading `path`, or an InputError that says what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"Cannot read {path}: it is a directory; give capture files.")
    return fd


def read_chunks(fd: int, path: str) -> Iterator[bytes]:
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError as exc:
            raise _open_error(path, exc) from exc
        if not data:
            return
        yield data


class _Inputs:
    """The inputs' chunks: `take(i)` is the next chunk of input i, b"" at its end. With the
    compiled core, `want(i)` has a thread of its own (`_core.ReadAhead`) read input i's next
    chunk meanwhile, so that reading, a third of a merge's time, happens on a second core;
    without it, chunks are read with os.read when they are taken."""

    def __init__(self, fds: Sequence[int], paths: Sequence[str]) -> None:
        self.paths = paths
        compiled = core.compiled()
        self.chunk = CHUNK if compiled is None else COMPILED_CHUNK
        self._ahead = None if compiled is None else compiled.ReadAhead(list(fds), self.chunk)
        self._chunks = [] if self._ahead is not None else [
            read_chunks(fd, path) for fd, path in zip(fds, paths, strict=True)]

    def want(self, i: int) -> None:
        if self._ahead is not None:
            self._ahead.want(i)

    def take(self, i: int) -> bytes:
        if self._ahead is None:
            return next(self._chunks[i], b"")
        try:
            data: bytes = self._ahead.take(i)
        except OSError as exc:
            raise _open_error(self.paths[i], exc) from exc
        return data

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()


def write_all(fd: int, data: Block, target: str) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _write_error(target, exc) from exc
        view = view[written:]


def _write_error(target: str, exc: OSError) -> OutputError:
    reason = (exc.strerror or str(exc)).lower()
    return OutputError(f"Cannot write {target}: {reason}; free space or choose another output "
                       "with -o.")


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def write_blocks(fd: int, blocks: list[Block], target: str) -> None:
    """Write blocks with vectored writes: no joined copy of them in between."""
    start = 0
    while start < len(blocks):
        group = blocks[start : start + IOV_MAX]
        try:
            written = os.writev(fd, group)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _write_error(target, exc) from exc
        if written == sum(map(len, group)):
            start += len(group)
            continue
        for block in group:  # a short write: go on from inside the block it stopped in
            if written < len(block):
                write_all(fd, block[written:], target)
                start += 1
                break
            written -= len(block)
            start += 1


# --- a quick look at each input before merging ------------------------------------------------


@dataclass
class Census:
    """What a merge needs to know about an input before its packets: its format, how many
    interfaces it declares and their timestamp resolutions."""

    format: str
    interfaces: int = 0
    units: set[int] = field(default_factory=set)


_MAGIC = struct.Struct("<I")


def take_census(path: str, fd: int) -> Census:
    """Read the start of the file (and, for pcapng, every block header) without parsing packets.

    Raises InputError for a file that is not a capture at all; damage further in is left for the
    merge itself to report.
    """
    first = os.pread(fd, 24, 0)
    if not first:
        raise InputError(f"{path} is empty, not a capture file; give pcap or pcapng files.")
    probe = CaptureReader()
    probe.feed(first)
    if isinstance(probe.error, NotACaptureError) or (len(first) < 4):
        reason = probe.error.reason if probe.error is not None else "it is too short"
        raise InputError(f"{path} is not a capture file ({reason}); give pcap or pcapng files.")
    if probe.format == "pcap":
        units = {probe.interfaces[0].units_per_second} if probe.interfaces else {1_000_000}
        return Census(format="pcap", interfaces=1, units=units)
    return _pcapng_census(fd)


def _pcapng_census(fd: int) -> Census:
    census = Census(format="pcapng")
    order = "<"
    pos = 0
    buf = b""
    buf_start = 0
    compiled = core.compiled()
    walk = compiled.pcapng_census_walk if compiled is not None else None
    while True:
        if pos + 12 > buf_start + len(buf):
            buf = os.pread(fd, CHUNK, pos)
            buf_start = pos
            if len(buf) < 12:
                return census
        if walk is not None:  # the same walk, compiled: a Python loop per block was most of it
            stop, little, bad, idbs = walk(buf, pos - buf_start, order == "<")
            for at, idb_little in idbs:
                _count_idb(census, fd, buf, buf_start, at, "<" if idb_little else ">")
            order = "<" if little else ">"
            pos = buf_start + stop
            if bad:
                return census
            continue
        at = pos - buf_start
        if _MAGIC.unpack_from(buf, at)[0] == b.SHB:
            magic = _MAGIC.unpack_from(buf, at + 8)[0]
            order = ">" if magic == 0x4D3C2B1A else "<"
        block_type, length = struct.unpack_from(order + "II", buf, at)
        if length < 12 or length & 3:
            return census
        if block_type == b.IDB:
            _count_idb(census, fd, buf, buf_start, at, order)
        pos += length


def _count_idb(census: Census, fd: int, buf: bytes, buf_start: int, at: int, order: str) -> None:
    length = struct.unpack_from(order + "I", buf, at + 4)[0]
    census.interfaces += 1
    census.units.add(_idb_units(os.pread(fd, min(length, 1 << 16), buf_start + at), order))


def _idb_units(block: bytes, order: str) -> int:
    at = 16
    header = struct.Struct(order + "HH")
    while at + 4 <= len(block) - 4:
        code, size = header.unpack_from(block, at)
        if code == b.OPT_ENDOFOPT:
            break
        if code == b.IF_TSRESOL and size >= 1:
            return b.units_per_second(block[at + 4])
        at += 4 + size + (-size & 3)
    return b.units_per_second(b.DEFAULT_TSRESOL)


def key_resolution(censuses: Sequence[Census]) -> int:
    """The finest resolution that orders every input exactly: usually the one they share."""
    units = set().union(*(census.units for census in censuses)) or {1_000_000}
    resolution = math.lcm(*units)
    return resolution if resolution <= MAX_KEY_RESOLUTION else 1_000_000_000


# --- merge ------------------------------------------------------------------------------------


def _labels(inputs: Sequence[str], names: Sequence[str]) -> list[str]:
    labels = [Path(path).stem or Path(path).name for path in inputs]
    for item in names:
        target, sep, label = item.partition("=")
        if not sep or not target or not label:
            raise UsageError(f"--name {item} is not FILE=LABEL; write e.g. --name "
                             f"{inputs[0]}=web.")
        matches = [i for i, path in enumerate(inputs)
                   if path == target or os.path.abspath(path) == os.path.abspath(target)]
        if not matches:
            raise UsageError(f"--name {item} names {target}, which is not one of the inputs; "
                             "use the path exactly as given.")
        for index in matches:
            labels[index] = label
    return labels


def _damage_sentence(path: str, error: CaptureError, packets: int, *,
                     done: tuple[str, str] = ("was used", "were used")) -> str:
    if packets == 1:
        before = f"the 1 packet before it {done[0]}"
    else:
        before = f"the {packets} packets before it {done[1]}"
    if isinstance(error, TruncatedCaptureError):
        return f"{path} is cut off at byte {error.offset} ({error.reason}); {before}."
    if isinstance(error, NotACaptureError):
        return f"{path} is not a capture file ({error.reason}); it was left out."
    return f"{path} is damaged at byte {error.offset} ({error.reason}); {before}."


def _recovered_sentences(path: str, reader: CaptureReader) -> list[str]:
    """One sentence per damaged block that reading went past (the first few), then a count."""
    sentences = [_recovered_sentence(path, damage) for damage in reader.recovered]
    more = reader.recovered_count - len(reader.recovered)
    if more:
        blocks = f"{more} more damaged block{'s' if more != 1 else ''}"
        sentences.append(f"{path} has {blocks} that reading went past in the same way; they "
                         "are not listed.")
    return sentences


def _recovered_sentence(path: str, damage: RecoveredDamage) -> str:
    return (f"{path} is damaged at byte {damage.offset} ({damage.reason}); {damage.remedy}, "
            "and reading went on.")


def _open_output(target: str, inputs: Sequence[str]) -> tuple[int, bool]:
    if target == "-":
        if os.isatty(1):
            raise UsageError("Refusing to write binary pcapng to a terminal; redirect stdout "
                             "or give a file with -o.")
        return 1, False
    for path in inputs:
        try:
            if os.path.samefile(path, target):
                raise UsageError(f"The output {target} is also an input; choose another "
                                 "output file.")
        except FileNotFoundError:
            pass
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise OutputError(f"Cannot create {target}: {reason}; check the directory and its "
                          "permissions.") from exc
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it
    except OSError:
        pass
    return fd, True


def run_merge(args: argparse.Namespace) -> int:
    inputs: list[str] = args.inputs
    target: str | None = args.output
    if not target:
        raise UsageError("merge needs an output: add -o FILE (or -o - for stdout).")
    labels = _labels(inputs, args.name or [])
    fds: list[int] = []
    try:
        censuses = []
        for path in inputs:
            fds.append(open_input(path))
            censuses.append(take_census(path, fds[-1]))
        out_fd, close_out = _open_output(target, inputs)
        try:
            problems = _merge_files(inputs, labels, fds, censuses, out_fd, target)
        finally:
            if close_out:
                os.close(out_fd)
    finally:
        for fd in fds:
            os.close(fd)
    warnings, errors = problems
    for sentence in warnings:
        log.warning("%s", sentence)
    for sentence in errors:
        log.error("%s", sentence)
    return ExitCode.PARTIAL if warnings or errors else ExitCode.OK


def _merge_files(inputs: Sequence[str], labels: Sequence[str], fds: Sequence[int],
                 censuses: Sequence[Census], out_fd: int,
                 target: str) -> tuple[list[str], list[str]]:
    """Merge the inputs into out_fd; (damage that was gone past, damage that ended an input),
    as sentences."""
    merger = TimelineMerger(key_resolution=key_resolution(censuses))
    sources = [
        merger.add_source(label, multi_interface=census.interfaces > 1)
        for label, census in zip(labels, censuses, strict=True)
    ]
    by_index = {source.index: i for i, source in enumerate(sources)}
    chunks = _Inputs(fds, inputs)
    limit = merger.step_limit(chunks.chunk)
    try:

        def step(i: int) -> None:
            data = chunks.take(i)
            if data:
                merger.feed(sources[i], data)
            else:
                merger.end_source(sources[i])

        # The first chunk of every input in command-line order, so that interface ids follow.
        for i in range(len(sources)):
            chunks.want(i)
        for i in range(len(sources)):
            step(i)
        while True:
            # Which inputs the merge needs next depends on the packets fed, not on those
            # written: the chunks of the next two are read while these packets are merged and
            # written (one is not enough to keep the reading thread busy).
            upcoming = merger.upcoming(2)
            for source in upcoming:
                chunks.want(by_index[source.index])
            # A chunk's worth at a time (with the compiled core: see step_limit): the inputs'
            # chunks may let the merge write several chunks' worth at once.
            write_blocks(out_fd, merger.pull_blocks(limit), target)
            while merger.held_back:
                write_blocks(out_fd, merger.pull_blocks(limit), target)
            if not upcoming:
                break
            step(by_index[upcoming[0].index])
        write_all(out_fd, merger.finish(), target)
    finally:
        chunks.close()
    warnings = [sentence for path, source in zip(inputs, sources, strict=True)
                for sentence in _recovered_sentences(path, source.reader)]
    errors = [
        _damage_sentence(path, source.error, source.received)
        for path, source in zip(inputs, sources, strict=True)
        if source.error is not None
    ]
    return warnings, errors


# --- inspect ----------------------------------------------------------------------------------


@dataclass(slots=True)
class InterfaceSummary:
    info: InterfaceInfo
    packets: int = 0
    bytes: int = 0
    first: int | None = None
    last: int | None = None
    statistics: InterfaceStatistics | None = None

    def as_json(self) -> dict[str, object]:
        tsresol = self.info.tsresol
        shift = self.info.tsoffset * self.info.units_per_second
        return {
            "name": self.info.name,
            "description": self.info.description,
            "linktype": self.info.linktype,
            "packets": self.packets,
            "bytes": self.bytes,
            "first": None if self.first is None else format_timestamp(self.first + shift,
                                                                       tsresol),
            "last": None if self.last is None else format_timestamp(self.last + shift, tsresol),
            "dropped": None if self.statistics is None else self.statistics.dropped,
        }


def summarize(path: str) -> tuple[list[InterfaceSummary], int, CaptureError | None,
                                  CaptureReader]:
    """Read a whole capture: per-interface summaries, packet count, the damage that ended it
    (if any), and the reader (its format, the damage it went past)."""
    fd = open_input(path)
    try:
        census_probe = os.pread(fd, 4, 0)
        if not census_probe:
            raise InputError(f"{path} is empty, not a capture file; give a pcap or pcapng "
                             "file.")
        reader = CaptureReader()
        summaries: list[InterfaceSummary] = []
        total = 0
        for data in read_chunks(fd, path):
            batch = reader.feed(data)
            for _, info in batch.interfaces:
                summaries.append(InterfaceSummary(info))
            for stats in batch.statistics:
                summaries[stats.interface_id].statistics = stats
            for packet in batch.packets:
                oid, ts, _caplen, orig = packet_fields(packet)
                summary = summaries[oid]
                summary.packets += 1
                summary.bytes += orig
                if summary.first is None or ts < summary.first:
                    summary.first = ts
                if summary.last is None or ts > summary.last:
                    summary.last = ts
            total += len(batch.packets)
            if reader.error is not None:
                break
        error = reader.finish()
    finally:
        os.close(fd)
    if isinstance(error, NotACaptureError) and total == 0:
        raise InputError(f"{path} is not a capture file ({error.reason}); give a pcap or "
                         "pcapng file.")
    return summaries, total, error, reader


def run_inspect(args: argparse.Namespace) -> int:
    path: str = args.file
    summaries, total, error, reader = summarize(path)
    fmt = reader.format
    if args.json:
        _write_json(path, total, summaries)
    else:
        _write_text(path, fmt, total, summaries)
    sys.stdout.flush()
    warnings = _recovered_sentences(path, reader)
    for sentence in warnings:
        log.warning("%s", sentence)
    if error is not None:
        log.error("%s", _damage_sentence(path, error, total,
                                             done=("is counted above", "are counted above")))
    return ExitCode.PARTIAL if error is not None or warnings else ExitCode.OK


def _write_json(path: str, total: int, summaries: Sequence[InterfaceSummary]) -> None:
    """The document json.dumps(indent=2) would give, written one interface at a time: a file
    may declare hundreds of thousands of interfaces."""
    import json  # here: a merge does not need it

    write = sys.stdout.write
    head = json.dumps({"file": path, "packets": total, "interfaces": []}, indent=2)
    if not summaries:
        write(head + "\n")
        return
    write(head[: -len("[]\n}")] + "[")
    for number, summary in enumerate(summaries):
        item = json.dumps(summary.as_json(), indent=2).replace("\n", "\n    ")
        write(("," if number else "") + "\n    " + item)
    write("\n  ]\n}\n")


def _write_text(path: str, fmt: str | None, total: int,
                summaries: Sequence[InterfaceSummary]) -> None:
    """A table, one row per interface: the rows are made twice (for the column widths, then
    to write them) rather than kept, as a file may declare hundreds of thousands."""
    write = sys.stdout.write
    write(f"{path}: {fmt or 'unknown format'}, {_count(len(summaries), 'interface')}, "
          f"{_count(total, 'packet')}\n")
    header = ("#", "name", "linktype", "packets", "bytes", "first", "last", "dropped")
    widths = [len(cell) for cell in header]
    for row in _rows(summaries):
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in chain([header], _rows(summaries)):
        write("  " + "  ".join(cell.ljust(width)
                               for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
    for summary in summaries:
        if summary.info.description:
            write(f"  {summary.info.name or '-'}: {summary.info.description}\n")


def _rows(summaries: Sequence[InterfaceSummary]) -> Iterator[tuple[str, ...]]:
    for number, summary in enumerate(summaries):
        item = summary.as_json()
        linktype = summary.info.linktype
        yield (
            str(number),
            str(item["name"] or "-"),
            f"{linktype} {LINKTYPE_NAMES.get(linktype, '')}".strip(),
            str(item["packets"]),
            str(item["bytes"]),
            str(item["first"] or "-"),
            str(item["last"] or "-"),
            "-" if item["dropped"] is None else str(item["dropped"]),
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- command line -----------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = sub.add_parser(
        "merge",
        help="merge capture files into one pcapng timeline",
        description="Merge pcap/pcapng files into one pcapng, in timestamp order, like "
                    "mergecap -w, but every input interface stays its own output interface "
                    "with a unique name.",
    )
    merge.add_argument("inputs", nargs="+", metavar="IN", help="pcap or pcapng files")
    merge.add_argument("-o", "-w", dest="output", metavar="OUT",
                       help="output pcapng file (created with mode 0600), or - for stdout")
    merge.add_argument("--name", action="append", metavar="FILE=LABEL",
                       help="name FILE's interface LABEL instead of the file's stem "
                            "(repeatable)")
    merge.set_defaults(run=run_merge)
    inspect = sub.add_parser(
        "inspect",
        help="show interfaces, counts, times and drops of a capture file",
        description="Per interface: name, description, link type, packets, bytes (original "
                    "lengths), first and last timestamp (exact decimal seconds) and drops "
                    "from statistics blocks.",
    )
    inspect.add_argument("file", metavar="FILE", help="a pcap or pcapng file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=run_inspect)
