"""The merger: mergecap's order in exact mode, the reorder window in live mode, names, memory."""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable

import capturefiles as cf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pcap_reading import packets_of, read_all

from multisniff.pcap.merging import TimelineMerger

pytestmark = pytest.mark.usefixtures("pcap_core")


def source_file(source: int, timestamps: list[int]) -> bytes:
    """A classic pcap whose packet n carries (source, n) so the merged order can be read back."""
    return cf.pcap_file(
        [(ts // 10**6, ts % 10**6, struct.pack(">HI", source, n), 6)
         for n, ts in enumerate(timestamps)])


def heads_merge(streams: list[list[int]]) -> list[tuple[int, int]]:
    """The reference: repeatedly take the earliest next packet; ties to the lower input."""
    positions = [0] * len(streams)
    order = []
    while True:
        best = None
        for index, stream in enumerate(streams):
            if positions[index] < len(stream) and (
                    best is None or stream[positions[index]] < streams[best][positions[best]]):
                best = index
        if best is None:
            return order
        order.append((best, positions[best]))
        positions[best] += 1


def merge_exact(files: list[bytes], chunk: int, labels: list[str] | None = None,
                multi: list[bool] | None = None,
                watch: Callable[[TimelineMerger], None] | None = None,
                limit: int | None = None) -> tuple[bytes, TimelineMerger, int]:
    """Merge `files` fed `chunk` bytes at a time, as the merger asks, pulling `limit` bytes at a
    time; `watch` sees the merger after every pull."""
    merger = TimelineMerger(key_resolution=10**6)
    sources = [merger.add_source(labels[i] if labels else f"in{i}",
                                 multi_interface=bool(multi and multi[i]))
               for i in range(len(files))]
    offsets = [0] * len(files)
    out = []
    most_pending = 0

    def step(i: int) -> None:
        data = files[i][offsets[i] : offsets[i] + chunk]
        offsets[i] += len(data)
        if data:
            merger.feed(sources[i], data)
        else:
            merger.end_source(sources[i])

    for i in range(len(files)):
        step(i)
    while True:
        out.append(merger.pull(limit))
        while merger.held_back:
            out.append(merger.pull(limit))
        most_pending = max(most_pending, sum(source.pending for source in merger.sources))
        if watch is not None:
            watch(merger)
        wanted = merger.wanted()
        assert merger.upcoming(3)[:1] == ([] if wanted is None else [wanted])
        if wanted is None:
            break
        step(wanted.index)
    out.append(merger.finish())
    return b"".join(out), merger, most_pending


def order_of(merged: bytes) -> list[tuple[int, int]]:
    reader, batches = read_all(merged)
    assert reader.finish() is None
    return [struct.unpack(">HI", packet[2]) for packet in packets_of(batches)]


timelines = st.lists(st.lists(st.integers(min_value=0, max_value=50), max_size=30),
                     min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(timelines, st.integers(min_value=1, max_value=200), st.booleans())
def test_exact_mode_gives_mergecaps_order(streams: list[list[int]], chunk: int,
                                          sort_each: bool) -> None:
    if sort_each:
        streams = [sorted(stream) for stream in streams]
    files = [source_file(i, [10**6 + ts for ts in stream]) for i, stream in enumerate(streams)]
    merged, merger, _ = merge_exact(files, chunk)
    assert order_of(merged) == heads_merge(streams)
    assert merger.packets_written == sum(map(len, streams))


@settings(max_examples=100, deadline=None)
@given(timelines, st.integers(min_value=1, max_value=200), st.sampled_from([1, 30, 100, 1000]))
def test_pulls_with_a_limit_give_the_same_file_a_bounded_piece_at_a_time(
        streams: list[list[int]], chunk: int, limit: int) -> None:
    files = [source_file(i, [10**6 + ts for ts in stream]) for i, stream in enumerate(streams)]
    merged, _, _ = merge_exact(files, chunk)
    pieces: list[bytes] = []

    def watch(merger: TimelineMerger) -> None:
        pieces.append(merger.pull(limit))  # nothing is left to pull after a merge step
        assert not pieces[-1] and not merger.held_back

    limited, merger, _ = merge_exact(files, chunk, limit=limit, watch=watch)
    assert limited == merged
    assert merger.packets_written == sum(map(len, streams))
    with pytest.raises(ValueError):
        merger.pull(0)


def test_a_pull_with_a_limit_stops_at_the_packet_that_reaches_it() -> None:
    streams = [[2 * n for n in range(100)], [2 * n + 1 for n in range(100)]]
    files = [source_file(i, [10**6 + ts for ts in stream]) for i, stream in enumerate(streams)]
    epb = 28 + 8 + 4  # 6 bytes of packet padded to 8
    merged, _, _ = merge_exact(files, 1 << 20)
    header = len(merged) - 200 * epb  # the SHB and both IDBs
    merger = TimelineMerger(key_resolution=10**6)
    sources = [merger.add_source(f"in{i}") for i in range(2)]
    for source, data in zip(sources, files, strict=True):
        merger.feed(source, data)
        merger.end_source(source)
    pieces = []
    while True:
        pieces.append(merger.pull(3 * epb - 1))
        if not merger.held_back:
            break
    assert b"".join(pieces) == merged
    # the third packet of each pull reaches the limit
    assert len(pieces[0]) == header + 3 * epb
    assert {len(piece) for piece in pieces[1:-1]} == {3 * epb}
    assert len(pieces) == 67 and len(pieces[-1]) == 2 * epb
    assert merger.packets_written == 200


def test_long_interleaved_and_bursty_timelines() -> None:
    interleaved = [[3 * n + i for n in range(2000)] for i in range(3)]
    bursty = [[n + 1000 * (n // 50) * 3 + 50 * i * 0 + i * 50 + (n // 50) * 0 for n in
               range(1500)] for i in range(3)]
    for streams in (interleaved, bursty):
        files = [source_file(i, stream) for i, stream in enumerate(streams)]
        merged, _, most_pending = merge_exact(files, 4096)
        assert order_of(merged) == heads_merge(streams)
        # memory: about one chunk of packets per source, not the whole input
        assert most_pending < 3 * 4096 // 20


def test_interface_names_are_labels_or_label_and_name_and_unique() -> None:
    multi = cf.shb() + cf.idb(name="eth0") + cf.idb() + cf.epb(1, 5, b"x")
    files = [cf.pcap_file([(1, 0, b"a", 1)]), cf.pcap_file([(1, 1, b"b", 1)]), multi]
    merged, _, _ = merge_exact(files, 100, labels=["web", "web", "db"],
                                    multi=[False, False, True])
    reader, _ = read_all(merged)
    assert [i.name for i in reader.interfaces] == ["web", "web#2", "db:eth0", "db:1"]
    assert reader.interfaces[2].description == "eth0"


def test_a_damaged_source_keeps_its_packets_and_the_others_continue() -> None:
    good = source_file(0, [10**6 + n for n in range(10)])
    damaged = source_file(1, [10**6 + n for n in range(10)])[:-3]
    merged, merger, _ = merge_exact([good, damaged], 50)
    order = order_of(merged)
    assert sum(1 for s, _ in order if s == 0) == 10
    assert sum(1 for s, _ in order if s == 1) == 9
    assert merger.sources[1].error is not None and merger.sources[0].error is None


# --- live mode --------------------------------------------------------------------------------


def live_packets(merger: TimelineMerger, data: bytes) -> list[tuple[int, int]]:
    return order_of(data) if data else []


def test_live_mode_waits_for_every_source_then_releases_by_window() -> None:
    merger = TimelineMerger(reorder_window=50 * 10**9)  # 50 s in ns
    a = merger.add_source("a")
    b = merger.add_source("b")
    out = [merger.pull()]
    merger.feed(a, source_file(0, [10 * 10**6, 20 * 10**6]))
    out.append(merger.pull())
    # b has said nothing yet and the window has not passed: nothing may be written
    assert order_of(b"".join(out)) == []
    merger.feed(b, source_file(1, [15 * 10**6]))
    out.append(merger.pull())
    assert order_of(b"".join(out)) == [(0, 0), (1, 0)]
    # b goes quiet; the clock moves on past the window: a's held packet comes out
    merger.advance(71 * 10**9)
    out.append(merger.pull())
    assert order_of(b"".join(out)) == [(0, 0), (1, 0), (0, 1)]
    out.append(merger.finish())
    assert merger.late_packets == 0


def test_live_mode_counts_late_packets_and_still_writes_them() -> None:
    merger = TimelineMerger(reorder_window=1_000_000_000)
    a = merger.add_source("a")
    merger.feed(a, source_file(0, [100 * 10**6]))
    merger.advance(200 * 10**9)
    out = [merger.pull()]
    b = merger.add_source("b")
    merger.feed(b, source_file(1, [50 * 10**6, 300 * 10**6]))
    out.append(merger.pull())
    out.append(merger.finish())
    assert merger.late_packets == 1
    assert order_of(b"".join(out)) == [(0, 0), (1, 0), (1, 1)]


def test_live_mode_caught_up_sources_do_not_hold_the_others() -> None:
    merger = TimelineMerger(reorder_window=10**12)
    a = merger.add_source("a")
    b = merger.add_source("b")
    merger.feed(a, source_file(0, [1 * 10**6, 2 * 10**6]))
    merger.mark_caught_up(b, 3 * 10**9)
    assert order_of(merger.pull()) == [(0, 0), (0, 1)]
    merger.remove_source(b)
    assert merger.finish() == b""


def test_live_mode_memory_is_bounded_by_max_pending() -> None:
    merger = TimelineMerger(reorder_window=10**15, max_pending=100)
    a = merger.add_source("a")
    merger.add_source("idle")
    written = 0
    for start in range(0, 1000, 50):
        merger.feed(a, source_file(0, [10**6 + n for n in range(start, start + 50)])[
            24 if start else 0:])
        merger.pull()
        written = merger.packets_written
        assert sum(source.pending for source in merger.sources) <= 100
    assert written >= 900
    assert merger.forced > 0
    merger.finish()
    assert merger.packets_written == 1000


class Hang(Exception):
    pass


def test_live_mode_bound_holds_when_the_fullest_source_is_below_the_horizon() -> None:
    # Found by test_core_differential: _bounded moved the horizon to the middle of the source
    # with the most pending packets, which were all below it, and looped forever.
    merger = TimelineMerger(reorder_window=10**15, max_pending=1)
    a = merger.add_source("a")
    b = merger.add_source("b")
    merger.feed(a, source_file(0, [10**6 + n for n in range(10)]))
    merger.feed(b, source_file(1, [10**6 + 100 + n for n in range(3)]))

    def hang(signum: int, frame: object) -> None:
        raise Hang("pull() did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        out = merger.pull()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    order = order_of(out)
    assert order[:10] == [(0, n) for n in range(10)]
    assert order[10:] == [(1, n) for n in range(len(order) - 10)]
    assert sum(source.pending for source in merger.sources) <= 1
    assert merger.forced > 0


@settings(max_examples=50, deadline=None)
@given(timelines, st.integers(min_value=1, max_value=200))
def test_pull_blocks_are_the_pieces_of_pull(streams: list[list[int]], chunk: int) -> None:
    files = [source_file(i, [10**6 + ts for ts in stream]) for i, stream in enumerate(streams)]
    merged, _, _ = merge_exact(files, chunk)
    merger = TimelineMerger(key_resolution=10**6)
    sources = [merger.add_source(f"in{i}") for i in range(len(files))]
    pieces: list[bytes] = []
    for source, data in zip(sources, files, strict=True):
        for start in range(0, len(data), chunk):
            merger.feed(source, data[start : start + chunk])
            pieces.extend(merger.pull_blocks())
    pieces.append(merger.finish())
    assert b"".join(pieces) == merged


def test_exact_mode_holds_about_two_chunks_of_bytes_per_source() -> None:
    streams = [[n + 1000 * (n // 50) * 3 + i * 50 for n in range(1500)] for i in range(3)]
    streams.append([3 * n + 1 for n in range(3000)])  # one finely interleaved source
    files = [source_file(i, stream) for i, stream in enumerate(streams)]
    chunk = 4096
    most_held = 0

    def watch(merger: TimelineMerger) -> None:
        nonlocal most_held
        held = sum(len(blob) for source in merger.sources for _, blob in source.blobs)
        most_held = max(most_held, held)

    merged, _, _ = merge_exact(files, chunk, watch=watch)
    assert order_of(merged) == heads_merge(streams)
    # EPBs are at most 19 bytes longer than their records (16 bytes each, 20 at least here)
    assert most_held < len(files) * 3 * chunk * 2
