"""The compiled reader against the pure-Python one: for the same input in the same chunks,
`feed_flat` must give equal batches (the packet bytes equal, however they are cut into pieces),
and the same error, offset and recovered damage at the end."""

from __future__ import annotations

import struct
from typing import Any

import capturefiles as cf
import damagedfiles
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multisniff.pcap import core
from multisniff.pcap.reading import Batch, CaptureError, CaptureReader, unpack

pytestmark = pytest.mark.skipif(not core.available(), reason="the compiled core is not built")

KEY_RESOLUTIONS = (10**9, 10**6, 10**3, 10**12, 7, 1 << 40)


def _error(error: CaptureError | None) -> Any:
    if error is None:
        return None
    return type(error), str(error), error.offset


def _batch(batch: Batch) -> Any:
    assert batch.flat and not batch.packets
    if batch.packed:  # records=True: the packets' keys and ends are in the pieces
        assert not batch.keys and not batch.ends
        assert all(type(piece).__name__ == "PcapRecords" for piece in batch.pieces)
        assert batch.packed == sum(piece.count for piece in batch.pieces)
        unpack(batch)
    return (batch.keys, batch.interfaces, batch.statistics, batch.names, batch.blocks,
            batch.ends, b"".join(map(bytes, batch.pieces)))


def read(name: str, data: bytes, cuts: list[int], **kwargs: Any) -> Any:
    """Everything a reader of core `name` says about `data` fed in pieces cut at `cuts`."""
    with core.use(name):
        reader = CaptureReader(**kwargs)
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    batches = [_batch(reader.feed_flat(chunk)) for chunk in chunks]
    end = reader.finish()
    return (batches, _error(end), [(_error(r), r.remedy) for r in reader.recovered],
            reader.recovered_count, reader.packets, reader.skipped_blocks, reader.interfaces,
            reader.interface_ids, reader.format)


def assert_same(data: bytes, cuts: list[int], **kwargs: Any) -> None:
    python = read("python", data, cuts, **kwargs)
    compiled = read("compiled", data, cuts, **kwargs)
    assert compiled == python
    # the merger's readers: classic pcap records stay records until the merge copies them
    assert read("compiled", data, cuts, records=True, **kwargs) == python


# --- inputs -----------------------------------------------------------------------------------

payloads = st.binary(min_size=0, max_size=70)


@st.composite
def pcap_files(draw: st.DrawFn) -> bytes:
    order = draw(st.sampled_from("<>"))
    nano = draw(st.booleans())
    records = draw(st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), payloads,
                  st.integers(0, 2**32 - 1)), max_size=12))
    return cf.pcap_file(records, order=order, nano=nano,
                        linktype=draw(st.sampled_from((1, 189, 279, 0x04000001))))


EPB_OPTIONS = st.lists(st.sampled_from([
    (1, b"a comment"), (2, b"\1\0\0\0"), (2, b"\1\0"), (3, b"\2" + bytes(16)),
    (4, bytes(8)), (4, bytes(4)), (5, bytes(8)), (6, bytes(4)), (7, b"\0abc"),
    (7, b"\1" + bytes(8)), (7, b"\2"), (7, b""), (2988, b"\0\0\0\1x"), (2989, b"ab"),
    (99, b"unknown"),
]), max_size=3)


@st.composite
def pcapng_files(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        order = draw(st.sampled_from("<<>"))
        parts.append(cf.shb(order))
        interfaces = 0
        for _ in range(draw(st.integers(0, 12))):
            kind = draw(st.sampled_from(
                ["idb", "epb", "epb", "epb", "epb", "spb", "pb", "isb", "nrb", "other"]))
            if kind == "idb" or (kind == "epb" and interfaces == 0 and draw(st.booleans())):
                parts.append(cf.idb(
                    order, linktype=draw(st.sampled_from((1, 189))),
                    snaplen=draw(st.sampled_from((0, 4, 65535))),
                    tsresol=draw(st.sampled_from((None, 6, 9, 3, 0x83, 0x9F))),
                    tsoffset=draw(st.sampled_from((None, 0, -10, 1_000_000, 10**13)))))
                interfaces += 1
            elif kind == "epb":
                local = draw(st.integers(0, interfaces))  # one past the end now and then
                parts.append(cf.epb(local, draw(st.integers(0, 2**64 - 1)), draw(payloads),
                                    orig=draw(st.none() | st.integers(0, 2**32 - 1)),
                                    order=order, opts=draw(EPB_OPTIONS)))
            elif kind == "spb":
                parts.append(cf.spb(draw(payloads), order=order))
            elif kind == "pb":
                parts.append(cf.packet_block(draw(st.integers(0, max(interfaces - 1, 0))),
                                             draw(st.integers(0, 2**64 - 1)), draw(payloads),
                                             order=order))
            elif kind == "isb":
                parts.append(cf.isb(draw(st.integers(0, interfaces)), 5, ifdrop=3, order=order))
            elif kind == "nrb":
                parts.append(cf.nrb([(b"\1\2\3\4", ["a.example"])], order=order))
            else:
                parts.append(cf.block(draw(st.sampled_from((0x0A, 0x0BAD, 0x40000BAD, 77))),
                                      draw(st.binary(max_size=20)), order))
    return b"".join(parts)


@st.composite
def damaged(draw: st.DrawFn, files: st.SearchStrategy[bytes]) -> bytes:
    """A file, cut short or with some bytes changed, now and then."""
    data = bytearray(draw(files))
    for _ in range(draw(st.sampled_from((0, 0, 1, 3)))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if data and draw(st.integers(0, 3)) == 0:
        del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


@st.composite
def cuts(draw: st.DrawFn, data: bytes) -> list[int]:
    if not data:
        return []
    how = draw(st.sampled_from(("whole", "random", "small")))
    if how == "whole":
        return []
    if how == "small":
        step = draw(st.integers(1, 40))
        return list(range(step, len(data), step))
    return sorted(set(draw(st.lists(st.integers(1, len(data)), max_size=8))))


# --- tests ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pcap_files_read_the_same_by_both_cores(data: st.DataObject) -> None:
    capture = data.draw(damaged(pcap_files()))
    assert_same(capture, data.draw(cuts(capture)),
                key_resolution=data.draw(st.sampled_from(KEY_RESOLUTIONS)),
                max_packet_size=data.draw(st.sampled_from((None, None, 30, 0, 2**40))))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_pcapng_files_read_the_same_by_both_cores(data: st.DataObject) -> None:
    capture = data.draw(damaged(pcapng_files()))
    assert_same(capture, data.draw(cuts(capture)),
                key_resolution=data.draw(st.sampled_from(KEY_RESOLUTIONS)),
                max_packet_size=data.draw(st.sampled_from((None, None, 30))),
                max_block_size=data.draw(st.sampled_from((16 * 1024 * 1024, 100, 2**70))))


@pytest.mark.parametrize("name", sorted(damagedfiles.ALL))
def test_damaged_files_read_the_same_by_both_cores(name: str) -> None:
    capture = damagedfiles.ALL[name]()
    for cut in ([], [len(capture) // 2], list(range(997, len(capture), 997))[:2000]):
        assert_same(capture, cut)


def test_interface_ids_beyond_32_bits_fail_as_in_python() -> None:
    capture = cf.shb() + cf.idb() + cf.epb(0, 1, b"a")
    outcomes = []
    for name in ("python", "compiled"):
        with core.use(name):
            reader = CaptureReader(assign_interface=lambda info: 1 << 32)
        with pytest.raises(struct.error) as raised:
            reader.feed_flat(capture)
        outcomes.append(str(raised.value))
    assert outcomes[0] == outcomes[1]


def test_the_compiled_loops_take_the_packets() -> None:
    """The compiled reader makes one piece per chunk of clean packets, where the Python one
    makes several per packet: proof that the comparisons above compared two implementations."""
    pcap = cf.pcap_file([(1, n, b"abc", 3) for n in range(50)])
    pcapng = cf.shb() + cf.idb() + b"".join(cf.epb(0, n, b"abc") for n in range(50))
    for capture, header in ((pcap, 24), (pcapng, len(cf.shb() + cf.idb()))):
        with core.use("compiled"):
            reader = CaptureReader()
        reader.feed_flat(capture[:header])
        batch = reader.feed_flat(capture[header:])
        assert len(batch.pieces) == 1 and len(batch.ends) == 50


def test_records_stand_for_the_epbs_the_flat_loop_makes() -> None:
    """A merger's reader hands out classic pcap records as `PcapRecords`: their length, bytes,
    keys and ends are those of the EPBs `pcap_flat` makes, chunk boundaries included; a record
    that the compiled loop cannot take (a key beyond 64 bits) after them in the same batch turns
    the batch into lists, in order."""
    pcap = cf.pcap_file([(1, n, bytes(range(n % 70)), 100) for n in range(300)]
                        + [(2_000_000_000, 5, b"huge key", 8), (2_000_000_000, 6, b"next", 4)])
    with core.use("compiled"):
        flat = CaptureReader(key_resolution=10**10)
        records = CaptureReader(key_resolution=10**10, records=True)
    for a, b in ((0, 24), (24, 5000), (5000, 5001), (5001, 9000), (9000, len(pcap))):
        want, got = flat.feed_flat(pcap[a:b]), records.feed_flat(pcap[a:b])
        pieces: list[Any] = got.pieces
        if b < 9000 and want.keys:
            assert got.packed == len(want.keys) and not got.keys and not got.ends
            assert sum(map(len, pieces)) == want.ends[-1] == pieces[-1].end
            assert pieces[-1].last_key == want.keys[-1]
            assert [list(column) for column in pieces[-1].columns()] == [
                want.keys[-pieces[-1].count:], want.ends[-pieces[-1].count:]]
        if b == len(pcap):  # the two records with keys past 64 bits came after records
            assert got.packed == 0 and got.keys[-2:] == want.keys[-2:]
        if got.packed:
            unpack(got)
        assert (got.keys, got.ends) == (want.keys, want.ends)
        assert b"".join(map(bytes, got.pieces)) == b"".join(want.pieces)
    assert records.packets == flat.packets == 302


def test_python_blocks_between_compiled_runs_keep_their_place() -> None:
    """A simple packet block and a packet block among EPBs, in one flat batch."""
    capture = (cf.shb() + cf.idb() + cf.epb(0, 1, b"a") + cf.spb(b"spb") + cf.epb(0, 2, b"b")
               + cf.packet_block(0, 3, b"pb") + cf.epb(0, 4, b"c", opts=[(2, b"\1\0")])
               + cf.epb(0, 5, b"d"))
    assert_same(capture, [])
    with core.use("compiled"):
        reader = CaptureReader()
    batch = reader.feed_flat(capture)
    assert batch.keys == [1000, 1000, 2000, 3000, 4000, 5000]
    joined = b"".join(batch.pieces)
    starts = [0, *batch.ends[:-1]]
    payloads = [joined[a + 28 : a + 28 + joined[a + 20]] for a in starts]
    assert payloads == [b"a", b"spb", b"b", b"pb", b"c", b"d"]


def test_packets_of_many_interfaces_between_other_blocks() -> None:
    """Every packet on another of 300 interfaces, a block for Python after each."""
    capture = (cf.shb() + b"".join(cf.idb(tsresol=n % 10) for n in range(300))
               + b"".join(cf.epb(n * 7 % 300, n, b"p" * (n % 5)) + cf.isb(n * 7 % 300, n)
                          for n in range(600)))
    assert_same(capture, [])
    assert_same(capture, list(range(4096, len(capture), 4096)))
