"""The vocabulary shared by the pcapng reader, writer and merger: block types, option codes,
interface descriptions and the records that travel between them.

Numbers are from the pcapng specification (draft-ietf-opsawg-pcapng, sections 4.x and the option
tables) and the pcap specification (draft-ietf-opsawg-pcap); the names follow the specification's
own (`if_tsresol`, `isb_ifdrop`, ...) so that they can be looked up there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Block types (pcapng section 11.1).
SHB = 0x0A0D0D0A
IDB = 0x00000001
PACKET_BLOCK = 0x00000002  # obsolete, still read
SPB = 0x00000003
NRB = 0x00000004
ISB = 0x00000005
EPB = 0x00000006
SYSTEMD_JOURNAL = 0x00000009
DSB = 0x0000000A
CUSTOM_COPY = 0x00000BAD
CUSTOM_NOCOPY = 0x40000BAD

BYTE_ORDER_MAGIC = 0x1A2B3C4D

# Options valid in every block.
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
OPT_CUSTOM = (2988, 2989, 19372, 19373)
"""Custom options: a Private Enterprise Number (4 bytes, section byte order), then data."""

# SHB options.
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4

# IDB options.
IF_NAME = 2
IF_DESCRIPTION = 3
IF_IPV4ADDR = 4
IF_IPV6ADDR = 5
IF_MACADDR = 6
IF_EUIADDR = 7
IF_SPEED = 8
IF_TSRESOL = 9
IF_TZONE = 10
IF_FILTER = 11
IF_OS = 12
IF_FCSLEN = 13
IF_TSOFFSET = 14
IF_HARDWARE = 15
IF_TXSPEED = 16
IF_RXSPEED = 17
IF_IANA_TZNAME = 18

# EPB options.
EPB_FLAGS = 2
EPB_HASH = 3
EPB_DROPCOUNT = 4
EPB_PACKETID = 5
EPB_QUEUE = 6
EPB_VERDICT = 7

# NRB records and options.
NRB_RECORD_END = 0
NRB_RECORD_IPV4 = 1
NRB_RECORD_IPV6 = 2

# ISB options.
ISB_STARTTIME = 2
ISB_ENDTIME = 3
ISB_IFRECV = 4
ISB_IFDROP = 5
ISB_FILTERACCEPT = 6
ISB_OSDROP = 7
ISB_USRDELIV = 8

NUMERIC_OPTIONS: dict[int, dict[int, str]] = {
    # block type -> option code -> struct format of its value (for byte-order conversion)
    IDB: {IF_SPEED: "Q", IF_TZONE: "i", IF_TSOFFSET: "q", IF_TXSPEED: "Q", IF_RXSPEED: "Q"},
    EPB: {EPB_FLAGS: "I", EPB_DROPCOUNT: "Q", EPB_PACKETID: "Q", EPB_QUEUE: "I"},
    ISB: {
        ISB_STARTTIME: "II",
        ISB_ENDTIME: "II",
        ISB_IFRECV: "Q",
        ISB_IFDROP: "Q",
        ISB_FILTERACCEPT: "Q",
        ISB_OSDROP: "Q",
        ISB_USRDELIV: "Q",
    },
    PACKET_BLOCK: {EPB_FLAGS: "I"},
}
"""Options whose value is a number: converted when a big-endian section is rewritten
little-endian. Byte strings (names, addresses, hashes, comments) need no conversion; an option
that is neither listed here nor known to be a byte string cannot be converted and is dropped."""

BYTES_OPTIONS: dict[int, frozenset[int]] = {
    SHB: frozenset({SHB_HARDWARE, SHB_OS, SHB_USERAPPL}),
    IDB: frozenset(
        {IF_NAME, IF_DESCRIPTION, IF_IPV4ADDR, IF_IPV6ADDR, IF_MACADDR, IF_EUIADDR, IF_TSRESOL,
         IF_FILTER, IF_OS, IF_FCSLEN, IF_HARDWARE, IF_IANA_TZNAME}
    ),
    EPB: frozenset({EPB_HASH, EPB_VERDICT}),
    PACKET_BLOCK: frozenset({EPB_HASH}),
    NRB: frozenset({2, 3, 4}),  # ns_dnsname, ns_dnsIP4addr, ns_dnsIP6addr
    ISB: frozenset(),
}

DEFAULT_TSRESOL = 6
"""if_tsresol when the option is absent: microseconds."""

MAX_PACKET_SIZE_STANDARD = 262_144
"""The largest packet Wireshark and libpcap read for most link types (WTAP_MAX_PACKET_SIZE_STANDARD,
also tcpdump's default snapshot length)."""

_MAX_PACKET_SIZE_BY_LINKTYPE = {
    186: 128 * 1024 * 1024,  # USB_FREEBSD
    189: 128 * 1024 * 1024,  # USB_LINUX
    220: 128 * 1024 * 1024,  # USB_LINUX_MMAPPED
    231: 128 * 1024 * 1024,  # DBUS
    249: 128 * 1024 * 1024,  # USBPCAP
    266: 128 * 1024 * 1024,  # USB_DARWIN
    279: 8 * 1024 * 1024,  # EBHSCR
}


def max_packet_size(linktype: int) -> int:
    """The largest captured length Wireshark (4.0) reads for a link type; a larger packet makes
    it call the whole file damaged. Measured with capinfos for every type listed here."""
    return _MAX_PACKET_SIZE_BY_LINKTYPE.get(linktype, MAX_PACKET_SIZE_STANDARD)


_FIXED_SIZE_OPTIONS = {
    EPB_FLAGS: 4, EPB_DROPCOUNT: 8, EPB_PACKETID: 8, EPB_QUEUE: 4,
}
_PACKET_BLOCKS = (EPB, PACKET_BLOCK, SPB)


def option_is_valid(block_type: int, code: int, value: bytes) -> bool:
    """Whether Wireshark (4.0) reads this option without calling the file damaged: what a
    reader may pass on. Found by feeding capinfos every code with every short length; options
    not named here are accepted whatever their length."""
    if code in OPT_CUSTOM:
        return len(value) >= 4  # the Private Enterprise Number
    if block_type in _PACKET_BLOCKS:
        size = _FIXED_SIZE_OPTIONS.get(code)
        if size is not None:
            return len(value) == size
        if code == EPB_VERDICT:
            # type 0 (hardware) is opaque; 1 (Linux tc) and 2 (XDP) carry one 64-bit value
            return len(value) >= 1 and (value[0] not in (1, 2) or len(value) == 9)
    elif block_type == IDB and code == IF_FILTER:
        return len(value) >= 1  # the first byte says what kind of filter follows
    return True


def units_per_second(tsresol: int) -> int:
    """if_tsresol (one byte) -> timestamp units per second: 10**n, or 2**n when the MSB is set."""
    if tsresol & 0x80:
        return 1 << (tsresol & 0x7F)
    return int(10**tsresol)


def format_timestamp(ts: int, tsresol: int) -> str:
    """Exact decimal seconds for a timestamp in if_tsresol units, e.g. "1700000000.000001234".

    A string, not a float: a float has 53 bits, and nanoseconds since 1970 need 61. Binary
    resolutions (2**-n) are written with n decimal places, which represents them exactly.
    """
    if tsresol & 0x80:
        bits = tsresol & 0x7F
        places = bits
        scaled = ts * 5**bits  # ts / 2**n == ts * 5**n / 10**n
    else:
        places = tsresol
        scaled = ts
    sign = "-" if scaled < 0 else ""
    scaled = abs(scaled)
    if places == 0:
        return f"{sign}{scaled}"
    seconds, fraction = divmod(scaled, 10**places)
    return f"{sign}{seconds}.{fraction:0{places}d}"


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """One capture interface as an IDB describes it.

    Strings are the text of the options; `tsresol` is the raw if_tsresol byte (6: microseconds,
    9: nanoseconds, 0x80|n: 2**-n). Options this class does not name are kept in `other_options`
    as (code, little-endian value) pairs so that they survive a merge.
    """

    linktype: int
    snaplen: int = 0
    name: str | None = None
    description: str | None = None
    tsresol: int = DEFAULT_TSRESOL
    filter: str | None = None
    os: str | None = None
    fcslen: int | None = None
    hardware: str | None = None
    tsoffset: int = 0
    """if_tsoffset in seconds: added to every timestamp of the interface to get the time.
    Kept, not folded into the timestamps, so that every timestamp stays the 64-bit value of the
    input, whatever the offset."""
    other_options: tuple[tuple[int, bytes], ...] = ()

    @property
    def units_per_second(self) -> int:
        return units_per_second(self.tsresol)


@dataclass(frozen=True, slots=True)
class InterfaceStatistics:
    """What an ISB says about one interface; counters are None when the option is absent.

    Timestamps (`timestamp`, `starttime`, `endtime`) are in the interface's if_tsresol units,
    as the block holds them (the interface's if_tsoffset not added).
    """

    interface_id: int
    timestamp: int
    starttime: int | None = None
    endtime: int | None = None
    ifrecv: int | None = None
    ifdrop: int | None = None
    filteraccept: int | None = None
    osdrop: int | None = None
    usrdeliv: int | None = None
    comments: tuple[str, ...] = ()

    @property
    def dropped(self) -> int | None:
        """Packets lost by the interface and by the OS together; None when neither is known."""
        if self.ifdrop is None and self.osdrop is None:
            return None
        return (self.ifdrop or 0) + (self.osdrop or 0)


@dataclass(frozen=True, slots=True)
class NameRecord:
    """One NRB record: an IPv4 (4 bytes) or IPv6 (16 bytes) address and its names."""

    address: bytes
    names: tuple[str, ...]


@dataclass(slots=True)
class NameBlock:
    """One NRB: its records, and its options kept as (code, little-endian value) pairs."""

    records: list[NameRecord] = field(default_factory=list)
    options: tuple[tuple[int, bytes], ...] = ()


PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
"""Zero bytes that pad a field of length n to a multiple of 4: PAD[n & 3]."""

U32_LE = struct.Struct("<I")
