"""Small hand-made captures, each damaged in one of the ways of issue 9, for the unit tests and
for the checks by capinfos and mergecap (tests/integration/test_damage_fuzz.py); and the bases
and the random damage of the fuzz tests (test_damage_fuzz.py, unit/test_core_differential.py)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import capturefiles as cf

EPB_AT = len(cf.shb() + cf.idb())
"""Byte offset of the first block after the SHB and one IDB without options."""


def packet_block_offset_below_zero() -> bytes:
    """A Packet Block at 5 us on an interface whose if_tsoffset is -10 s, then an EPB."""
    return (cf.shb() + cf.idb(tsoffset=-10) + cf.packet_block(0, 5, b"x" * 20)
            + cf.epb(0, 20_000_000, b"y"))


def packet_block_offset_beyond_64_bits() -> bytes:
    return cf.shb() + cf.idb(tsoffset=10**13) + cf.packet_block(0, (1 << 64) - 5, b"x" * 20)


def epb_offset_below_zero() -> bytes:
    return cf.shb() + cf.idb(tsoffset=-10) + cf.epb(0, 5, b"x") + cf.epb(0, 6, b"y")


def isb(interface: int, ts: int, options: list[tuple[int, bytes]]) -> bytes:
    return cf.block(5, struct.pack("<III", interface, ts >> 32, ts & 0xFFFFFFFF)
                    + cf.options(options))


def statistics_offset_out_of_range(which: str) -> bytes:
    """An ISB whose timestamp, isb_starttime or isb_endtime leaves 0..2**64-1 with the
    interface's if_tsoffset added."""
    if which == "timestamp":
        return (cf.shb() + cf.idb(tsoffset=-10) + cf.epb(0, 20_000_000, b"y")
                + isb(0, 5, [(4, struct.pack("<Q", 1))]))
    if which == "starttime":
        return (cf.shb() + cf.idb(tsoffset=-10) + cf.epb(0, 20_000_000, b"y")
                + isb(0, 20_000_000, [(2, struct.pack("<II", 0, 5))]))
    return (cf.shb() + cf.idb(tsoffset=10**13) + cf.epb(0, 5, b"y")
            + isb(0, 5, [(3, struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFF0))]))


def epb_option_past_its_block() -> bytes:
    """An EPB whose captured length is 0 though 60 more bytes follow, read as options: the
    first claims 255 bytes."""
    body = struct.pack("<IIIII", 0, 0, 2, 0, 0) + struct.pack("<HH", 1, 255) + bytes(56)
    return cf.shb() + cf.idb() + cf.epb(0, 1, b"a") + cf.block(6, body) + cf.epb(0, 3, b"c")


OPTION_BLOCK_AT = EPB_AT + len(cf.epb(0, 1, b"a"))


def packet_of_16_mib(linktype: int = 1) -> bytes:
    return (cf.shb() + cf.idb(linktype=linktype) + cf.epb(0, 1, b"a")
            + cf.epb(0, 2, bytes(16_777_184)) + cf.epb(0, 3, b"c"))


def statistics_for_a_missing_interface() -> bytes:
    """50 packets; after the 19th, an ISB for interface 4 of a section that declares one."""
    return (cf.shb() + cf.idb() + b"".join(cf.epb(0, n, b"p") for n in range(19))
            + cf.isb(4, 20) + b"".join(cf.epb(0, 20 + n, b"p") for n in range(31)))


def names_without_end_record() -> bytes:
    """7 packets; after the 3rd, an NRB whose only record is not followed by the end record."""
    nrb = cf.block(4, struct.pack("<HH", 1, 6) + b"\1\2\3\4n\0" + b"\0\0")
    return (cf.shb() + cf.idb() + b"".join(cf.epb(0, n, b"p") for n in range(3)) + nrb
            + b"".join(cf.epb(0, 3 + n, b"p") for n in range(4)))


def cut_after_one_packet() -> bytes:
    return cf.shb() + cf.idb() + cf.epb(0, 1, b"a") + cf.epb(0, 2, b"b")[:-3]


def many_interfaces(count: int) -> bytes:
    """`count` named interfaces, then one packet on the first and one on the last."""
    return (cf.shb() + b"".join(cf.idb(name=f"if{n}") for n in range(count))
            + cf.epb(0, 1, b"a") + cf.epb(count - 1, 2, b"b"))


ALL = {
    "packet-block-offset-below-zero": packet_block_offset_below_zero,
    "packet-block-offset-beyond-64-bits": packet_block_offset_beyond_64_bits,
    "epb-offset-below-zero": epb_offset_below_zero,
    "statistics-timestamp-out-of-range": lambda: statistics_offset_out_of_range("timestamp"),
    "statistics-starttime-out-of-range": lambda: statistics_offset_out_of_range("starttime"),
    "statistics-endtime-out-of-range": lambda: statistics_offset_out_of_range("endtime"),
    "epb-option-past-its-block": epb_option_past_its_block,
    "packet-of-16-mib": packet_of_16_mib,
    "statistics-for-a-missing-interface": statistics_for_a_missing_interface,
    "names-without-end-record": names_without_end_record,
    "cut-after-one-packet": cut_after_one_packet,
    "many-interfaces": lambda: many_interfaces(1000),
}


# --- bases for the fuzz tests ----------------------------------------------------------------


def generated() -> dict[str, bytes]:
    """Captures with every block type, both byte orders, options, if_tsoffset, nanosecond and
    binary resolutions: the bases that the fuzz tests damage."""
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
    if not data:  # an earlier damage of the same file removed every byte
        return "no byte left to set"
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
    kinds = DAMAGE if shape.blocks else [_flip]  # a file header alone
    said = []
    for _ in range(rng.randint(1, 3)):
        if len(data) != len(base):  # a damage before this one moved the blocks `shape` lists
            break
        said.append(rng.choice(kinds)(rng, data, shape))
    if rng.random() < 0.3 and data:
        cut = rng.randrange(len(data))
        del data[cut:]
        said.append(f"cut at {cut}")
    return bytes(data), said
