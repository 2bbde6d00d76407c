"""The compiled merger against the pure-Python one: the same scripts of feeds, pulls, clock ticks
and ends must give the same bytes at every pull and the same counters, whatever the inputs look
like (interleaved, bursty, equal keys across sources, timestamps going backwards, many or empty
sources, keys beyond 64 bits) and however they are chunked."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from unittest import mock

import capturefiles as cf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multisniff.pcap import core, merging
from multisniff.pcap.merging import TimelineMerger

needs_compiled = pytest.mark.skipif(not core.available(), reason="the compiled core is not built")

HUGE_SECONDS = 2_000_000_000
"""At key_resolution 10**10 a microsecond timestamp this late makes a key beyond 64 bits."""


@dataclass
class Outcome:
    pulls: list[bytes] = field(default_factory=list)
    counters: list[tuple[int, ...]] = field(default_factory=list)


def capture(source: int, stamps: list[tuple[int, int]], pcapng: bool) -> bytes:
    """A capture whose packet n carries (source, n) and `size` bytes more."""
    packets = [(sec, usec, struct.pack(">HI", source, n) + bytes(size))
               for n, ((sec, usec), size) in enumerate(stamps_with_sizes(stamps))]
    if not pcapng:
        return cf.pcap_file([(sec, usec, data, len(data)) for sec, usec, data in packets])
    return cf.shb() + cf.idb() + b"".join(
        cf.epb(0, sec * 10**6 + usec, data) for sec, usec, data in packets)


def stamps_with_sizes(stamps: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    return [((tick // 1000, tick % 1000 * 1000), size) for tick, size in stamps]


def counters(merger: TimelineMerger) -> tuple[int, ...]:
    return (merger.packets_written, merger.late_packets, merger.forced, int(merger.held_back),
            *(source.received for source in merger.sources),
            *(source.pending for source in merger.sources),
            *(int(source.ended) for source in merger.sources))


def run(core_name: str, files: list[bytes], script: list[tuple[str, int, int]], *,
        window: int | None, max_pending: int, resolution: int, blocks: bool,
        drain_limit: int | None = None) -> Outcome:
    with core.use(core_name):
        merger = TimelineMerger(reorder_window=window, max_pending=max_pending,
                                key_resolution=resolution)
        sources = [merger.add_source(f"in{i}") for i in range(len(files))]
    offsets = [0] * len(files)
    outcome = Outcome()

    def pull(limit: int | None = None) -> None:
        if window is not None:
            limit = None  # a limit is for exact mode
        outcome.pulls.append(b"".join(merger.pull_blocks(limit)) if blocks
                             else merger.pull(limit))
        outcome.counters.append(counters(merger))

    def feed(i: int, size: int) -> None:
        data = files[i][offsets[i] : offsets[i] + size]
        offsets[i] += len(data)
        if data:
            merger.feed(sources[i], data)
        else:
            merger.end_source(sources[i])

    for op, i, value in script:
        if not files:
            break
        i %= len(files)
        if op == "feed":
            feed(i, value)
        elif op == "pull":
            pull(value or None)
        elif op == "caught_up":
            merger.mark_caught_up(sources[i], value * resolution // 1000)
        elif op == "advance":
            merger.advance(value * resolution // 1000)
        elif op == "end":
            merger.end_source(sources[i])
    if window is None:  # exact mode: then as the merger asks, to the end
        while (wanted := merger.wanted()) is not None:
            feed(wanted.index, 1 << 12)
            pull(drain_limit)
            while merger.held_back:
                pull(drain_limit)
    outcome.pulls.append(merger.finish())
    outcome.counters.append(counters(merger))
    return outcome


def timeline(kind: str, sources: int, packets: int, draw: st.DrawFn) -> list[list[int]]:
    """Ticks (milliseconds) per source for the shapes of traffic that matter to a merge."""
    if kind == "interleaved":
        return [[n * sources + i for n in range(packets)] for i in range(sources)]
    if kind == "bursty":
        burst = draw(st.integers(min_value=1, max_value=60))
        return [[n + (n // burst) * burst * (sources - 1) + i * burst for n in range(packets)]
                for i in range(sources)]
    ticks = st.integers(min_value=0, max_value=draw(st.sampled_from([3, 50, 5000])))
    streams = [draw(st.lists(ticks, max_size=packets)) for _ in range(sources)]
    if kind == "sorted":
        streams = [sorted(stream) for stream in streams]
    return streams  # "random": equal ticks across sources and backwards within one


Spec = list[tuple[list[int], int, bool]]
"""Per input: its ticks, the seed of its packet sizes, whether it is pcapng (files are made from
this in the test, so that hypothesis reports a failing case in a few lines)."""


def files_of(spec: Spec) -> list[bytes]:
    files = []
    for i, (stream, seed, pcapng) in enumerate(spec):
        sizes = random.Random(seed).choices([0, 1, 3, 60, 700, 1500], k=len(stream))
        files.append(capture(i, list(zip(stream, sizes, strict=True)), pcapng))
    return files


@st.composite
def cases(draw: st.DrawFn, *, live: bool) -> tuple[Spec, list[tuple[str, int, int]],
                                                      dict[str, object]]:
    kind = draw(st.sampled_from(["interleaved", "bursty", "sorted", "random"]))
    count = draw(st.integers(min_value=0, max_value=12))
    streams = timeline(kind, count, draw(st.integers(min_value=0, max_value=120)), draw)
    huge = draw(st.booleans())
    spec: Spec = []
    for stream in streams:
        if huge and draw(st.booleans()):
            cut = draw(st.integers(min_value=0, max_value=len(stream)))
            stream = stream[:cut] + [tick + HUGE_SECONDS * 1000 for tick in stream[cut:]]
        # packet sizes from a seeded generator: drawing each one makes examples slow to generate
        spec.append((stream, draw(st.integers(0, 2**32)), draw(st.booleans())))
    feeds = st.tuples(st.just("feed"), st.integers(0, 63),
                      st.sampled_from([1, 7, 100, 1000, 1 << 12, 1 << 16]))
    # a pull's value is its limit in bytes (exact mode), 0 for none
    ops = [feeds, st.tuples(st.just("pull"), st.just(0), st.sampled_from([0, 0, 1, 90, 5000])),
           st.tuples(st.just("end"), st.integers(0, 63), st.just(0))]
    if live:
        ops += [st.tuples(st.just("advance"), st.just(0), st.integers(0, 5000 * 13)),
                st.tuples(st.just("caught_up"), st.integers(0, 63), st.integers(0, 5000 * 13))]
    script = draw(st.lists(st.one_of(feeds, *ops), max_size=60))
    options: dict[str, object] = {
        "resolution": draw(st.sampled_from([10**6, 10**9] + ([10**10] if huge else []))),
        "blocks": draw(st.booleans()),
        "window": draw(st.sampled_from([0, 1, 10**3, 10**9, 10**12])) if live else None,
        "max_pending": draw(st.sampled_from([1, 5, 100, 200_000])),
        "share_min": draw(st.sampled_from([0, 1, 100, 16 * 1024, 1 << 62])),
        "drain_limit": None if live else draw(st.sampled_from([None, 1, 700, 1 << 14])),
    }
    return spec, script, options


def compare(files: list[bytes], script: list[tuple[str, int, int]],
            options: dict[str, object]) -> None:
    options = dict(options)
    share_min = options.pop("share_min")
    with mock.patch.object(merging, "_SHARE_MIN", share_min):
        compiled = run(core.COMPILED, files, script, **options)  # type: ignore[arg-type]
    python = run(core.PYTHON, files, script, **options)  # type: ignore[arg-type]
    assert compiled.counters == python.counters
    assert compiled.pulls == python.pulls


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(live=False))
def test_exact_merges_are_byte_identical(case: tuple[Spec, list[tuple[str, int, int]],
                                                     dict[str, object]]) -> None:
    spec, script, options = case
    compare(files_of(spec), script, options)


@needs_compiled
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(live=True))
def test_live_merges_are_byte_identical(case: tuple[Spec, list[tuple[str, int, int]],
                                                    dict[str, object]]) -> None:
    spec, script, options = case
    compare(files_of(spec), script, options)


@needs_compiled
@pytest.mark.parametrize("window", [None, 10**9])
def test_a_key_beyond_64_bits_hands_the_merge_to_python_midway(window: int | None) -> None:
    early = capture(0, [(n * 2, 60) for n in range(50)], False)
    late = capture(1, [(n * 2 + 1, 60) for n in range(25)]
                   + [(HUGE_SECONDS * 1000 + n, 60) for n in range(25)], False)
    script = [("feed", 0, 1000), ("feed", 1, 1000), ("pull", 0, 0)] * 10
    options: dict[str, object] = {"resolution": 10**10, "blocks": False, "window": window,
                                  "max_pending": 100, "share_min": 1 << 62}
    compare([early, late], script, options)
    with core.use(core.COMPILED):
        merger = TimelineMerger(key_resolution=10**10, reorder_window=window)
    a, b = merger.add_source("a"), merger.add_source("b")
    assert a.queue is not None
    merger.feed(a, early)
    merger.feed(b, late)
    assert a.queue is None and b.queue is None and a.pending + b.pending == 100


@needs_compiled
def test_the_compiled_merge_refuses_inconsistent_input() -> None:
    with core.use(core.COMPILED):
        compiled = core.compiled()
    assert compiled is not None
    queue = compiled.KeyQueue()
    with pytest.raises(ValueError, match="past the end of its 8 bytes"):
        queue.append([1], [9], 8)
    with pytest.raises(ValueError, match="2 merge keys but 1 packet end"):
        queue.append([1, 2], [8], 8)
    with pytest.raises(ValueError, match="before the end of the one before it"):
        queue.append([1, 2], [8, 4], 8)
    with pytest.raises(OverflowError):
        queue.append([1 << 64], [8], 8)
    with pytest.raises(OverflowError):
        queue.append([1], [-1], 8)
    queue.append([1, 2], [12, 24], 24)
    with pytest.raises(ValueError, match="only 2 are pending"):
        compiled.merge([(queue, 3, [(0, bytes(24))])], 0)
    with pytest.raises(ValueError, match="not in the blobs"):
        compiled.merge([(queue, 2, [(0, bytes(12))])], 0)
    with pytest.raises(ValueError, match="twice"):
        compiled.merge([(queue, 1, [(0, bytes(24))]), (queue, 1, [(0, bytes(24))])], 0)
    assert queue.pending == 2
    first, second = b"a" * 12, b"b" * 12
    blobs = [(0, first), (12, second)]
    # a limit stops at the packet that reaches it; the rest stays in the queue
    assert compiled.merge([(queue, 2, blobs)], 13, 12) == ([first], 1)
    assert queue.pending == 1
    assert compiled.merge([(queue, 1, blobs)], 13, 1) == ([second], 1)
    assert queue.pending == 0
    queue.append([3, 4], [12, 24], 24)
    assert compiled.merge([(queue, 2, [(24, first + second)])], 13) == ([first + second], 2)
    assert queue.pending == 0


@pytest.mark.parametrize("name", [core.PYTHON, pytest.param(core.COMPILED, marks=needs_compiled)])
def test_max_pending_releases_when_the_fullest_source_is_below_the_horizon(name: str) -> None:
    # Once the source with the most pending packets had all of them below the horizon, raising
    # the horizon to its middle key released nothing, and the release step never ended.
    with core.use(name):
        merger = TimelineMerger(reorder_window=10**9, max_pending=1)
    a, b = merger.add_source("a"), merger.add_source("b")
    merger.feed(a, capture(0, [(n, 60) for n in range(10)], False))
    merger.feed(b, capture(1, [(n + 5000, 60) for n in range(5)], False))
    merger.pull()
    assert (merger.packets_written, merger.forced) == (14, 2)
    assert [source.pending for source in merger.sources] == [0, 1]
