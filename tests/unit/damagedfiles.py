"""Small hand-made captures, each damaged in one of the ways of issue 9, for the unit tests and
for the checks by capinfos and mergecap (tests/integration/test_damage_fuzz.py)."""

from __future__ import annotations

import struct

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
