"""The pcapng encoders: what we write reads back the same, field by field."""

from __future__ import annotations

import struct

import pytest
from test_pcap_reading import decode, packets_of, read_all

from multisniff import __version__
from multisniff.pcap.blocks import InterfaceInfo, InterfaceStatistics, NameBlock, NameRecord
from multisniff.pcap.writing import (
    PcapngWriter,
    default_shb,
    encode_epb,
    encode_isb,
    encode_nrb,
    encode_options,
)

pytestmark = pytest.mark.usefixtures("pcap_core")


def shb_options(shb: bytes) -> dict[int, bytes]:
    total = struct.unpack_from("<I", shb, 4)[0]
    assert struct.unpack_from("<I", shb, total - 4)[0] == total == len(shb)
    options, at = {}, 24
    while True:
        code, size = struct.unpack_from("<HH", shb, at)
        if code == 0:
            return options
        options[code] = shb[at + 4 : at + 4 + size]
        at += 4 + size + (-size & 3)


def test_shb_names_the_application_os_and_hardware() -> None:
    options = shb_options(default_shb())
    assert options[4] == f"multisniff {__version__}".encode()
    assert options[3] and options[2]


def test_interfaces_round_trip_with_all_options_and_can_be_added_mid_stream() -> None:
    writer = PcapngWriter()
    first = InterfaceInfo(linktype=1, snaplen=262144, name="web-1", description="eth0 of web-1",
                          tsresol=9, filter="udp port 53", os="Linux 6.1", fcslen=4,
                          hardware="virtio", other_options=((6, b"\x02\0\0\0\0\1"),))
    assert writer.add_interface(first) == 0
    writer.add_block(encode_epb(0, 1_700_000_000_123_456_789, b"payload", original_length=99))
    second = InterfaceInfo(linktype=276, name="db-0")
    assert writer.add_interface(second) == 1
    writer.add_block(encode_epb(1, 42, b"", options=encode_options([(1, b"note")])))
    reader, batches = read_all(writer.take())
    assert reader.finish() is None
    assert reader.interfaces == [first, second]
    assert packets_of(batches) == [
        (0, 1_700_000_000_123_456_789, b"payload", 99, b""),
        (1, 42, b"", 0, encode_options([(1, b"note")])),
    ]
    assert writer.take() == b""


def test_epb_timestamps_and_lengths_are_exact() -> None:
    block = encode_epb(3, (1 << 63) + 5, b"abcde", original_length=1 << 31)
    assert decode((block,)) == (3, (1 << 63) + 5, b"abcde", 1 << 31, b"")


def test_nrb_and_isb_round_trip() -> None:
    writer = PcapngWriter()
    writer.add_interface(InterfaceInfo(linktype=1))
    names = NameBlock(records=[NameRecord(b"\x0a\0\0\x01", ("api", "api.default")),
                               NameRecord(bytes(range(16)), ("v6",))])
    stats = InterfaceStatistics(interface_id=0, timestamp=77, starttime=10, endtime=(1 << 40) + 3,
                                ifrecv=100, ifdrop=1, osdrop=2)
    writer.add_block(encode_nrb(names))
    writer.add_block(encode_isb(stats))
    reader, batches = read_all(writer.take())
    assert reader.finish() is None
    [read_names] = [n for batch in batches for n in batch.names]
    assert read_names.records == names.records
    [read_stats] = [s for batch in batches for s in batch.statistics]
    assert read_stats == stats
    assert read_stats.dropped == 3
