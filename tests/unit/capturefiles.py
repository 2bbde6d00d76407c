"""Capture files built byte by byte for the tests, straight from the specifications.

Independent of multisniff.pcap.writing on purpose: the reader is tested against bytes laid out
here, not against our own encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence


def pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) & 3)


# --- classic pcap -----------------------------------------------------------------------------


def pcap_file(
    records: Iterable[tuple[int, int, bytes, int]],
    *,
    order: str = "<",
    nano: bool = False,
    linktype: int = 1,
    snaplen: int = 65535,
) -> bytes:
    """records: (seconds, fraction, data, original length)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    parts = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for sec, frac, data, orig in records:
        parts.append(struct.pack(order + "IIII", sec, frac, len(data), orig))
        parts.append(data)
    return b"".join(parts)


# --- pcapng -----------------------------------------------------------------------------------


def options(items: Sequence[tuple[int, bytes]], order: str = "<") -> bytes:
    if not items:
        return b""
    parts = [struct.pack(order + "HH", code, len(value)) + pad4(value) for code, value in items]
    return b"".join(parts) + b"\0\0\0\0"


def block(block_type: int, body: bytes, order: str = "<") -> bytes:
    body = pad4(body)
    total = 12 + len(body)
    return struct.pack(order + "II", block_type, total) + body + struct.pack(order + "I", total)


def shb(order: str = "<", opts: Sequence[tuple[int, bytes]] = ()) -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + options(opts, order)
    return block(0x0A0D0D0A, body, order)


def idb(
    order: str = "<",
    *,
    linktype: int = 1,
    snaplen: int = 0,
    name: str | None = None,
    tsresol: int | None = None,
    tsoffset: int | None = None,
    extra: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    opts: list[tuple[int, bytes]] = []
    if name is not None:
        opts.append((2, name.encode()))
    if tsresol is not None:
        opts.append((9, bytes((tsresol,))))
    if tsoffset is not None:
        opts.append((14, struct.pack(order + "q", tsoffset)))
    opts.extend(extra)
    return block(1, struct.pack(order + "HHI", linktype, 0, snaplen) + options(opts, order), order)


def epb(
    iface: int,
    ts: int,
    data: bytes,
    *,
    orig: int | None = None,
    order: str = "<",
    opts: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    body = struct.pack(order + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data),
                       len(data) if orig is None else orig)
    return block(6, body + pad4(data) + options(opts, order), order)


def spb(data: bytes, *, orig: int | None = None, order: str = "<") -> bytes:
    return block(3, struct.pack(order + "I", len(data) if orig is None else orig) + pad4(data),
                 order)


def packet_block(iface: int, ts: int, data: bytes, *, drops: int = 0xFFFF,
                 order: str = "<") -> bytes:
    body = struct.pack(order + "HHIIII", iface, drops, ts >> 32, ts & 0xFFFFFFFF, len(data),
                       len(data))
    return block(2, body + pad4(data), order)


def isb(iface: int, ts: int, *, ifrecv: int | None = None, ifdrop: int | None = None,
        osdrop: int | None = None, order: str = "<") -> bytes:
    opts = [(code, struct.pack(order + "Q", value))
            for code, value in ((4, ifrecv), (5, ifdrop), (7, osdrop)) if value is not None]
    body = struct.pack(order + "III", iface, ts >> 32, ts & 0xFFFFFFFF) + options(opts, order)
    return block(5, body, order)


def nrb(records: Sequence[tuple[bytes, Sequence[str]]], order: str = "<") -> bytes:
    parts = []
    for address, names in records:
        kind = 1 if len(address) == 4 else 2
        value = address + b"".join(name.encode() + b"\0" for name in names)
        parts.append(struct.pack(order + "HH", kind, len(value)) + pad4(value))
    parts.append(b"\0\0\0\0")
    return block(4, b"".join(parts), order)
