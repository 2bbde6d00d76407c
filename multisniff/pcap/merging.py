"""One timeline from many capture streams: the merger behind `multisniff merge` and the engine.

Sans-IO: sources are added and removed, bytes are fed per source as they arrive, and the merged
pcapng comes out of `pull()`. Two modes share all of the machinery:

- exact (offline files): packets come out in the order mergecap gives, by comparing the next
  packet of every source (a source whose own timestamps go backwards keeps its file order). The
  merger says which source it needs bytes from next (`wanted()`, and `upcoming()` for the ones
  after it), so memory holds about one chunk per source whatever the input size; a pull may be
  given a limit in bytes (`held_back` then says more is ready), so that the output of one step
  is bounded too, however far the sources let the merge go at once.
- live (the capture engine): a packet comes out once no source can still send an earlier one
  (every source has sent later packets, been marked caught up to a later time, or ended) or once
  it is `reorder_window` older than the newest time known. A packet that arrives after packets
  later than it were written is "late": it is counted and written at once.

Speed matters (a merge of 2 million packets should be close to mergecap): readers hand out
packets already encoded as EPB pieces, nothing is done per packet here except through C-level
builtins. In exact mode every batch is joined into one bytes object as it arrives (with the end
offset of every EPB in it), so that a run of packets from one source is written as one slice of
it without touching a per-packet object. Each release step cuts every source's pending packets
at the horizon with `bisect`; when one source is alone below the horizon its run is written at
once; otherwise runs are taken from the source with the lowest next packet up to the next packet
of the others (ties go to the source added first, then to file order, as in mergecap), and when
those runs turn out short, the rest is merged by a stable sort of positions by key.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from heapq import heapify, heappop, heapreplace
from itertools import accumulate, chain, islice, repeat
from operator import add, sub

from multisniff.pcap import core
from multisniff.pcap.blocks import InterfaceInfo, InterfaceStatistics
from multisniff.pcap.reading import Batch, CaptureError, CaptureReader, Packet, unpack
from multisniff.pcap.writing import Block, PcapngWriter, encode_isb, encode_nrb

# `typing` only for the type checker: `multisniff merge` does not import it (memory, start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


@dataclasses.dataclass(eq=False)
class Source:
    """One input stream of the merger; created by `TimelineMerger.add_source`."""

    label: str
    index: int
    multi_interface: bool
    reader: CaptureReader = dataclasses.field(repr=False)
    keys: list[int] = dataclasses.field(default_factory=list, repr=False)
    packets: list[Packet] = dataclasses.field(default_factory=list, repr=False)
    head: int = 0
    """keys[head:] and packets[head:] are waiting to be written."""
    last_key: int | None = None
    """Exact mode: the highest key received. Live mode: the newest key received."""
    caught_up: int | None = None
    ended: bool = False
    error: CaptureError | None = None
    received: int = 0
    late: int = 0
    interface_ids: list[int] = dataclasses.field(default_factory=list)
    """Output interface id of each interface this source declared, in order."""
    ends: list[int] = dataclasses.field(default_factory=list, repr=False)
    """Exact mode, instead of `packets`: packet i is bytes first_start..ends[i] (i == 0) or
    ends[i-1]..ends[i] of the source's stream of EPBs, which is held in `blobs`."""
    first_start: int = 0
    blobs: list[tuple[int, bytes]] = dataclasses.field(default_factory=list, repr=False)
    """Exact mode: (stream offset, bytes) of each part of the stream of EPBs still needed."""
    stream_end: int = 0
    queue: Any = dataclasses.field(default=None, repr=False)
    """With the compiled core, instead of `keys`, `ends`, `packets`, `head` and `first_start`:
    the `_core.KeyQueue` that holds the keys and where each packet is in `blobs` (live mode,
    too, keeps its packets in `blobs` then)."""

    @property
    def pending(self) -> int:
        if self.queue is not None:
            return int(self.queue.pending)
        return len(self.keys) - self.head

    def held(self, horizon: int) -> int:
        """How many pending packets have keys above `horizon`."""
        if self.queue is not None:
            return int(self.queue.pending - self.queue.releasable(horizon, True))
        return len(self.keys) - bisect_right(self.keys, horizon, self.head)

    def start_of(self, index: int) -> int:
        """Exact mode, pure-Python representation: where packet `index` starts in the stream."""
        return self.ends[index - 1] if index else self.first_start

    def pending_key(self, index: int) -> int:
        """The key of the `index`-th pending packet."""
        if self.queue is not None:
            return int(self.queue.key_at(index))
        return self.keys[self.head + index]


class TimelineMerger:
    """Merge capture streams into one pcapng section. See the module docstring for the modes.

    `reorder_window` (in key units, nanoseconds by default) selects live mode; None is exact
    mode. `max_pending` bounds the packets held in live mode: beyond it the oldest are written
    even if inside the window (counted as released early, `forced`).
    """

    def __init__(
        self,
        *,
        reorder_window: int | None = None,
        key_resolution: int = 1_000_000_000,
        shb: bytes | None = None,
        max_pending: int = 200_000,
    ) -> None:
        self.live = reorder_window is not None
        self.reorder_window = reorder_window or 0
        self.key_resolution = key_resolution
        self.max_pending = max_pending
        self.writer = PcapngWriter(shb=shb)
        self.sources: list[Source] = []
        self._names: set[str] = set()
        self._released: int | None = None  # live: everything up to this key has been written
        self._newest: int | None = None  # live: newest key seen or clock time given
        self.forced = 0
        self.packets_written = 0
        self.held_back = False
        """The last pull stopped at its limit: more packets are ready to be pulled now."""
        self._compiled = core.compiled()
        """The compiled core that keeps the sources' keys and merges them, if it is active."""

    # --- sources ------------------------------------------------------------------------------

    def add_source(self, label: str, *, multi_interface: bool = False) -> Source:
        """A new input. Its interfaces are named `label` (a single-interface source) or
        `label:IFNAME` / `label:N` (one that has several); names are made unique with `#2`..."""
        holder: list[Source] = []
        reader = CaptureReader(
            key_resolution=self.key_resolution,
            assign_interface=lambda info: self._add_interface(holder[0], info),
            records=self._compiled is not None,
        )
        source = Source(label=label, index=len(self.sources), multi_interface=multi_interface,
                        reader=reader)
        if self._compiled is not None:
            source.queue = self._compiled.KeyQueue(live=self.live)
        holder.append(source)
        self.sources.append(source)
        return source

    def _unique(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self._names:
            number += 1
            candidate = f"{name}#{number}"
        self._names.add(candidate)
        return candidate

    def _add_interface(self, source: Source, info: InterfaceInfo) -> int:
        number = len(source.interface_ids)
        if source.multi_interface or number > 0:
            name = f"{source.label}:{info.name if info.name else number}"
        else:
            name = source.label
        renamed = dataclasses.replace(
            info, name=self._unique(name), description=info.description or info.name)
        oid = self.writer.add_interface(renamed)
        source.interface_ids.append(oid)
        return oid

    def feed(self, source: Source, data: bytes) -> None:
        """Bytes of one source, in any chunking. Damage ends the source (see `Source.error`)."""
        if source.ended:
            return
        if self.live and source.queue is None:
            batch = source.reader.feed(data)
        else:
            batch = source.reader.feed_flat(data)
        self._take_batch(source, batch)
        if source.reader.error is not None:
            source.error = source.reader.error
            source.ended = True

    def end_source(self, source: Source) -> CaptureError | None:
        """The source's stream has ended (or the source leaves): None if it ended cleanly."""
        if not source.ended:
            source.ended = True
            source.error = source.reader.finish()
        return source.error

    remove_source = end_source

    def mark_caught_up(self, source: Source, key: int) -> None:
        """Live mode: the source will send nothing earlier than `key` (it is idle until then)."""
        if source.caught_up is None or key > source.caught_up:
            source.caught_up = key
        self._note_newest(key)

    def advance(self, now: int) -> None:
        """Live mode: the current time in key units, so that an idle session still releases."""
        self._note_newest(now)

    def add_statistics(self, source: Source, local_interface: int,
                       stats: InterfaceStatistics) -> None:
        """Write an ISB for the source's `local_interface`-th interface (the engine's own)."""
        oid = source.interface_ids[local_interface]
        self.writer.add_block(encode_isb(dataclasses.replace(stats, interface_id=oid)))

    def wanted(self) -> Source | None:
        """Exact mode: the source whose bytes are needed before more can be written; None when
        every source has ended. Live mode: always None (sources push)."""
        upcoming = self.upcoming(1)
        return upcoming[0] if upcoming else None

    def upcoming(self, count: int) -> list[Source]:
        """Exact mode: `wanted()` and the sources likely wanted after it, at most `count`, in
        that order (by their newest packet, oldest first): whom to read ahead for. It depends
        on the packets fed only, not on those pulled. Live mode: empty."""
        if self.live:
            return []
        waiting = [source for source in self.sources if not source.ended]
        waiting.sort(key=lambda source: (source.last_key is not None, source.last_key or 0))
        return waiting[:count]

    # --- output -------------------------------------------------------------------------------

    def step_limit(self, size: int) -> int | None:
        """The limit for the pulls of a step that may release far more than `size` bytes (in
        exact mode the inputs' chunks can let one step write a chunk of every source): `size`
        with the compiled core, to which a limited pull costs nothing; None, the whole release
        at once, with the pure-Python one, whose merge of interleaved inputs pulling several
        times a step was 12% slower, and whose peak memory was never the target."""
        return None if self._compiled is None else size

    def pull(self, limit: int | None = None) -> bytes:
        """The merged bytes that are ready: SHB and IDBs first, then blocks in timeline order.

        Exact mode, with a `limit`: the packets stop at the first one that brings their bytes
        to `limit` or more, and `held_back` says whether packets that are ready were left for
        the next pull."""
        self._release(limit)
        return self.writer.take()

    def pull_blocks(self, limit: int | None = None) -> list[Block]:
        """`pull()` as the list of blocks (and pieces of blocks) that it would join."""
        self._release(limit)
        return self.writer.take_blocks()

    def finish(self) -> bytes:
        """End every source and write everything that is still held."""
        for source in self.sources:
            self.end_source(source)
        self._release()
        return self.writer.take()

    @property
    def late_packets(self) -> int:
        return sum(source.late for source in self.sources)

    # --- internals ----------------------------------------------------------------------------

    def _note_newest(self, key: int) -> None:
        if self._newest is None or key > self._newest:
            self._newest = key

    def _take_batch(self, source: Source, batch: Batch) -> None:
        writer = self.writer
        for stats in batch.statistics:
            writer.add_block(encode_isb(stats))
        for names in batch.names:
            writer.add_block(encode_nrb(names))
        writer.add_blocks(batch.blocks)
        if not batch.keys and not batch.packed:
            return
        source.received += len(batch.keys) + batch.packed
        if source.queue is not None and self._take_compiled(source, batch):
            return
        if batch.packed:
            unpack(batch)
        keys = batch.keys
        head = source.head
        if head and head * 2 > len(source.keys):
            del source.keys[:head]
            if self.live:
                del source.packets[:head]
            else:
                source.first_start = source.ends[head - 1]
                del source.ends[:head]
                blobs = source.blobs
                while blobs and blobs[0][0] + len(blobs[0][1]) <= source.first_start:
                    del blobs[0]
            source.head = 0
        if self.live:
            self._take_live(source, keys, batch.packets)
            return
        last = source.last_key
        if (last is not None and keys[0] < last) or keys != sorted(keys):
            # A source whose timestamps go backwards: each packet waits for the highest key
            # before it, which reproduces mergecap's next-packet-of-every-input comparison.
            start = keys[0] if last is None else last
            keys = list(accumulate(keys, max, initial=start))[1:]
        source.keys.extend(keys)
        start = source.stream_end
        source.ends.extend(map(add, batch.ends, repeat(start)))
        blob = b"".join(map(_buffer, batch.pieces))
        source.blobs.append((start, blob))
        source.stream_end = start + len(blob)
        source.last_key = keys[-1]

    def _take_compiled(self, source: Source, batch: Batch) -> bool:
        """`_take_batch` with the compiled core; False when a key does not fit in 64 bits and
        the merger went back to the pure-Python representation (the batch's packets too)."""
        try:
            if batch.packed:
                source.late += source.queue.append_records(batch.pieces, self._released)
            else:
                source.late += source.queue.append(batch.keys, batch.ends, batch.ends[-1],
                                                   self._released)
        except OverflowError:
            self._demote()
            if self.live:
                view = memoryview(b"".join(map(_buffer, batch.pieces)))
                starts = chain((0,), batch.ends)
                batch.packets = [(bytes(view[start:end]),)
                                 for start, end in zip(starts, batch.ends, strict=False)]
            return False
        # a packed batch's pieces hold whole packets each
        for blob in batch.pieces if batch.packed else _packet_aligned(batch.pieces, batch.ends):
            source.blobs.append((source.stream_end, blob))
            source.stream_end += len(blob)
        source.last_key = source.queue.last_key
        if self.live:
            self._note_newest(source.last_key)
        first_start = source.queue.first_start
        blobs = source.blobs
        while blobs and blobs[0][0] + len(blobs[0][1]) <= first_start:
            del blobs[0]
        return True

    def _demote(self) -> None:
        """Go on with the pure-Python merge: keys beyond 64 bits (odd timestamp resolutions or
        offsets) are rare enough to be merged slowly."""
        for source in self.sources:
            if source.queue is None:
                continue
            source.blobs = [(offset, _buffer(blob)) for offset, blob in source.blobs]
            if self.live:
                keys, starts, ends = source.queue.export()
                offsets = [offset for offset, _ in source.blobs]
                packets: list[Packet] = []
                for start, end in zip(starts, ends, strict=True):
                    offset, blob = source.blobs[bisect_right(offsets, start) - 1]
                    packets.append((blob[start - offset : end - offset],))
                source.keys, source.packets, source.head = keys, packets, 0
                source.blobs = []
            else:
                source.keys, source.ends, source.head, source.first_start = source.queue.export()
            source.queue = None
        self._compiled = None

    def _take_live(self, source: Source, keys: list[int], packets: list[Packet]) -> None:
        if keys != sorted(keys):
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys = [keys[i] for i in order]
            packets = [packets[i] for i in order]
        if self._released is not None and keys[0] < self._released:
            source.late += bisect_left(keys, self._released)
        pending_keys = source.keys
        if source.pending and keys[0] < pending_keys[-1]:
            merged_keys = pending_keys[source.head :] + keys
            merged_packets = source.packets[source.head :] + packets
            order = sorted(range(len(merged_keys)), key=merged_keys.__getitem__)
            source.keys = [merged_keys[i] for i in order]
            source.packets = [merged_packets[i] for i in order]
            source.head = 0
        else:
            pending_keys.extend(keys)
            source.packets.extend(packets)
        if source.last_key is None or keys[-1] > source.last_key:
            source.last_key = keys[-1]
        self._note_newest(keys[-1])

    def _horizon(self) -> tuple[int | None, int]:
        """(H, m): packets with key < H may be written, and key == H from sources with index
        <= m. H None: nothing may be written yet. Returns (None, -1) when blocked."""
        active = [source for source in self.sources if not source.ended]
        if not active:
            return _INFINITY, len(self.sources)
        if not self.live:
            best: tuple[int, int] | None = None
            for source in active:
                if source.last_key is None:
                    return None, -1
                candidate = (source.last_key, source.index)
                if best is None or candidate < best:
                    best = candidate
            assert best is not None
            return best
        horizon: int | None = None
        for source in active:
            frontier = source.last_key
            if source.caught_up is not None and (frontier is None or source.caught_up > frontier):
                frontier = source.caught_up
            if frontier is None:
                horizon = None
                break
            if horizon is None or frontier < horizon:
                horizon = frontier
        if self._newest is not None:
            windowed = self._newest - self.reorder_window
            if horizon is None or windowed > horizon:
                horizon = windowed
        return horizon, len(self.sources)

    def _release(self, limit: int | None = None) -> None:
        if limit is not None and (self.live or limit < 1):
            raise ValueError("a pull limit is a positive number of bytes, for exact mode")
        self.held_back = False
        horizon, last_index = self._horizon()
        if horizon is None:
            return
        if self.live:
            horizon = self._bounded(horizon)
        if self._compiled is not None:
            self._release_compiled(horizon, last_index, limit)
            return
        cuts: list[tuple[Source, int]] = []
        for source in self.sources:
            if source.head >= len(source.keys):
                continue
            if horizon is _INFINITY:
                cut = len(source.keys)
            elif source.index <= last_index:
                cut = bisect_right(source.keys, horizon, source.head)
            else:
                cut = bisect_left(source.keys, horizon, source.head)
            if cut > source.head:
                cuts.append((source, cut))
        if (self.live and horizon is not _INFINITY
                and (self._released is None or horizon > self._released)):
            self._released = horizon
        if not cuts:
            return
        lowered = cuts if limit is None or len(cuts) == 1 else self._within(cuts, limit)
        if len(lowered) == 1:
            source, cut = lowered[0]
            self._emit_run(source, cut, limit)
        else:
            self._emit_runs(lowered, limit)
        self.held_back = any(source.head < cut for source, cut in cuts)

    def _within(self, cuts: list[tuple[Source, int]], limit: int) -> list[tuple[Source, int]]:
        """Exact mode: the cuts lowered to the packets with keys up to the lowest key that
        still holds `limit` bytes, when they hold much more. Those come first in the merged
        order, so a pull of `limit` bytes gives the same packets from them; without this,
        every limited pull would order everything the horizon allows and write a little."""

        def size(key: int) -> int:
            total = 0
            for source, cut in cuts:
                end = bisect_right(source.keys, key, source.head, cut)
                if end > source.head:
                    total += source.ends[end - 1] - source.start_of(source.head)
            return total

        held = sum(source.ends[cut - 1] - source.start_of(source.head)
                   for source, cut in cuts)
        longest, cut = max(cuts, key=lambda pair: pair[1] - pair[0].head)
        keys = longest.keys
        low, high = longest.head, cut - 1
        if held < 2 * limit or size(keys[high]) < limit:
            return cuts
        while low < high:  # the lowest key of the longest source that holds `limit` bytes
            middle = (low + high) // 2
            if size(keys[middle]) >= limit:
                high = middle
            else:
                low = middle + 1
        key = keys[low]
        lowered = [(source, min(cut, bisect_right(source.keys, key, source.head, cut)))
                   for source, cut in cuts]
        return [(source, cut) for source, cut in lowered if cut > source.head]

    def _release_compiled(self, horizon: int, last_index: int, limit: int | None) -> None:
        """`_release` with the compiled core: one call merges every source's packets up to
        the horizon."""
        assert self._compiled is not None
        parts = []
        count = 0
        for source in self.sources:
            queue = source.queue
            if horizon is _INFINITY:
                cut = queue.pending
            else:
                cut = queue.releasable(horizon, source.index <= last_index)
            if cut:
                parts.append((queue, cut, source.blobs))
                count += cut
        if (self.live and horizon is not _INFINITY
                and (self._released is None or horizon > self._released)):
            self._released = horizon
        if parts:
            blocks, taken = self._compiled.merge(parts, _SHARE_MIN, limit)
            self.writer.add_blocks(blocks)
            self.packets_written += taken
            self.held_back = taken < count

    def _bounded(self, horizon: int) -> int:
        """Live mode: raise the horizon until at most max_pending packets stay held."""
        while True:
            held = [source.held(horizon) for source in self.sources]
            total = sum(held)
            if total <= self.max_pending or total == 0:
                return horizon
            # the middle of the most packets held above the horizon, which releases at least one
            # (the middle of the most pending packets may be below the horizon already)
            most = max(range(len(held)), key=held.__getitem__)
            fullest = self.sources[most]
            self.forced += 1
            horizon = max(horizon, fullest.pending_key(fullest.pending - held[most] // 2 - 1))

    def _emit_run(self, source: Source, cut: int, limit: int | None = None) -> int:
        """Write the source's packets from its head up to `cut`, or up to the first that brings
        their bytes to `limit` (exact mode); the bytes written."""
        head = source.head
        if limit is None:
            size = 0
        else:
            start = source.start_of(head)
            cut = min(bisect_left(source.ends, start + limit, head, cut) + 1, cut)
            size = source.ends[cut - 1] - start
        self.writer.add_blocks(self._run(source, head, cut))
        self.packets_written += cut - head
        source.head = cut
        return size

    def _run(self, source: Source, start: int, end: int) -> Iterable[Block]:
        """Packets start..end of a source, in as few pieces as they are stored in."""
        if self.live:
            return chain.from_iterable(islice(source.packets, start, end))
        first = source.start_of(start)
        last = source.ends[end - 1]
        views = []
        for offset, blob in source.blobs:
            if offset + len(blob) <= first:
                continue
            if offset >= last:
                break
            views.append(memoryview(blob)[max(first - offset, 0) : last - offset])
        return views

    def _each(self, source: Source, start: int, end: int) -> list[Block]:
        """Exact mode: packets start..end of a source, one piece each."""
        ends = source.ends
        views: list[Block] = []
        for offset, blob in source.blobs:
            stop = offset + len(blob)
            # a packet is in the blob that holds its end
            low = bisect_right(ends, offset, start, end)
            high = bisect_right(ends, stop, low, end)
            if low == high:
                if low >= end:
                    break
                continue
            starts = [source.start_of(low) - offset]
            starts += map(sub, islice(ends, low, high - 1), repeat(offset))
            view = memoryview(blob)
            views += map(view.__getitem__,
                         map(slice, starts, map(sub, islice(ends, low, high), repeat(offset))))
        return views

    def _emit_runs(self, cuts: list[tuple[Source, int]], limit: int | None = None) -> None:
        """Write the sources' packets up to their cuts run by run: the source with the lowest
        next (key, index) gives everything before the next lowest one of the others in one
        slice. Bursty traffic (runs of tens of packets) costs almost nothing per packet this
        way; when runs turn out short (finely interleaved sources), the rest goes to
        `_emit_merged`. With a `limit` (exact mode), stop at the first packet that brings the
        bytes written to it."""
        heap = [(source.keys[source.head], source.index, source, cut) for source, cut in cuts]
        heapify(heap)
        add = self.writer.add_blocks
        runs = written = size = 0
        while len(heap) > 1:
            if runs >= _PROBE_RUNS and written < runs * _MIN_RUN:
                self.packets_written += written
                self._emit_merged(sorted(((entry[2], entry[3]) for entry in heap),
                                         key=lambda pair: pair[0].index),
                                  None if limit is None else limit - size)
                return
            _, index, source, cut = heap[0]
            next_key, next_index = min(heap[1:3])[:2]
            keys = source.keys
            head = source.head
            if index < next_index:
                end = bisect_right(keys, next_key, head, cut)
            else:
                end = bisect_left(keys, next_key, head, cut)
            if limit is not None:
                start = source.start_of(head)
                end = min(bisect_left(source.ends, start + limit - size, head, end) + 1, end)
                size += source.ends[end - 1] - start
            add(self._run(source, head, end))
            source.head = end
            runs += 1
            written += end - head
            if limit is not None and size >= limit:
                break
            if end == cut:
                heappop(heap)
            else:
                heapreplace(heap, (keys[end], index, source, cut))
        else:
            if heap:
                _, _, source, cut = heap[0]
                self._emit_run(source, cut, None if limit is None else limit - size)
        self.packets_written += written

    def _emit_merged(self, cuts: list[tuple[Source, int]], limit: int | None = None) -> None:
        keys: list[int] = []
        packets: list[Packet] = []
        views: list[Block] = []
        for source, cut in cuts:
            keys.extend(islice(source.keys, source.head, cut))
            if self.live:
                packets.extend(islice(source.packets, source.head, cut))
            else:
                views.extend(self._each(source, source.head, cut))
        # A stable sort by key: ties keep the order above (source added first, then file order).
        order = sorted(range(len(keys)), key=keys.__getitem__)
        count = len(order)
        if limit is not None:
            # the packets up to the first that brings their bytes to the limit
            totals = list(accumulate(map(len, map(views.__getitem__, order))))
            count = min(bisect_left(totals, limit) + 1, count)
        if count < len(order):
            order = order[:count]
            # a source's packets keep their order in the sort: each gives its first ones
            chosen = sorted(order)
            firsts = list(accumulate((cut - source.head for source, cut in cuts), initial=0))
            for (source, _), first, after in zip(cuts, firsts, firsts[1:], strict=False):
                source.head += bisect_left(chosen, after) - bisect_left(chosen, first)
        else:
            for source, cut in cuts:
                source.head = cut
        if self.live:
            self.writer.add_blocks(chain.from_iterable(map(packets.__getitem__, order)))
        else:
            self.writer.add_blocks(map(views.__getitem__, order))
        self.packets_written += len(order)


def _buffer(piece: Any) -> Any:
    """A piece as a bytes-like object: a compiled reader's `PcapRecords` made into its EPBs."""
    return piece if isinstance(piece, (bytes, bytearray, memoryview)) else bytes(piece)


def _packet_aligned(pieces: list[bytes], ends: list[int]) -> list[bytes]:
    """The pieces of a flat batch as blobs that each hold whole packets, joining only the
    pieces of the packets that lie across several (a compiled reader's piece holds whole EPBs,
    the Python reader's EPBs come in pieces): no copy of the large ones."""
    if len(pieces) == 1:
        return pieces
    blobs: list[bytes] = []
    group: list[bytes] = []
    at = 0
    for piece in pieces:
        group.append(piece)
        at += len(piece)
        index = bisect_left(ends, at)
        if index < len(ends) and ends[index] == at:
            blobs.append(group[0] if len(group) == 1 else b"".join(group))
            group = []
    if group:  # not past a packet's end: cannot be, the last piece ends the last packet
        blobs.append(b"".join(group))
    return blobs


_PROBE_RUNS = 8
_MIN_RUN = 16
"""`_emit_runs` gives up after _PROBE_RUNS runs that average fewer than _MIN_RUN packets."""

_SHARE_MIN = 16 * 1024
"""The compiled merge hands out a run of one source's packets at least this long as a view of the
bytes it is in; shorter ones are copied into one bytes object with their neighbours."""


class _Infinity(int):
    """Greater than every key: the horizon once every source has ended."""


_INFINITY: int = _Infinity(1 << 200)
