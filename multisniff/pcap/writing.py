"""pcapng block encoders and the stateful writer of one output section.

Everything is written little-endian in a single section: one SHB, then IDBs (added at any time,
also between packets), EPBs, NRBs and ISBs. Functions return bytes; nothing here does IO.

EPBs are normally not encoded here one by one: the readers (reading.py) transcode their input
straight into EPB pieces, which is the hot path of a merge. `encode_epb` exists for the capture
engine's own packets, for tests and for the slow paths.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from multisniff._version import __version__
from multisniff.pcap import blocks as b
from multisniff.pcap.blocks import (
    PAD,
    InterfaceInfo,
    InterfaceStatistics,
    NameBlock,
)

Block = bytes | bytearray | memoryview
"""An encoded block, or a piece of one, or several in a row, as the writer queues them."""

_BLOCK_HEADER = struct.Struct("<II")
_SHB_FIXED = struct.Struct("<IIIHHq")
_IDB_FIXED = struct.Struct("<IIHHI")
_EPB_FIXED = struct.Struct("<IIIIIII")
_ISB_FIXED = struct.Struct("<IIIII")
_OPTION_HEADER = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TS = struct.Struct("<II")


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """(code, value) pairs -> the options area of a block, ended by opt_endofopt when not empty."""
    parts: list[bytes] = []
    for code, value in options:
        parts.append(_OPTION_HEADER.pack(code, len(value)))
        parts.append(value)
        parts.append(PAD[len(value) & 3])
    if parts:
        parts.append(b"\0\0\0\0")
    return b"".join(parts)


def _text(code: int, value: str | None) -> list[tuple[int, bytes]]:
    return [] if value is None else [(code, value.encode("utf-8"))]


def encode_block(block_type: int, body: bytes) -> bytes:
    """Frame a body (already a multiple of 4 bytes long) as a block with both length fields."""
    total = 12 + len(body)
    return b"".join((_BLOCK_HEADER.pack(block_type, total), body, _U32.pack(total)))


def encode_shb(
    *,
    userappl: str | None = None,
    os: str | None = None,
    hardware: str | None = None,
    comment: str | None = None,
) -> bytes:
    """A Section Header Block, little-endian, version 1.0, section length unknown (-1)."""
    options = encode_options(
        _text(b.OPT_COMMENT, comment)
        + _text(b.SHB_HARDWARE, hardware)
        + _text(b.SHB_OS, os)
        + _text(b.SHB_USERAPPL, userappl)
    )
    total = 28 + len(options)
    return b"".join(
        (_SHB_FIXED.pack(b.SHB, total, b.BYTE_ORDER_MAGIC, 1, 0, -1), options, _U32.pack(total))
    )


def default_shb() -> bytes:
    """The SHB multisniff writes: who wrote the file, on which OS and machine (what
    platform.system(), release() and machine() say on POSIX, without importing platform, which
    every `multisniff merge` would pay for in start-up time and memory)."""
    system = os.uname()
    return encode_shb(
        userappl=f"multisniff {__version__}",
        os=f"{system.sysname} {system.release}".strip() or None,
        hardware=system.machine or None,
    )


def idb_options(info: InterfaceInfo) -> list[tuple[int, bytes]]:
    options = _text(b.IF_NAME, info.name) + _text(b.IF_DESCRIPTION, info.description)
    if info.tsresol != b.DEFAULT_TSRESOL:
        options.append((b.IF_TSRESOL, bytes((info.tsresol,))))
    if info.filter is not None:
        # The first byte says what follows: 0 is a libpcap filter string (pcapng 4.2).
        options.append((b.IF_FILTER, b"\0" + info.filter.encode("utf-8")))
    options += _text(b.IF_OS, info.os)
    if info.fcslen is not None:
        options.append((b.IF_FCSLEN, bytes((info.fcslen,))))
    options += _text(b.IF_HARDWARE, info.hardware)
    if info.tsoffset:
        options.append((b.IF_TSOFFSET, struct.pack("<q", info.tsoffset)))
    options += info.other_options
    return options


def encode_idb(info: InterfaceInfo) -> bytes:
    """An Interface Description Block; if_tsresol is written only when not microseconds."""
    options = encode_options(idb_options(info))
    total = 20 + len(options)
    return b"".join(
        (
            _IDB_FIXED.pack(b.IDB, total, info.linktype, 0, info.snaplen),
            options,
            _U32.pack(total),
        )
    )


def encode_epb(
    interface_id: int,
    timestamp: int,
    data: bytes,
    *,
    original_length: int | None = None,
    options: bytes = b"",
) -> bytes:
    """An Enhanced Packet Block. `timestamp` is an integer in the interface's if_tsresol units;
    `options` is an already encoded options area (see encode_options)."""
    caplen = len(data)
    total = 32 + caplen + (-caplen & 3) + len(options)
    return b"".join(
        (
            _EPB_FIXED.pack(
                b.EPB,
                total,
                interface_id,
                timestamp >> 32,
                timestamp & 0xFFFFFFFF,
                caplen,
                caplen if original_length is None else original_length,
            ),
            data,
            PAD[caplen & 3],
            options,
            _U32.pack(total),
        )
    )


def encode_nrb(block: NameBlock) -> bytes:
    """A Name Resolution Block: IPv4 and IPv6 records, then the end record and the options."""
    parts: list[bytes] = []
    for record in block.records:
        if len(record.address) == 4:
            kind = b.NRB_RECORD_IPV4
        elif len(record.address) == 16:
            kind = b.NRB_RECORD_IPV6
        else:
            raise ValueError(f"an NRB address has 4 or 16 bytes, not {len(record.address)}")
        value = record.address + b"".join(name.encode("utf-8") + b"\0" for name in record.names)
        parts.append(_OPTION_HEADER.pack(kind, len(value)))
        parts.append(value)
        parts.append(PAD[len(value) & 3])
    parts.append(b"\0\0\0\0")  # nrb_record_end
    parts.append(encode_options(block.options))
    return encode_block(b.NRB, b"".join(parts))


def encode_isb(stats: InterfaceStatistics) -> bytes:
    """An Interface Statistics Block with the counters that are known."""
    options: list[tuple[int, bytes]] = [
        (b.OPT_COMMENT, text.encode("utf-8")) for text in stats.comments
    ]
    for code, value in (
        (b.ISB_STARTTIME, stats.starttime),
        (b.ISB_ENDTIME, stats.endtime),
    ):
        if value is not None:
            options.append((code, _TS.pack(value >> 32, value & 0xFFFFFFFF)))
    for code, value in (
        (b.ISB_IFRECV, stats.ifrecv),
        (b.ISB_IFDROP, stats.ifdrop),
        (b.ISB_FILTERACCEPT, stats.filteraccept),
        (b.ISB_OSDROP, stats.osdrop),
        (b.ISB_USRDELIV, stats.usrdeliv),
    ):
        if value is not None:
            options.append((code, _U64.pack(value)))
    encoded = encode_options(options)
    total = 24 + len(encoded)
    return b"".join(
        (
            _ISB_FIXED.pack(
                b.ISB,
                total,
                stats.interface_id,
                stats.timestamp >> 32,
                stats.timestamp & 0xFFFFFFFF,
            ),
            encoded,
            _U32.pack(total),
        )
    )


class PcapngWriter:
    """One output section: hands out interface ids and collects encoded blocks until taken.

    The SHB comes first; interfaces may be added at any time, each IDB is queued before any
    packet that can refer to it. `take()` returns everything queued so far as one bytes object.
    """

    def __init__(self, *, shb: bytes | None = None) -> None:
        self._pending: list[Block] = [default_shb() if shb is None else shb]
        self.interfaces: list[InterfaceInfo] = []

    def add_interface(self, info: InterfaceInfo) -> int:
        """Queue an IDB and return the interface id that packets must use."""
        self.interfaces.append(info)
        self._pending.append(encode_idb(info))
        return len(self.interfaces) - 1

    def add_block(self, block: bytes) -> None:
        """Queue an already encoded little-endian block (EPBs, NRB, ISB, passthrough)."""
        self._pending.append(block)

    def add_blocks(self, blocks: Iterable[Block]) -> None:
        self._pending.extend(blocks)

    def add_statistics(self, stats: InterfaceStatistics) -> None:
        self._pending.append(encode_isb(stats))

    def take_blocks(self) -> list[Block]:
        """Like `take`, but the queued blocks as they are, for a vectored write."""
        pending = self._pending
        self._pending = []
        return pending

    def take(self) -> bytes:
        """Everything queued since the last call, in order."""
        if not self._pending:
            return b""
        data = b"".join(self._pending)
        self._pending.clear()
        return data
