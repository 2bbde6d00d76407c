"""Push parsers for classic pcap and pcapng that transcode packets into pcapng EPBs as they go.

Feed bytes in chunks of any size (one byte at a time works, 1 MiB at a time is fast) and get a
`Batch` back: the merge key of every complete packet, the packet itself already encoded as a
little-endian EPB for the output (as a tuple of byte strings to be joined), and whatever else the
input declared meanwhile (interfaces, statistics, names, blocks to copy).

Why EPBs and not packet objects: merging is the hot path, and in pure Python every per-packet
step costs. The classic-pcap loop does one `unpack_from`, one `pack` and one slice per packet and
hands out pieces that `bytes.join` can write without looking at them again; an EPB in a
little-endian pcapng section is passed on as two pieces with only its interface id rewritten.

Timestamps stay the integers of the input in their interface's units (if_tsresol and
if_tsoffset are kept on the interface, so nanoseconds stay nanoseconds and no offset can push a
timestamp out of its 64 bits). The merge key is the time, offset included, in `key_resolution`
units (exact when the interface's resolution divides it, floored otherwise).

Results are kept apart: a clean end (`finish()` returns None), a stream cut inside a block
(`TruncatedCaptureError`), and input that is not a capture or is corrupt from some byte on
(`NotACaptureError`, `CorruptCaptureError`). Every error names the byte offset. Packets before
the damage are still delivered. A declared length is checked against a cap before any byte of
its block is buffered, so a lying length field cannot make memory grow.

A pcapng block whose length fields hold but whose content is damaged (an option running past
its end, statistics for an interface that does not exist, a packet longer than Wireshark reads)
is left out, or only its damaged options are, and reading goes on: `RecoveredDamage` in
`recovered` says where and what. Whatever is handed out is something Wireshark reads.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat
from operator import itemgetter
from types import ModuleType

from multisniff.pcap import blocks as b
from multisniff.pcap import core
from multisniff.pcap.blocks import (
    PAD,
    InterfaceInfo,
    InterfaceStatistics,
    NameBlock,
    NameRecord,
)
from multisniff.pcap.writing import encode_options

# `typing` only for the type checker: `multisniff merge` does not import it (memory, start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_BLOCK_SIZE = 16 * 1024 * 1024
"""Largest pcapng block accepted: Wireshark's limit before it made room for 128 MiB D-Bus
messages (wiretap/pcapng.c, MAX_BLOCK_SIZE)."""

MAX_RECOVERED = 20
"""Damage that reading went past is kept as this many sentences; the rest is only counted."""

PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAP_MAGIC_MODIFIED = 0xA1B2CD34
LINKTYPE_FCS_PRESENT = 0x04000000
"""Classic pcap LinkType field: bits 0-15 are the link type; when this bit is set, bits 28-31
give the FCS length in 16-bit units (draft-ietf-opsawg-pcap, section 4)."""


class CaptureError(Exception):
    """The input cannot be read from `offset` on; `reason` says why in words."""

    def __init__(self, reason: str, *, offset: int) -> None:
        super().__init__(f"{reason} (at byte offset {offset})")
        self.reason = reason
        self.offset = offset


class NotACaptureError(CaptureError):
    """The input does not start like a pcap or pcapng file (or is empty)."""


class CorruptCaptureError(CaptureError):
    """A block or record is malformed; nothing after it can be trusted."""


class RecoveredDamage(CaptureError):
    """A block that is damaged inside, though its length fields hold: it was left out (or the
    part of it that is damaged was), and reading went on after it. `remedy` says what was done,
    in words."""

    def __init__(self, reason: str, *, offset: int, remedy: str) -> None:
        super().__init__(reason, offset=offset)
        self.remedy = remedy


class TruncatedCaptureError(CaptureError):
    """The input ends inside a block or record: `expected` bytes were announced, `got` came."""

    def __init__(self, reason: str, *, offset: int, expected: int, got: int) -> None:
        super().__init__(reason, offset=offset)
        self.expected = expected
        self.got = got


Packet = tuple[bytes, ...]
"""One packet as the pieces of one little-endian EPB; b"".join(packet) is the whole block."""


@dataclass(slots=True)
class Batch:
    """What one `feed` produced. `keys[i]` is the merge key of `packets[i]`.

    `interfaces` lists the interfaces declared by this chunk as (output id, info), always before
    any packet that uses them is handed out.
    """

    keys: list[int] = field(default_factory=list)
    packets: list[Packet] = field(default_factory=list)
    interfaces: list[tuple[int, InterfaceInfo]] = field(default_factory=list)
    statistics: list[InterfaceStatistics] = field(default_factory=list)
    names: list[NameBlock] = field(default_factory=list)
    blocks: list[bytes] = field(default_factory=list)
    """Blocks copied as they are (decryption secrets, journal entries, copyable custom blocks)."""
    flat: bool = False
    """Made by `CaptureReader.feed_flat`: the packets are in `pieces` and `ends`, not in
    `packets`."""
    pieces: list[bytes] = field(default_factory=list)
    """Flat: b"".join(pieces) is every packet's EPB, one after the other."""
    ends: list[int] = field(default_factory=list)
    """Flat: `ends[i]` is the offset in b"".join(pieces) where packet i's EPB ends."""
    packed: int = 0
    """A reader made with `records=True` only: when not 0, every piece is a compiled
    `PcapRecords`, `keys` and `ends` are empty and the pieces carry the keys and ends of their
    `packed` packets (`unpack` makes them the lists above)."""


def unpack(batch: Batch) -> None:
    """Make a packed batch's keys and ends the lists `Batch.keys` and `Batch.ends`."""
    records: list[Any] = batch.pieces  # every piece is a PcapRecords
    for piece in records:
        keys, ends = piece.columns()
        batch.keys.extend(keys)
        batch.ends.extend(ends)
    batch.packed = 0


_START, _PCAP, _PCAPNG = 0, 1, 2

_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_BLOCK_HEADER = {"<": struct.Struct("<II"), ">": struct.Struct(">II")}
_EPB_FIXED = {"<": struct.Struct("<IIIII"), ">": struct.Struct(">IIIII")}
_PB_FIXED = {"<": struct.Struct("<HHIIII"), ">": struct.Struct(">HHIIII")}
_IDB_FIXED = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}
_ISB_FIXED = {"<": struct.Struct("<III"), ">": struct.Struct(">III")}
_SHB_VERSION = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_OPTION_HEADER = {"<": struct.Struct("<HH"), ">": struct.Struct(">HH")}
_PCAP_HEADER = {"<": struct.Struct("<IHHiIII"), ">": struct.Struct(">IHHiIII")}
_PCAP_RECORD = {"<": struct.Struct("<IIII"), ">": struct.Struct(">IIII")}

_PCAP_RECORD3_LE = struct.Struct("<III")
_EPB_HEAD5 = struct.Struct("<IIIII")  # type, total, interface, ts high, ts low
_EPB_HEAD7 = struct.Struct("<IIIIIII")
_EPB_HEAD3 = struct.Struct("<III")  # type, total, interface
_EPB_TS = struct.Struct("<II")
_LE_U32 = struct.Struct("<I")
_LE_U64 = struct.Struct("<Q")
_LE_OPTION_HEADER = struct.Struct("<HH")

_TAILS: list[bytes] = []
"""_TAILS[n]: the padding and trailing length of an EPB whose packet has n bytes (no options)."""


def _grow_tails(upto: int) -> None:
    size = 1 << max(11, (upto + 1).bit_length())
    start = len(_TAILS)
    _TAILS.extend(PAD[n & 3] + _LE_U32.pack((n + 35) & -4) for n in range(start, size))


_grow_tails(0)


def _default_assign() -> Callable[[InterfaceInfo], int]:
    count = 0

    def assign(info: InterfaceInfo) -> int:
        nonlocal count
        count += 1
        return count - 1

    return assign


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", errors="replace")


class _Fail(Exception):
    """Internal: raised at the failing block, turned into `CaptureReader.error`."""

    def __init__(self, error: CaptureError) -> None:
        super().__init__(str(error))
        self.error = error


class CaptureReader:
    """A push parser for one capture stream (classic pcap or pcapng, detected from its magic).

    `assign_interface` is called once for every interface the input declares and returns the
    interface id that the EPBs handed out must carry (the merger passes its own; by default
    interfaces are numbered 0, 1, ... in the order declared).

    A packet is at most as long as Wireshark reads for its link type (`blocks.max_packet_size`,
    and no longer than fits a block of `max_block_size`); `max_packet_size` sets one maximum
    for every link type instead.

    With the compiled core active when the reader is made (`core.compiled()`), `feed_flat`
    leaves the classic-pcap records and the common pcapng blocks to its loops, which give the
    same bytes; whatever they do not handle, this code handles as it always does.
    `records=True` (the merger's readers) lets the compiled classic-pcap loop hand out its
    pieces as `_core.PcapRecords`, which stand for the same EPBs but stay the records they were
    read as until the merge copies them: `len()` and `bytes()` of one are those of its EPBs.
    """

    def __init__(
        self,
        *,
        key_resolution: int = 1_000_000_000,
        assign_interface: Callable[[InterfaceInfo], int] | None = None,
        max_block_size: int = MAX_BLOCK_SIZE,
        max_packet_size: int | None = None,
        records: bool = False,
    ) -> None:
        self.key_resolution = key_resolution
        self._assign = assign_interface or _default_assign()
        self.max_block_size = max_block_size
        self.max_packet_size = max_packet_size
        self.format: str | None = None
        """"pcap" or "pcapng" once the magic has been read."""
        self.interfaces: list[InterfaceInfo] = []
        """Every interface declared so far, over all sections, in order."""
        self.interface_ids: list[int] = []
        """The output id given to each entry of `interfaces`."""
        self.packets = 0
        self.skipped_blocks = 0
        """Blocks left out: unknown types, non-copyable custom blocks, big-endian blocks that
        cannot be converted."""
        self.recovered: list[RecoveredDamage] = []
        """The first MAX_RECOVERED damaged blocks that reading went past."""
        self.recovered_count = 0
        """How many damaged blocks reading went past, in all."""
        self.error: CaptureError | None = None
        self._state = _START
        self._tail = b""
        self._offset = 0  # stream offset of the first byte not yet parsed (start of _tail)
        self._seen = 0  # bytes fed in total
        # classic pcap
        self._pcap_order = "<"
        self._pcap_units = 1_000_000
        self._pcap_oid = 0
        self._pcap_cap = 0
        self._pcap_linktype = 0
        self._key_mult = 1
        self._key_div = 1
        # pcapng, current section
        self._order = "<"
        self._section: list[tuple[int, int, int, int, int]] = []
        """Per interface of the current section: (output id, if_tsoffset in units, key
        multiplier, key divisor, longest packet accepted)."""
        self._first_of_section = 0  # index in `interfaces` of the section's first interface
        self._last_key = 0
        self._compiled: ModuleType | None = core.compiled()
        self._records = records and self._compiled is not None
        self._pcap_kernel: tuple[bool, int, int, int, int, int] | None = None
        """The compiled classic-pcap loop's parameters, None where a number does not fit it."""

    # --- public API ---------------------------------------------------------------------------

    def feed_flat(self, data: bytes) -> Batch:
        """Like `feed`, but the packets come out as one run of pieces (`Batch.pieces`) with
        the end offset of each EPB in it (`Batch.ends`): cheaper to keep and to slice."""
        batch = self._feed(data, Batch(flat=True))
        if batch.packets:  # from a path that only makes tuples: flatten them here
            _flatten(batch)
        return batch

    def feed(self, data: bytes) -> Batch:
        """Parse as much as `data` completes; return what came out of it."""
        return self._feed(data, Batch())

    def _feed(self, data: bytes, batch: Batch) -> Batch:
        if self.error is not None or not data:
            return batch
        self._seen += len(data)
        tail = self._tail
        start = 0
        try:
            if tail:
                # Complete the block that straddles the chunk boundary with as few bytes of
                # `data` as needed, so that the rest of `data` is parsed in place, not copied.
                while tail:
                    need = self._need(tail)
                    take = need - len(tail)
                    if take > len(data) - start:
                        self._tail = tail + data[start:]
                        return self._finish_batch(batch)
                    tail += data[start : start + take]
                    start += take
                    used = self._parse(tail, 0, self._offset, batch)
                    if used == 0 and take == 0:
                        raise self._corrupt("a block cannot be parsed", self._offset)
                    self._offset += used
                    tail = tail[used:]
                    if self.error is not None:
                        return self._finish_batch(batch)
            used = self._parse(data, start, self._offset - start, batch)
            self._offset += used - start
            self._tail = data[used:] if used < len(data) else b""
        except _Fail as fail:
            self.error = fail.error
            self._tail = b""
        return self._finish_batch(batch)

    def finish(self) -> CaptureError | None:
        """The stream has ended: None for a clean end, else the error that describes it."""
        if self.error is not None:
            return self.error
        tail = self._tail
        if self._seen == 0:
            self.error = NotACaptureError("the input is empty", offset=0)
        elif self._state == _START and len(tail) < 4:
            self.error = NotACaptureError(
                f"the input is only {len(tail)} bytes long, too short for a capture", offset=0
            )
        elif tail:
            need = self._need(tail)
            what = self._what(tail)
            self.error = TruncatedCaptureError(
                f"the input ends inside {what}: {need} bytes expected, {len(tail)} present",
                offset=self._offset,
                expected=need,
                got=len(tail),
            )
        return self.error

    # --- dispatch -----------------------------------------------------------------------------

    def _finish_batch(self, batch: Batch) -> Batch:
        if batch.packed:
            self.packets += batch.packed
            last: Any = batch.pieces[-1]  # a PcapRecords
            self._last_key = last.last_key
        else:
            self.packets += len(batch.keys)
            if batch.keys:
                self._last_key = batch.keys[-1]
        return batch

    def _parse(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """Parse complete blocks of buf from pos; return the position of the first one left.
        `base` is the stream offset of buf[0], for error messages."""
        while True:
            state = self._state
            if state == _PCAPNG:
                if (self._compiled is not None and batch.flat and self._order == "<"
                        and type(buf) is bytes):
                    return self._parse_pcapng_compiled(buf, pos, base, batch)
                return self._parse_pcapng(buf, pos, base, batch)
            if state == _PCAP:
                if (self._compiled is not None and batch.flat and self._pcap_kernel is not None
                        and type(buf) is bytes):
                    return self._parse_pcap_compiled(buf, pos, base, batch)
                if batch.packed:
                    unpack(batch)
                if self._pcap_order == "<" and self._key_mult == self._key_div == 1:
                    if batch.flat and not batch.packets:
                        return self._parse_pcap_flat(buf, pos, base, batch)
                    return self._parse_pcap_fast(buf, pos, base, batch)
                return self._parse_pcap_general(buf, pos, base, batch)
            new = self._parse_start(buf, pos, base, batch)
            if new == pos and self._state == _START:
                return pos
            pos = new

    def _need(self, tail: bytes) -> int:
        """How many bytes the block that starts `tail` needs in all (at least len(tail)+1
        while its header is incomplete). Lengths beyond the caps are not trusted: the parser
        reports them as corrupt once their header is complete."""
        state = self._state
        if state == _START:
            if len(tail) < 4:
                return 4
            if _U32["<"].unpack_from(tail)[0] == b.SHB:
                return self._need_block(tail)
            return 24
        if state == _PCAP:
            if len(tail) < 16:
                return 16
            incl = _PCAP_RECORD[self._pcap_order].unpack_from(tail)[2]
            return 16 + incl if incl <= self._pcap_cap else 16
        return self._need_block(tail)

    def _need_block(self, tail: bytes) -> int:
        if len(tail) < 8:
            return 8
        if _U32["<"].unpack_from(tail)[0] == b.SHB:
            if len(tail) < 12:
                return 12
            magic = _U32["<"].unpack_from(tail, 8)[0]
            order = ">" if magic == 0x4D3C2B1A else "<"
        else:
            order = self._order
        length: int = _U32[order].unpack_from(tail, 4)[0]
        if length < 12 or length & 3 or length > self.max_block_size:
            return max(len(tail), 12)
        return length

    def _what(self, tail: bytes) -> str:
        if self._state == _START:
            return "the file header"
        if self._state == _PCAP:
            return "a packet record" if len(tail) >= 16 else "a packet record header"
        if len(tail) < 8:
            return "a block header"
        block_type = _U32[self._order].unpack_from(tail)[0]
        names = {b.SHB: "a section header block", b.IDB: "an interface description block",
                 b.EPB: "an enhanced packet block", b.SPB: "a simple packet block",
                 b.PACKET_BLOCK: "a packet block", b.NRB: "a name resolution block",
                 b.ISB: "an interface statistics block"}
        return names.get(block_type, f"a block of type 0x{block_type:08x}")

    def _corrupt(self, reason: str, offset: int) -> _Fail:
        return _Fail(CorruptCaptureError(reason, offset=offset))

    def _declare(self, info: InterfaceInfo, batch: Batch) -> int:
        oid = self._assign(info)
        self.interfaces.append(info)
        self.interface_ids.append(oid)
        batch.interfaces.append((oid, info))
        return oid

    def _max_caplen(self, linktype: int) -> int:
        if self.max_packet_size is not None:
            return self.max_packet_size
        return min(b.max_packet_size(linktype), self.max_block_size - 32)

    def _recover(self, reason: str, offset: int, remedy: str) -> None:
        self.recovered_count += 1
        if len(self.recovered) < MAX_RECOVERED:
            self.recovered.append(RecoveredDamage(reason, offset=offset, remedy=remedy))

    def _key_factors(self, units: int) -> tuple[int, int]:
        resolution = self.key_resolution
        if units == resolution:
            return 1, 1
        if resolution % units == 0:
            return resolution // units, 1
        return resolution, units

    # --- file start ---------------------------------------------------------------------------

    def _parse_start(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        if len(buf) - pos < 4:
            return pos
        magic_le = _U32["<"].unpack_from(buf, pos)[0]
        if magic_le == b.SHB:
            self.format = "pcapng"
            self._state = _PCAPNG
            return pos
        magic_be = _U32[">"].unpack_from(buf, pos)[0]
        if PCAP_MAGIC_MODIFIED in (magic_le, magic_be):
            raise _Fail(NotACaptureError(
                "the input is a modified (Kuznetzov) pcap file, which is not supported; "
                "convert it with editcap -F pcap", offset=base + pos))
        if magic_le in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
            order, magic = "<", magic_le
        elif magic_be in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
            order, magic = ">", magic_be
        else:
            raise _Fail(NotACaptureError(
                f"the input starts with bytes {buf[pos:pos + 4].hex(' ')}, which is neither "
                "pcap nor pcapng", offset=base + pos))
        if len(buf) - pos < 24:
            return pos
        _, major, minor, _, _, snaplen, linktype_field = _PCAP_HEADER[order].unpack_from(buf, pos)
        if major < 2:  # a later major version is read as 2.x, as Wireshark reads it
            raise self._corrupt(f"pcap version {major}.{minor} is not supported (only 2.x "
                                "and later)", base + pos)
        fcslen = None
        if linktype_field & LINKTYPE_FCS_PRESENT:
            fcslen = ((linktype_field >> 28) & 0xF) * 2
        nano = magic == PCAP_MAGIC_NSEC
        info = InterfaceInfo(
            linktype=linktype_field & 0xFFFF,
            snaplen=snaplen,
            tsresol=9 if nano else 6,
            fcslen=fcslen,
        )
        self.format = "pcap"
        self._pcap_order = order
        self._pcap_units = info.units_per_second
        self._key_mult, self._key_div = self._key_factors(self._pcap_units)
        self._pcap_oid = self._declare(info, batch)
        self._pcap_cap = self._max_caplen(info.linktype)
        self._pcap_linktype = info.linktype
        self._state = _PCAP
        if (0 <= self._pcap_oid < 1 << 32 and 0 <= self._key_mult < 1 << 64
                and 0 < self._key_div < 1 << 64):
            self._pcap_kernel = (order == "<", self._pcap_units, self._key_mult, self._key_div,
                                 self._pcap_oid, min(max(self._pcap_cap, -1), (1 << 63) - 1))
        return pos + 24

    # --- classic pcap -------------------------------------------------------------------------

    def _parse_pcap_fast(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """Little-endian records, merge key == timestamp: the hot loop of a merge."""
        ak = batch.keys.append
        ap = batch.packets.append
        unpack = _PCAP_RECORD3_LE.unpack_from
        head = _EPB_HEAD5.pack
        tails = _TAILS
        oid = self._pcap_oid
        cap = self._pcap_cap
        units = self._pcap_units
        end = len(buf)
        last = end - 16
        while True:
            try:
                while pos <= last:
                    sec, frac, incl = unpack(buf, pos)
                    nxt = pos + 16 + incl
                    if nxt > end or incl > cap:
                        break
                    ts = sec * units + frac
                    ak(ts)
                    ap((head(6, (incl + 35) & -4, oid, ts >> 32, ts & 0xFFFFFFFF),
                        buf[pos + 8 : nxt], tails[incl]))
                    pos = nxt
                break
            except IndexError:
                # A packet longer than any seen so far: extend the table of EPB tails. The
                # packet's key was appended but not the packet, so take the key back.
                batch.keys.pop()
                _grow_tails(incl)
        if pos <= last:
            self._check_record(buf, pos, base)
        return pos

    def _parse_pcap_flat(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """`_parse_pcap_fast` for a flat batch."""
        ak = batch.keys.append
        ends = batch.ends
        ae = ends.append
        ext = batch.pieces.extend
        unpack = _PCAP_RECORD3_LE.unpack_from
        head = _EPB_HEAD5.pack
        tails = _TAILS
        oid = self._pcap_oid
        cap = self._pcap_cap
        units = self._pcap_units
        end = len(buf)
        last = end - 16
        offset = ends[-1] if ends else 0
        while pos <= last:
            sec, frac, incl = unpack(buf, pos)
            nxt = pos + 16 + incl
            if nxt > end or incl > cap:
                break
            if incl >= len(tails):
                _grow_tails(incl)
            ts = sec * units + frac
            ak(ts)
            total = (incl + 35) & -4
            ext((head(6, total, oid, ts >> 32, ts & 0xFFFFFFFF), buf[pos + 8 : nxt], tails[incl]))
            offset += total
            ae(offset)
            pos = nxt
        if pos <= last:
            self._check_record(buf, pos, base)
        return pos

    def _parse_pcap_general(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """Big-endian records, or a merge key in other units than the timestamp."""
        ak = batch.keys.append
        ap = batch.packets.append
        unpack = _PCAP_RECORD[self._pcap_order].unpack_from
        head = _EPB_HEAD7.pack
        oid = self._pcap_oid
        cap = self._pcap_cap
        units = self._pcap_units
        mult, div = self._key_mult, self._key_div
        end = len(buf)
        last = end - 16
        while pos <= last:
            sec, frac, incl, orig = unpack(buf, pos)
            nxt = pos + 16 + incl
            if nxt > end or incl > cap:
                break
            ts = sec * units + frac
            ak(ts * mult // div)
            total = (incl + 35) & -4
            ap((head(6, total, oid, ts >> 32, ts & 0xFFFFFFFF, incl, orig),
                buf[pos + 16 : nxt], PAD[incl & 3], _LE_U32.pack(total)))
            pos = nxt
        if pos <= last:
            self._check_record(buf, pos, base)
        return pos

    def _parse_pcap_compiled(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """The records of a flat batch, by the compiled loop; what it stops at, as before."""
        assert self._compiled is not None and self._pcap_kernel is not None
        ends = batch.ends
        if self._records and not ends:
            pieces: list[Any] = batch.pieces  # PcapRecords (see `Batch.packed`)
            count = len(pieces)
            pos = self._compiled.pcap_records(buf, pos, self._pcap_kernel,
                                              pieces[-1].end if batch.packed else 0, pieces)
            if len(pieces) > count:
                batch.packed += pieces[-1].count
        else:
            pos = self._compiled.pcap_flat(buf, pos, self._pcap_kernel, ends[-1] if ends else 0,
                                           batch.keys, batch.pieces, ends)
        if pos + 16 > len(buf):
            return pos
        self._check_record(buf, pos, base)
        if pos + 16 + _PCAP_RECORD[self._pcap_order].unpack_from(buf, pos)[2] > len(buf):
            return pos
        # a record the compiled loop cannot encode (a number out of its range): as before
        if batch.packed:
            unpack(batch)
        pos = self._parse_pcap_general(buf, pos, base, batch)
        if batch.packets:
            _flatten(batch)
        return pos

    def _check_record(self, buf: bytes, pos: int, base: int) -> None:
        incl = _PCAP_RECORD[self._pcap_order].unpack_from(buf, pos)[2]
        if incl > self._pcap_cap:
            raise self._corrupt(
                f"a packet record claims {incl} captured bytes, more than the "
                f"{self._pcap_cap} that can be read for link type {self._pcap_linktype}",
                base + pos)

    # --- pcapng -------------------------------------------------------------------------------

    def _parse_pcapng_compiled(self, buf: bytes, pos: int, base: int, batch: Batch) -> int:
        """The blocks of a flat batch: EPBs by the compiled loop, every other block (and an
        EPB it does not take) by `_parse_pcapng`, one at a time, in order."""
        assert self._compiled is not None
        kernel = self._compiled.pcapng_flat
        keys, pieces, ends = batch.keys, batch.pieces, batch.ends
        limit = min(max(self.max_block_size, 0), 1 << 32)  # as a u64; lengths are 32 bits
        while True:
            pos, block_end = kernel(buf, pos, self._section, limit, ends[-1] if ends else 0,
                                    keys, pieces, ends)
            if not block_end:
                return pos
            if keys:
                self._last_key = keys[-1]
            new = self._parse_pcapng(buf, pos, base, batch, block_end)
            if batch.packets:
                _flatten(batch)
            if new == pos:
                return pos
            pos = new
            if self._order != "<":  # a big-endian section: the compiled loop takes none of it
                pos = self._parse_pcapng(buf, pos, base, batch)
                if batch.packets:
                    _flatten(batch)
                return pos

    def _parse_pcapng(self, buf: bytes, pos: int, base: int, batch: Batch,
                      end: int = -1) -> int:
        """Parse the blocks of buf from pos up to `end` (default: the end of buf)."""
        if end < 0:
            end = len(buf)
        order = self._order
        header = _BLOCK_HEADER[order].unpack_from
        trailer = _U32[order].unpack_from
        epb_fixed = _EPB_FIXED[order].unpack_from
        head3 = _EPB_HEAD3.pack
        ak = batch.keys.append
        ap = batch.packets.append
        section = self._section
        cap = self.max_block_size
        last_key = self._last_key
        while pos + 8 <= end:
            block_type, length = header(buf, pos)
            if block_type == b.SHB:
                if pos + 12 > end:
                    break
                new = self._section_header(buf, pos, base, end)
                if new == pos:
                    break
                pos = new
                order = self._order
                header = _BLOCK_HEADER[order].unpack_from
                trailer = _U32[order].unpack_from
                epb_fixed = _EPB_FIXED[order].unpack_from
                section = self._section
                continue
            if length < 12 or length & 3 or length > cap:
                raise self._corrupt(self._bad_length(block_type, length), base + pos)
            nxt = pos + length
            if nxt > end:
                break
            if trailer(buf, nxt - 4)[0] != length:
                raise self._corrupt(
                    f"the trailing length {trailer(buf, nxt - 4)[0]} of a block of type "
                    f"0x{block_type:08x} does not match its leading length {length}",
                    base + pos)
            if block_type == b.EPB and length >= 32:
                local, high, low, caplen, _orig = epb_fixed(buf, pos + 8)
                if local < len(section):
                    oid, offset, mult, div, most = section[local]
                    if caplen <= length - 32 and caplen <= most:
                        last_key = ((high << 32 | low) + offset) * mult // div
                        ak(last_key)
                        options_at = pos + 28 + ((caplen + 3) & -4)
                        if order == "<" and (options_at == nxt - 4
                                             or self._options_clean(buf, options_at, nxt - 4)):
                            ap((head3(6, length, oid), buf[pos + 12 : nxt]))
                        else:
                            ap(self._epb_rewrite(buf, pos, length, oid, caplen, base))
                        pos = nxt
                        continue
            self._last_key = last_key
            self._other_block(block_type, buf, pos, length, base, batch)
            last_key = self._last_key
            pos = nxt
        self._last_key = last_key
        return pos

    def _bad_length(self, block_type: int, length: int) -> str:
        what = f"a block of type 0x{block_type:08x}"
        if length < 12:
            return f"{what} claims a total length of {length}, less than the minimum of 12"
        if length & 3:
            return f"{what} claims a total length of {length}, which is not a multiple of 4"
        return (f"{what} claims a total length of {length}, more than the maximum of "
                f"{self.max_block_size}")

    def _section_header(self, buf: bytes, pos: int, base: int, end: int) -> int:
        magic = _U32["<"].unpack_from(buf, pos + 8)[0]
        if magic == b.BYTE_ORDER_MAGIC:
            order = "<"
        elif magic == 0x4D3C2B1A:
            order = ">"
        else:
            raise self._corrupt(f"a section header has byte-order magic 0x{magic:08x}, not "
                                "0x1a2b3c4d", base + pos)
        length: int = _U32[order].unpack_from(buf, pos + 4)[0]
        if length < 28 or length & 3 or length > self.max_block_size:
            raise self._corrupt(self._bad_length(b.SHB, length).replace(
                "a block of type 0x0a0d0d0a", "a section header block"), base + pos)
        if pos + length > end:
            return pos
        if _U32[order].unpack_from(buf, pos + length - 4)[0] != length:
            raise self._corrupt("the trailing length of a section header block does not match "
                                f"its leading length {length}", base + pos)
        major, minor = _SHB_VERSION[order].unpack_from(buf, pos + 12)
        if major != 1:
            raise self._corrupt(f"pcapng version {major}.{minor} is not supported (only 1.x)",
                                base + pos)
        self._order = order
        self._section = []
        return pos + length

    @staticmethod
    def _options_clean(buf: bytes, at: int, end: int) -> bool:
        """Whether the little-endian options area buf[at:end] can be copied as it is: every
        option inside it and one Wireshark accepts, and nothing after opt_endofopt."""
        unpack = _LE_OPTION_HEADER.unpack_from
        valid = b.option_is_valid
        while at + 4 <= end:
            code, size = unpack(buf, at)
            if code == b.OPT_ENDOFOPT:
                return size == 0 and at + 4 == end
            value_end = at + 4 + size
            if value_end > end or not valid(b.EPB, code, buf[at + 4 : value_end]):
                return False
            at = value_end + (-size & 3)
        return at == end

    def _epb_rewrite(self, buf: bytes, pos: int, length: int, oid: int, caplen: int,
                     base: int) -> Packet:
        """An EPB from a big-endian section, or one whose options cannot be copied as they
        are: re-encoded little-endian with the options that are sound."""
        data_end = pos + 28 + caplen
        options_start = pos + 28 + ((caplen + 3) & -4)
        area = buf[options_start : pos + length - 4]
        options = self._options(area, 0, b.EPB, base + pos, "an enhanced packet block")
        encoded = encode_options(self._to_le(options, b.EPB))
        total = 32 + ((caplen + 3) & -4) + len(encoded)
        _, high, low, _, orig = _EPB_FIXED[self._order].unpack_from(buf, pos + 8)
        return (
            _EPB_HEAD7.pack(6, total, oid, high, low, caplen, orig),
            buf[pos + 28 : data_end],
            PAD[caplen & 3],
            encoded,
            _LE_U32.pack(total),
        )

    def _other_block(self, block_type: int, buf: bytes, pos: int, length: int, base: int,
                     batch: Batch) -> None:
        body = buf[pos + 8 : pos + length - 4]
        offset = base + pos
        try:
            if block_type == b.EPB:
                self._enhanced_packet(body, offset)
            elif block_type == b.IDB:
                self._interface(body, offset, batch)
            elif block_type == b.SPB:
                self._simple_packet(body, offset, batch)
            elif block_type == b.PACKET_BLOCK:
                self._packet_block(body, offset, batch)
            elif block_type == b.ISB:
                self._statistics(body, offset, batch)
            elif block_type == b.NRB:
                self._names(body, offset, batch)
            elif block_type in (b.DSB, b.SYSTEMD_JOURNAL, b.CUSTOM_COPY) and self._order == "<":
                self._copied(block_type, body, offset)
                batch.blocks.append(buf[pos : pos + length])
            else:
                self.skipped_blocks += 1
        except _Damaged as damaged:
            self._recover(damaged.reason, offset, "the block was left out")

    def _enhanced_packet(self, body: bytes, offset: int) -> None:
        """An EPB that the fast path turned down: say what is wrong with it."""
        if len(body) < 20:
            raise _Damaged(f"an enhanced packet block of {len(body) + 12} bytes is shorter "
                           "than the minimum of 32")
        local, _, _, caplen, _ = _EPB_FIXED[self._order].unpack_from(body)
        self._check_packet(local, caplen, len(body) - 20, "an enhanced packet block")

    def _check_packet(self, local: int, caplen: int, room: int, what: str) -> None:
        if local >= len(self._section):
            raise _Damaged(f"a packet refers to interface {local}, but the section declares "
                           f"{_count(len(self._section), 'interface')}")
        if caplen > room:
            raise _Damaged(f"{what} claims {caplen} captured bytes but holds {room}")
        most = self._section[local][4]
        if caplen > most:
            linktype = self.interfaces[self._first_of_section + local].linktype
            raise _Damaged(f"a packet of {caplen} captured bytes is longer than the {most} "
                           f"that Wireshark reads for link type {linktype}")

    def _copied(self, block_type: int, body: bytes, offset: int) -> None:
        """Blocks passed on as they are must be sound as Wireshark reads them."""
        if block_type == b.DSB:
            if len(body) < 8:
                raise _Damaged("a decryption secrets block is too short")
            size = _U32["<"].unpack_from(body, 4)[0]
            if 8 + size > len(body):
                raise _Damaged(f"a decryption secrets block claims {size} bytes of secrets "
                               f"but holds {len(body) - 8}")
            problem = self._options_problem(body, 8 + ((size + 3) & -4), b.DSB)
            if problem:
                raise _Damaged(problem.replace("the block", "a decryption secrets block", 1))
        elif block_type == b.SYSTEMD_JOURNAL and len(body) < 23:
            raise _Damaged("a systemd journal export block is too short for an entry")
        elif block_type == b.CUSTOM_COPY and len(body) < 4:
            raise _Damaged("a custom block is too short for its Private Enterprise Number")

    def _options_problem(self, body: bytes, start: int, block_type: int) -> str | None:
        problems: list[str] = []
        self._parse_options(body, start, block_type, problems, "the block")
        return problems[0] if problems else None

    def _parse_options(self, body: bytes, start: int, block_type: int, problems: list[str],
                       what: str) -> list[tuple[int, bytes]]:
        """The sound options of an area, values as they are (section byte order); what is
        wrong with the others goes to `problems`. Reading stops at an option that runs past
        its block."""
        unpack = _OPTION_HEADER[self._order].unpack_from
        options: list[tuple[int, bytes]] = []
        at = start
        while at + 4 <= len(body):
            code, size = unpack(body, at)
            if code == b.OPT_ENDOFOPT:
                break
            value_end = at + 4 + size
            if value_end > len(body):
                problems.append(f"option {code} of {what} claims {size} bytes, but only "
                                f"{len(body) - at - 4} are left in the block")
                break
            value = body[at + 4 : value_end]
            if b.option_is_valid(block_type, code, value):
                options.append((code, value))
            else:
                problems.append(f"option {code} of {what} has a value of {size} bytes, which "
                                "Wireshark does not accept")
            at = value_end + (-size & 3)
        return options

    def _options(self, body: bytes, start: int, block_type: int, offset: int,
                 what: str) -> list[tuple[int, bytes]]:
        """The sound options of a block that is kept; the damaged ones are left out and said."""
        problems: list[str] = []
        options = self._parse_options(body, start, block_type, problems, what)
        if problems:
            left = ("that option was" if len(problems) == 1
                    else f"{len(problems)} damaged options were")
            self._recover(problems[0], offset, f"{left} left out")
        return options

    def _to_le(self, options: list[tuple[int, bytes]], block_type: int) -> list[tuple[int, bytes]]:
        """Option values converted from the section's byte order to little-endian."""
        if self._order == "<":
            return options
        numeric = b.NUMERIC_OPTIONS.get(block_type, {})
        as_bytes = b.BYTES_OPTIONS.get(block_type, frozenset())
        converted: list[tuple[int, bytes]] = []
        for code, value in options:
            if code == b.OPT_COMMENT or code in as_bytes:
                converted.append((code, value))
            elif code in b.OPT_CUSTOM and len(value) >= 4:
                converted.append((code, value[3::-1] + value[4:]))
            elif code in numeric and len(value) == struct.calcsize("<" + numeric[code]):
                fmt = numeric[code]
                converted.append((code, struct.pack("<" + fmt, *struct.unpack(">" + fmt, value))))
            # else: a big-endian value of unknown shape cannot be converted; it is left out.
        return converted

    def _interface(self, body: bytes, offset: int, batch: Batch) -> None:
        if len(body) < 8:
            # Left out, it would give the next interface its number: nothing after can be
            # trusted.
            raise self._corrupt("an interface description block is too short", offset)
        linktype, _, snaplen = _IDB_FIXED[self._order].unpack_from(body)
        name = description = filter_text = os_text = hardware = None
        tsresol = b.DEFAULT_TSRESOL
        fcslen = None
        offset_seconds = 0
        other: list[tuple[int, bytes]] = []
        raw = self._options(body, 8, b.IDB, offset, "an interface description block")
        for code, value in raw:
            if code == b.IF_NAME:
                name = _text(value)
            elif code == b.IF_DESCRIPTION:
                description = _text(value)
            elif code == b.IF_TSRESOL:
                if len(value) == 1:
                    tsresol = value[0]
            elif code == b.IF_FILTER and value[:1] == b"\0":
                filter_text = _text(value[1:])
            elif code == b.IF_OS:
                os_text = _text(value)
            elif code == b.IF_FCSLEN:
                if len(value) == 1:
                    fcslen = value[0]
            elif code == b.IF_TSOFFSET:
                if len(value) == 8:
                    offset_seconds = struct.unpack(self._order + "q", value)[0]
            elif code == b.IF_HARDWARE:
                hardware = _text(value)
            else:
                other.append((code, value))
        info = InterfaceInfo(
            linktype=linktype,
            snaplen=snaplen,
            name=name,
            description=description,
            tsresol=tsresol,
            filter=filter_text,
            os=os_text,
            fcslen=fcslen,
            hardware=hardware,
            tsoffset=offset_seconds,
            other_options=tuple(self._to_le(other, b.IDB)),
        )
        units = info.units_per_second
        mult, div = self._key_factors(units)
        if not self._section:
            self._first_of_section = len(self.interfaces)
        oid = self._declare(info, batch)
        self._section.append((oid, offset_seconds * units, mult, div,
                              self._max_caplen(linktype)))

    def _simple_packet(self, body: bytes, offset: int, batch: Batch) -> None:
        """An SPB has no timestamp and belongs to interface 0: it gets the time of the packet
        before it, so that it stays where it was in the file."""
        if not self._section:
            raise _Damaged("a simple packet block comes before any interface")
        if len(body) < 4:
            raise _Damaged("a simple packet block is too short")
        oid, ts_offset, mult, div, _ = self._section[0]
        snaplen = self.interfaces[self._first_of_section].snaplen
        orig = _U32[self._order].unpack_from(body)[0]
        caplen = min(orig, len(body) - 4)
        if snaplen:
            caplen = min(caplen, snaplen)
        self._check_packet(0, caplen, len(body) - 4, "a simple packet block")
        ts = min(max(self._last_key * div // mult - ts_offset, 0), _MAX_TS)
        batch.keys.append(self._last_key)
        batch.packets.append(self._encode_packet(oid, ts, body[4 : 4 + caplen], orig, b""))

    def _packet_block(self, body: bytes, offset: int, batch: Batch) -> None:
        if len(body) < 20:
            raise _Damaged("a packet block is too short")
        local, drops, high, low, caplen, orig = _PB_FIXED[self._order].unpack_from(body)
        self._check_packet(local, caplen, len(body) - 20, "a packet block")
        oid, ts_offset, mult, div, _ = self._section[local]
        ts = high << 32 | low
        options = self._to_le(self._options(body, 20 + ((caplen + 3) & -4), b.PACKET_BLOCK,
                                            offset, "a packet block"), b.PACKET_BLOCK)
        if drops != 0xFFFF:
            options.append((b.EPB_DROPCOUNT, _LE_U64.pack(drops)))
        self._last_key = (ts + ts_offset) * mult // div
        batch.keys.append(self._last_key)
        batch.packets.append(
            self._encode_packet(oid, ts, body[20 : 20 + caplen], orig, encode_options(options)))

    @staticmethod
    def _encode_packet(oid: int, ts: int, data: bytes, orig: int, options: bytes) -> Packet:
        caplen = len(data)
        total = 32 + ((caplen + 3) & -4) + len(options)
        return (
            _EPB_HEAD7.pack(6, total, oid, ts >> 32, ts & 0xFFFFFFFF, caplen, orig),
            data,
            PAD[caplen & 3],
            options,
            _LE_U32.pack(total),
        )

    def _statistics(self, body: bytes, offset: int, batch: Batch) -> None:
        if len(body) < 12:
            raise _Damaged("an interface statistics block is too short")
        local, high, low = _ISB_FIXED[self._order].unpack_from(body)
        if local >= len(self._section):
            raise _Damaged(f"statistics refer to interface {local}, but the section declares "
                           f"{_count(len(self._section), 'interface')}")
        oid = self._section[local][0]
        values: dict[int, int] = {}
        comments: list[str] = []
        u64 = struct.Struct(self._order + "Q")
        pair = struct.Struct(self._order + "II")
        for code, value in self._options(body, 12, b.ISB, offset,
                                         "an interface statistics block"):
            if code == b.OPT_COMMENT:
                comments.append(_text(value))
            elif code in (b.ISB_STARTTIME, b.ISB_ENDTIME) and len(value) == 8:
                hi, lo = pair.unpack(value)
                values[code] = hi << 32 | lo
            elif len(value) == 8:
                values[code] = u64.unpack(value)[0]
        batch.statistics.append(InterfaceStatistics(
            interface_id=oid,
            timestamp=high << 32 | low,
            starttime=values.get(b.ISB_STARTTIME),
            endtime=values.get(b.ISB_ENDTIME),
            ifrecv=values.get(b.ISB_IFRECV),
            ifdrop=values.get(b.ISB_IFDROP),
            filteraccept=values.get(b.ISB_FILTERACCEPT),
            osdrop=values.get(b.ISB_OSDROP),
            usrdeliv=values.get(b.ISB_USRDELIV),
            comments=tuple(comments),
        ))

    def _names(self, body: bytes, offset: int, batch: Batch) -> None:
        unpack = _OPTION_HEADER[self._order].unpack_from
        records: list[NameRecord] = []
        at = 0
        while True:
            if at + 4 > len(body):
                raise _Damaged("a name resolution block has no end record")
            kind, size = unpack(body, at)
            value_end = at + 4 + size
            if value_end > len(body):
                raise _Damaged(f"a name record claims {size} bytes, but only "
                               f"{len(body) - at - 4} are left in its block")
            value = body[at + 4 : value_end]
            at = value_end + (-size & 3)
            if kind == b.NRB_RECORD_END:
                break
            width = {b.NRB_RECORD_IPV4: 4, b.NRB_RECORD_IPV6: 16}.get(kind)
            if width is None:
                continue  # a record type this reader does not know: skipped
            if size < width + 1:
                raise _Damaged(f"a name record of {size} bytes is too short for its address")
            names = tuple(
                name.decode("utf-8", errors="replace")
                for name in value[width:].split(b"\0") if name
            )
            records.append(NameRecord(address=value[:width], names=names))
        options = self._to_le(self._options(body, at, b.NRB, offset,
                                            "a name resolution block"), b.NRB)
        batch.names.append(NameBlock(records=records, options=tuple(options)))


def _flatten(batch: Batch) -> None:
    """Move the packets of a flat batch that a tuple-making path produced to its pieces."""
    # every packet's first piece starts with its EPB's type and total length
    heads = map(_LE_U32.unpack_from, map(itemgetter(0), batch.packets), repeat(4))
    sizes = map(itemgetter(0), heads)
    start = batch.ends[-1] if batch.ends else 0
    batch.ends.extend(accumulate(sizes, initial=start))
    del batch.ends[-len(batch.packets) - 1]
    batch.pieces.extend(chain.from_iterable(batch.packets))
    batch.packets = []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


_MAX_TS = (1 << 64) - 1


class _Damaged(Exception):
    """Internal: a block is damaged inside; it is left out and reading goes on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def packet_fields(packet: Packet) -> tuple[int, int, int, int]:
    """(interface id, timestamp, captured length, original length) of a transcoded packet."""
    head = packet[0]
    if len(head) < 28:
        head = b"".join(packet)[:28]
    oid, high, low, caplen, orig = _EPB_FIXED["<"].unpack_from(head, 8)
    return oid, high << 32 | low, caplen, orig
