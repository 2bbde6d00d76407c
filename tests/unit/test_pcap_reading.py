"""The push readers: formats, chunk boundaries, and the three kinds of bad endings."""

from __future__ import annotations

import struct

import capturefiles as cf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multisniff.pcap.reading import (
    Batch,
    CaptureReader,
    CorruptCaptureError,
    NotACaptureError,
    TruncatedCaptureError,
)

pytestmark = pytest.mark.usefixtures("pcap_core")

Decoded = tuple[int, int, bytes, int, bytes]


def decode(packet: tuple[bytes, ...]) -> Decoded:
    """(interface id, timestamp, data, original length, options) of one transcoded EPB."""
    blob = b"".join(packet)
    block_type, total, oid, high, low, caplen, orig = struct.unpack_from("<7I", blob)
    assert block_type == 6
    assert total == len(blob) and total % 4 == 0
    assert struct.unpack_from("<I", blob, total - 4)[0] == total
    options_start = 28 + caplen + (-caplen & 3)
    return oid, high << 32 | low, blob[28 : 28 + caplen], orig, blob[options_start : total - 4]


def read_all(data: bytes, chunks: list[int] | None = None, **kwargs: int) -> tuple[
        CaptureReader, list[Batch]]:
    reader = CaptureReader(**kwargs)
    batches = []
    if chunks is None:
        batches.append(reader.feed(data))
    else:
        at = 0
        for size in chunks:
            batches.append(reader.feed(data[at : at + size]))
            at += size
        batches.append(reader.feed(data[at:]))
    return reader, batches


def packets_of(batches: list[Batch]) -> list[Decoded]:
    return [decode(packet) for batch in batches for packet in batch.packets]


RECORDS = [
    (1_700_000_000, 1, b"\x01" * 60, 60),
    (1_700_000_000, 999_999, b"\x02" * 61, 1514),
    (1_700_000_001, 0, b"", 0),
    (1_700_000_002, 5, b"\x03" * 1514, 1514),
]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_classic_pcap_in_both_byte_orders_and_resolutions(order: str, nano: bool) -> None:
    data = cf.pcap_file(RECORDS, order=order, nano=nano, linktype=113, snaplen=9000)
    reader, batches = read_all(data)
    assert reader.finish() is None
    assert reader.format == "pcap"
    [info] = reader.interfaces
    assert (info.linktype, info.snaplen, info.tsresol) == (113, 9000, 9 if nano else 6)
    units = 10**9 if nano else 10**6
    expected = [(0, sec * units + frac, data, orig, b"") for sec, frac, data, orig in RECORDS]
    assert packets_of(batches) == expected
    keys = [key for batch in batches for key in batch.keys]
    assert keys == [(sec * units + frac) * (10**9 // units) for sec, frac, _, _ in RECORDS]


def test_classic_pcap_linktype_field_carries_the_fcs_length() -> None:
    reader, _ = read_all(cf.pcap_file([], linktype=1 | 0x04000000 | (2 << 28)))
    assert reader.interfaces[0].linktype == 1
    assert reader.interfaces[0].fcslen == 4


def test_packets_longer_than_the_tail_table_are_transcoded() -> None:
    big = bytes(range(256)) * 200  # 51200 bytes, beyond the initial table
    _, batches = read_all(cf.pcap_file([(1, 2, big, 60000), (1, 3, b"x", 1)]))
    assert [p[2] for p in packets_of(batches)] == [big, b"x"]
    assert [key for batch in batches for key in batch.keys] == [1_000_002_000, 1_000_003_000]


DSB_BODY = struct.pack("<II", 0x544C534B, 8) + b"SECRETS!"  # TLS key log, 8 bytes


def sample_pcapng() -> bytes:
    le, be = "<", ">"
    return b"".join([
        cf.shb(le),
        cf.idb(le, name="eth0", snaplen=65535, extra=[(3, b"first nic"), (11, b"\0port 53")]),
        cf.idb(le, name="ns", tsresol=9, tsoffset=10),
        cf.epb(0, 1_700_000_000_000_001, b"abc", orig=100),
        cf.epb(1, 5, b"defg", opts=[(1, b"a comment"), (2, struct.pack("<I", 1))]),
        cf.spb(b"simple!"),  # captured length = min(original length, snaplen)
        cf.block(0x0000000A, DSB_BODY),  # decryption secrets: copied
        cf.block(0x40000BAD, b"\0\0\0\0nocopy"),  # custom, not to be copied
        cf.block(0x00001234, b"unknown"),  # unknown: skipped
        cf.nrb([(b"\x7f\0\0\x01", ["localhost", "lo"]), (b"\0" * 15 + b"\1", ["ip6-lo"])]),
        cf.isb(0, 1_700_000_000_000_009, ifrecv=10, ifdrop=2, osdrop=3),
        # a second section, big-endian, binary resolution 2**-20
        cf.shb(be),
        cf.idb(be, name="be0", tsresol=0x80 | 20, linktype=101),
        cf.epb(0, (3 << 20) + 1, b"BE data", order=be, opts=[(2, struct.pack(">I", 7))]),
        cf.packet_block(0, 2 << 20, b"old", drops=4, order=be),
        cf.isb(0, 9 << 20, ifdrop=5, order=be),
    ])


def test_pcapng_sections_byte_orders_options_and_blocks() -> None:
    data = sample_pcapng()
    reader, batches = read_all(data)
    assert reader.finish() is None
    assert reader.format == "pcapng"
    eth0, ns, be0 = reader.interfaces
    assert (eth0.name, eth0.description, eth0.filter, eth0.snaplen) == (
        "eth0", "first nic", "port 53", 65535)
    assert (ns.name, ns.tsresol) == ("ns", 9)
    assert (be0.name, be0.tsresol, be0.linktype) == ("be0", 0x80 | 20, 101)
    packets = packets_of(batches)
    le_options = cf.options([(1, b"a comment"), (2, struct.pack("<I", 1))])
    assert packets[0] == (0, 1_700_000_000_000_001, b"abc", 100, b"")
    # if_tsoffset (10 s) stays on the interface; the merge key has it
    assert ns.tsoffset == 10
    assert packets[1] == (1, 5, b"defg", 4, le_options)
    # the SPB takes the time of the packet before it, on interface 0
    assert packets[2][0] == 0 and packets[2][2:4] == (b"simple!", 7)
    assert packets[2][1] == 10 * 10**6  # 10 s + 5 ns, floored to microseconds
    assert packets[3] == (2, (3 << 20) + 1, b"BE data", 7, cf.options([(2, b"\7\0\0\0")]))
    assert packets[4] == (2, 2 << 20, b"old", 3, cf.options([(4, struct.pack("<Q", 4))]))
    keys = [key for batch in batches for key in batch.keys]
    assert keys[:2] == [1_700_000_000_000_001_000, 10 * 10**9 + 5]
    assert keys[3] == ((3 << 20) + 1) * 10**9 >> 20
    statistics = [s for batch in batches for s in batch.statistics]
    assert [(s.interface_id, s.ifrecv, s.dropped) for s in statistics] == [
        (0, 10, 5), (2, None, 5)]
    names = [n for batch in batches for n in batch.names]
    assert [(r.address, r.names) for r in names[0].records] == [
        (b"\x7f\0\0\x01", ("localhost", "lo")), (b"\0" * 15 + b"\1", ("ip6-lo",))]
    assert [blk for batch in batches for blk in batch.blocks] == [cf.block(10, DSB_BODY)]
    assert reader.skipped_blocks == 2


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_result(data: st.DataObject) -> None:
    blob = data.draw(st.sampled_from([
        sample_pcapng(),
        cf.pcap_file(RECORDS, nano=True),
        cf.pcap_file(RECORDS, order=">"),
    ]))
    whole_reader, whole = read_all(blob)
    sizes = data.draw(st.lists(st.integers(min_value=0, max_value=len(blob)), max_size=40))
    reader, batches = read_all(blob, sizes)
    assert reader.finish() is None
    assert packets_of(batches) == packets_of(whole)
    assert [k for b in batches for k in b.keys] == [k for b in whole for k in b.keys]
    assert reader.interfaces == whole_reader.interfaces


def test_one_byte_at_a_time() -> None:
    blob = sample_pcapng()
    reader, batches = read_all(blob, [1] * len(blob))
    assert reader.finish() is None
    assert packets_of(batches) == packets_of(read_all(blob)[1])


# --- bad endings ------------------------------------------------------------------------------


def test_empty_input_is_not_a_capture() -> None:
    reader = CaptureReader()
    error = reader.finish()
    assert isinstance(error, NotACaptureError) and error.offset == 0


def test_bad_magic_is_not_a_capture() -> None:
    reader = CaptureReader()
    reader.feed(b"GIF89a........................")
    assert isinstance(reader.error, NotACaptureError)
    assert "47 49 46 38" in str(reader.error)


@pytest.mark.parametrize("cut", [1, 10, 17, 30])
def test_a_stream_cut_mid_packet_is_truncated_and_keeps_what_came_before(cut: int) -> None:
    blob = cf.pcap_file(RECORDS)
    blob = blob[: len(blob) - cut]
    reader, batches = read_all(blob, [7] * (len(blob) // 7))
    error = reader.finish()
    assert isinstance(error, TruncatedCaptureError)
    last_record = 24 + sum(16 + len(r[2]) for r in RECORDS[:-1])
    assert error.offset == last_record
    assert error.expected == 16 + 1514 and error.got == 16 + 1514 - cut
    assert len(packets_of(batches)) == 3


def test_pcapng_cut_inside_a_block_is_truncated() -> None:
    blob = cf.shb() + cf.idb() + cf.epb(0, 1, b"x" * 40)
    reader, _ = read_all(blob[:-5])
    error = reader.finish()
    assert isinstance(error, TruncatedCaptureError)
    assert error.offset == len(cf.shb() + cf.idb())
    assert "enhanced packet block" in error.reason


def corrupt(blob: bytes, at: int, value: int) -> bytes:
    return blob[:at] + struct.pack("<I", value) + blob[at + 4 :]


def test_length_not_a_multiple_of_four_names_the_offset() -> None:
    good = cf.shb() + cf.idb() + cf.epb(0, 1, b"1234")
    bad_at = len(good)
    blob = good + corrupt(cf.epb(0, 2, b"5678"), 4, 38) + cf.epb(0, 3, b"9")
    reader, batches = read_all(blob)
    assert isinstance(reader.error, CorruptCaptureError)
    assert reader.error.offset == bad_at
    assert "not a multiple of 4" in reader.error.reason
    assert [p[2] for p in packets_of(batches)] == [b"1234"]
    assert reader.finish() is reader.error


def test_trailing_length_mismatch_is_corrupt() -> None:
    packet = cf.epb(0, 2, b"5678")
    blob = cf.shb() + cf.idb() + corrupt(packet, len(packet) - 4, 40)
    reader, _ = read_all(blob)
    assert isinstance(reader.error, CorruptCaptureError)
    assert "trailing length 40" in reader.error.reason


def test_a_lying_block_length_is_refused_before_anything_is_buffered() -> None:
    reader = CaptureReader()
    reader.feed(cf.shb() + cf.idb() + struct.pack("<II", 6, 0xFFFFFFF0))
    assert isinstance(reader.error, CorruptCaptureError)
    assert "more than the maximum" in reader.error.reason
    for _ in range(100):
        reader.feed(b"\0" * 65536)  # ignored: memory does not grow
    assert reader._tail == b""


def test_a_lying_pcap_record_length_is_refused() -> None:
    blob = cf.pcap_file([(1, 1, b"ok", 2)]) + struct.pack("<IIII", 1, 2, 10**9, 10**9)
    reader, batches = read_all(blob, [5] * (len(blob) // 5))
    assert isinstance(reader.error, CorruptCaptureError)
    assert reader.error.offset == 24 + 18
    assert len(packets_of(batches)) == 1


def test_a_packet_on_an_undeclared_interface_is_left_out_and_reading_goes_on() -> None:
    reader, batches = read_all(cf.shb() + cf.idb() + cf.epb(3, 1, b"") + cf.epb(0, 2, b"ok"))
    assert reader.finish() is None
    [damage] = reader.recovered
    assert damage.offset == len(cf.shb() + cf.idb())
    assert damage.reason == "a packet refers to interface 3, but the section declares 1 interface"
    assert [p[2] for p in packets_of(batches)] == [b"ok"]


def test_random_garbage_never_raises() -> None:
    import random

    rng = random.Random(7)
    base = sample_pcapng()
    for _ in range(300):
        blob = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        reader = CaptureReader()
        for start in range(0, len(blob), 37):
            reader.feed(bytes(blob[start : start + 37]))
        reader.finish()  # whatever it says, it says it without raising


# --- flat batches -----------------------------------------------------------------------------


@given(st.data())
def test_flat_batches_hold_the_same_epbs_at_any_chunking(data: st.DataObject) -> None:
    blob = data.draw(st.sampled_from([
        sample_pcapng(),
        cf.pcap_file(RECORDS),
        cf.pcap_file(RECORDS, nano=True),
        cf.pcap_file(RECORDS, order=">"),
        cf.pcap_file(RECORDS) + b"\x00" * 20,  # ends inside a record header
    ]))
    whole_reader, whole = read_all(blob)
    sizes = data.draw(st.lists(st.integers(min_value=0, max_value=len(blob)), max_size=40))
    reader = CaptureReader()
    epbs: list[bytes] = []
    keys: list[int] = []
    at = 0
    for size in [*sizes, len(blob)]:
        batch = reader.feed_flat(blob[at : at + size])
        at += size
        assert not batch.packets and batch.flat
        assert len(batch.ends) == len(batch.keys)
        joined = b"".join(batch.pieces)
        assert (batch.ends[-1] if batch.ends else 0) == len(joined)
        starts = [0, *batch.ends][:-1]
        epbs.extend(joined[start:end] for start, end in zip(starts, batch.ends, strict=True))
        keys.extend(batch.keys)
    assert epbs == [b"".join(packet) for batch in whole for packet in batch.packets]
    assert keys == [k for batch in whole for k in batch.keys]
    assert reader.interfaces == whole_reader.interfaces
    assert repr(reader.finish()) == repr(whole_reader.finish())


def test_flat_batch_grows_the_tail_table_for_a_long_packet() -> None:
    long = [(1_700_000_000, 1, b"\x05" * 9000, 9000), *RECORDS]
    blob = cf.pcap_file(long)
    batch = CaptureReader(max_packet_size=262_144).feed_flat(blob)
    whole = CaptureReader().feed(blob)
    assert b"".join(batch.pieces) == b"".join(b"".join(packet) for packet in whole.packets)
