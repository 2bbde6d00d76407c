//! The exact-mode timeline merge of `multisniff/pcap/merging.py` (`TimelineMerger` without a
//! reorder window): every source's pending packets as merge keys and the end offsets of their
//! EPBs in the source's stream, and the k-way merge of the packets that may be written, by
//! (key, source position, file order): the order of the pure-Python merger's stable sort.
//!
//! The pure-Python merger keeps the keys and ends in lists and merges with a sort of positions and
//! one memoryview per packet; here they are kept in Rust vectors (`KeyQueue`, converted from the
//! reader's lists once per packet, or taken from the `PcapRecords` pieces a merger's reader
//! makes) and a release step writes the merged packets into one bytes object, except that a long
//! run of one source's EPBs stored as bytes is handed out as a memoryview of them (bursty pcapng
//! traffic is copied by nobody but the kernel). Classic pcap records are stored as they were read
//! and become EPBs as they are copied into the output: one copy of each packet.
//!
//! Everything here treats its inputs as untrusted: lengths that do not match, ends that go
//! backwards or past their bytes, and cuts past the end are errors, never a panic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::mem::MaybeUninit;

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyMemoryView, PySlice, PyTuple};

use crate::buffer::{uninit_bytes, Out};
use crate::reader::PcapRecords;

/// What is wrong with the input of a merge function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeError {
    /// A batch has a different number of keys than of ends.
    Lengths { keys: usize, ends: usize },
    /// An end offset is smaller than the one before it (or than the start of its run).
    Backwards {
        index: usize,
        end: u64,
        previous: u64,
    },
    /// An end offset lies past the bytes it is an offset into.
    PastEnd { index: usize, end: u64, length: u64 },
    /// A count or offset does not fit the integer it has to be held in.
    Overflow,
    /// A cut asks for more packets than are pending.
    Cut { cut: usize, pending: usize },
    /// The bytes of a packet range are not in the blobs given for its source.
    Missing { source: usize, start: u64, end: u64 },
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lengths { keys, ends } => {
                write!(f, "a batch has {keys} merge keys but {ends} packet end offsets")
            }
            Self::Backwards { index, end, previous } => write!(
                f,
                "packet {index} ends at byte {end}, before the end of the one before it ({previous})"
            ),
            Self::PastEnd { index, end, length } => write!(
                f,
                "packet {index} ends at byte {end}, past the end of its {length} bytes"
            ),
            Self::Overflow => write!(f, "a stream offset or count overflows 64 bits"),
            Self::Cut { cut, pending } => {
                write!(f, "a cut of {cut} packets, but only {pending} are pending")
            }
            Self::Missing { source, start, end } => write!(
                f,
                "bytes {start}..{end} of source {source} are not in the blobs given for it"
            ),
        }
    }
}

impl std::error::Error for MergeError {}

impl From<MergeError> for PyErr {
    fn from(error: MergeError) -> PyErr {
        PyValueError::new_err(error.to_string())
    }
}

/// How many of the pending keys (`keys[head..]`, non-decreasing) are below `horizon`, or at
/// most `horizon` when `inclusive`: both queues release the same way.
fn releasable(keys: &[i64], head: usize, horizon: i64, inclusive: bool) -> usize {
    let pending = keys.get(head..).unwrap_or(&[]);
    if inclusive {
        pending.partition_point(|&key| key <= horizon)
    } else {
        pending.partition_point(|&key| key < horizon)
    }
}

/// Where the next `count` of `pending` packets from `head` end, or the error for a cut past
/// them.
fn cut_end(head: usize, count: usize, pending: usize) -> Result<usize, MergeError> {
    head.checked_add(count)
        .filter(|_| count <= pending)
        .ok_or(MergeError::Cut {
            cut: count,
            pending,
        })
}

/// A batch as both queues take it: a key per packet, and end offsets that go forward and stay
/// within its `blob_len` bytes.
fn check_batch(keys: &[i64], ends: &[u64], blob_len: u64) -> Result<(), MergeError> {
    if keys.len() != ends.len() {
        return Err(MergeError::Lengths {
            keys: keys.len(),
            ends: ends.len(),
        });
    }
    let mut previous = 0u64;
    for (index, &end) in ends.iter().enumerate() {
        if end < previous {
            return Err(MergeError::Backwards {
                index,
                end,
                previous,
            });
        }
        if end > blob_len {
            return Err(MergeError::PastEnd {
                index,
                end,
                length: blob_len,
            });
        }
        previous = end;
    }
    Ok(())
}

/// One source's packets that are not written yet, in exact mode.
///
/// Packet i (of all the source ever sent) has merge key `keys[i - base]` and its EPB is bytes
/// `start(i)..ends[i - base]` of the source's stream (the concatenation of its batches' bytes),
/// where `start(i)` is the end of the packet before it, or `first_start` for the first one kept.
/// `keys[head..]` are pending; the ones before `head` are dropped when they are more than half.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Queue {
    keys: Vec<i64>,
    ends: Vec<u64>,
    head: usize,
    first_start: u64,
    stream_end: u64,
    last_key: Option<i64>,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a batch: its keys, the end offset of each packet in its `blob_len` bytes.
    ///
    /// A key lower than one before it is raised to the highest before it: a source whose
    /// timestamps go backwards keeps its file order, each packet waiting for the highest key
    /// sent before it (what mergecap's next-packet-of-every-input comparison gives).
    /// On error nothing is changed.
    pub fn append(&mut self, keys: &[i64], ends: &[u64], blob_len: u64) -> Result<(), MergeError> {
        check_batch(keys, ends, blob_len)?;
        let start = self.stream_end;
        let stream_end = start.checked_add(blob_len).ok_or(MergeError::Overflow)?;
        let Some(&first) = keys.first() else {
            return Ok(());
        };
        if self.head > 0 && self.head.saturating_mul(2) > self.keys.len() {
            if let Some(&end) = self.ends.get(self.head - 1) {
                self.first_start = end;
            }
            let head = self.head.min(self.keys.len());
            self.keys.drain(..head);
            self.ends.drain(..head.min(self.ends.len()));
            self.head = 0;
        }
        let mut highest = self.last_key.unwrap_or(first);
        self.keys.reserve(keys.len());
        self.keys.extend(keys.iter().map(|&key| {
            highest = highest.max(key);
            highest
        }));
        // cannot overflow: every end is at most blob_len, and start + blob_len fits
        self.ends
            .extend(ends.iter().map(|&end| start.saturating_add(end)));
        self.stream_end = stream_end;
        self.last_key = Some(highest);
        Ok(())
    }

    pub fn pending(&self) -> usize {
        self.keys.len().saturating_sub(self.head)
    }

    /// How many pending packets have a key below `horizon`, or at most `horizon` when
    /// `inclusive` (keys are non-decreasing, so they are the first ones).
    pub fn releasable(&self, horizon: i64, inclusive: bool) -> usize {
        releasable(&self.keys, self.head, horizon, inclusive)
    }

    /// The next `count` pending packets as a run for `merge_order`.
    pub fn run(&self, count: usize) -> Result<Run<'_>, MergeError> {
        let end = cut_end(self.head, count, self.pending())?;
        let first = match self.head.checked_sub(1) {
            Some(before) => *self.ends.get(before).ok_or(MergeError::Overflow)?,
            None => self.first_start,
        };
        Ok(Run {
            keys: self.keys.get(self.head..end).unwrap_or(&[]),
            ends: self.ends.get(self.head..end).unwrap_or(&[]),
            first,
            starts: None,
        })
    }

    /// Mark the next `count` pending packets written.
    pub fn consume(&mut self, count: usize) -> Result<(), MergeError> {
        self.head = cut_end(self.head, count, self.pending())?;
        Ok(())
    }
}

/// One source's packets that are not written yet, in live mode: like `Queue`, but packets are
/// kept sorted by key (stably: a source's own order is kept among equal keys) as the pure-Python
/// merger's `_take_live` sorts them, so each has its own start as well as its end.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LiveQueue {
    keys: Vec<i64>,
    starts: Vec<u64>,
    ends: Vec<u64>,
    head: usize,
    low: u64,
    stream_end: u64,
    newest: Option<i64>,
}

impl LiveQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a batch as `Queue::append` does; returns how many of its packets have keys below
    /// `released` (late packets). Nothing is changed on error.
    pub fn append(
        &mut self,
        keys: &[i64],
        ends: &[u64],
        blob_len: u64,
        released: Option<i64>,
    ) -> Result<usize, MergeError> {
        check_batch(keys, ends, blob_len)?;
        let start = self.stream_end;
        let stream_end = start.checked_add(blob_len).ok_or(MergeError::Overflow)?;
        let Some(&highest) = keys.iter().max() else {
            return Ok(0);
        };
        if self.head > 0 && self.head.saturating_mul(2) > self.keys.len() {
            let head = self.head.min(self.keys.len());
            self.keys.drain(..head);
            self.starts.drain(..head.min(self.starts.len()));
            self.ends.drain(..head.min(self.ends.len()));
            self.head = 0;
            self.low = self.starts.iter().copied().min().unwrap_or(start);
        }
        let late = released.map_or(0, |released| keys.iter().filter(|&&k| k < released).count());
        // cannot overflow: every end is at most blob_len, and start + blob_len fits
        let mut batch: Vec<(i64, u64, u64)> = Vec::with_capacity(keys.len());
        let mut before = start;
        for (&key, &end) in keys.iter().zip(ends) {
            let end = start.saturating_add(end);
            batch.push((key, before, end));
            before = end;
        }
        if !keys.windows(2).all(|pair| pair.first() <= pair.get(1)) {
            batch.sort_by_key(|packet| packet.0); // stable
        }
        let first = batch.first().map_or(highest, |packet| packet.0);
        let behind = self.pending() > 0 && self.keys.last().is_some_and(|&last| first < last);
        if behind {
            let head = self.head.min(self.keys.len());
            let mut merged: Vec<(i64, u64, u64)> = self
                .keys
                .get(head..)
                .unwrap_or(&[])
                .iter()
                .zip(self.starts.get(head..).unwrap_or(&[]))
                .zip(self.ends.get(head..).unwrap_or(&[]))
                .map(|((&key, &start), &end)| (key, start, end))
                .collect();
            merged.extend(batch);
            merged.sort_by_key(|packet| packet.0); // stable: held packets before new equal ones
            batch = merged;
            self.keys.clear();
            self.starts.clear();
            self.ends.clear();
            self.head = 0;
        }
        self.keys.extend(batch.iter().map(|packet| packet.0));
        self.starts.extend(batch.iter().map(|packet| packet.1));
        self.ends.extend(batch.iter().map(|packet| packet.2));
        self.stream_end = stream_end;
        self.newest = Some(self.newest.map_or(highest, |newest| newest.max(highest)));
        Ok(late)
    }

    pub fn pending(&self) -> usize {
        self.keys.len().saturating_sub(self.head)
    }

    pub fn releasable(&self, horizon: i64, inclusive: bool) -> usize {
        releasable(&self.keys, self.head, horizon, inclusive)
    }

    /// The next `count` pending packets as a run for `merge_order`.
    pub fn run(&self, count: usize) -> Result<Run<'_>, MergeError> {
        let end = cut_end(self.head, count, self.pending())?;
        Ok(Run {
            keys: self.keys.get(self.head..end).unwrap_or(&[]),
            ends: self.ends.get(self.head..end).unwrap_or(&[]),
            first: 0,
            starts: Some(self.starts.get(self.head..end).unwrap_or(&[])),
        })
    }

    pub fn consume(&mut self, count: usize) -> Result<(), MergeError> {
        self.head = cut_end(self.head, count, self.pending())?;
        Ok(())
    }
}

/// Packets of one source that are to be merged: keys non-decreasing (else the merge is still
/// defined, by the next packet of every run, but it is no longer a sort), the end offset of each
/// packet's EPB in the source's stream, and the offset where the first one starts.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub keys: &'a [i64],
    pub ends: &'a [u64],
    pub first: u64,
    /// Live mode, where a source's packets may have been reordered: where each one starts
    /// (`first` is then unused and the ends need not increase).
    pub starts: Option<&'a [u64]>,
}

impl Run<'_> {
    /// Where packet `position` starts in the stream (runs without `starts`).
    fn start_of(&self, position: usize) -> u64 {
        match position.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(self.first),
            None => self.first,
        }
    }
}

/// Bytes `start..end` of run `source`'s stream: one or more of its packets in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub source: usize,
    pub start: u64,
    pub end: u64,
}

/// The merged order of the runs' packets as segments of their streams: by key, ties by run
/// position, then by position in the run; consecutive packets of one run form one segment.
pub fn merge_order(runs: &[Run<'_>]) -> Result<Vec<Segment>, MergeError> {
    merge_order_until(runs, None).map(|(segments, _)| segments)
}

/// `merge_order`, stopped at the first packet that brings the segments' bytes to `limit` or
/// more (so at least one packet when there is one): the segments, and how many packets of
/// each run they hold. A merge that writes as it goes needs no more memory than `limit` for
/// its output, however much the sources let it write at once.
pub fn merge_order_until(
    runs: &[Run<'_>],
    limit: Option<u64>,
) -> Result<(Vec<Segment>, Vec<usize>), MergeError> {
    for run in runs {
        if run.keys.len() != run.ends.len() {
            return Err(MergeError::Lengths {
                keys: run.keys.len(),
                ends: run.ends.len(),
            });
        }
        if let Some(starts) = run.starts {
            if starts.len() != run.ends.len() {
                return Err(MergeError::Lengths {
                    keys: run.keys.len(),
                    ends: starts.len(),
                });
            }
            for (index, (&start, &end)) in starts.iter().zip(run.ends).enumerate() {
                if end < start {
                    return Err(MergeError::Backwards {
                        index,
                        end,
                        previous: start,
                    });
                }
            }
            continue;
        }
        let mut previous = run.first;
        for (index, &end) in run.ends.iter().enumerate() {
            if end < previous {
                return Err(MergeError::Backwards {
                    index,
                    end,
                    previous,
                });
            }
            previous = end;
        }
    }
    let mut positions = vec![0usize; runs.len()];
    let mut heap: BinaryHeap<Reverse<(i64, usize)>> = runs
        .iter()
        .enumerate()
        .filter_map(|(source, run)| run.keys.first().map(|&key| Reverse((key, source))))
        .collect();
    let mut segments: Vec<Segment> = Vec::new();
    let mut total = 0u64;
    while let Some(Reverse((_, source))) = heap.pop() {
        let (Some(run), Some(&position)) = (runs.get(source), positions.get(source)) else {
            break; // unreachable: only indexes of runs are pushed
        };
        let keys = run.keys;
        let mut end = position.saturating_add(1);
        match heap.peek() {
            Some(&Reverse((next_key, next_source))) => {
                while let Some(&key) = keys.get(end) {
                    if key < next_key || (key == next_key && source < next_source) {
                        end += 1;
                    } else {
                        break;
                    }
                }
            }
            None => end = keys.len(),
        }
        if let Some(limit) = limit {
            let (upto, bytes) = within(run, position, end, limit.saturating_sub(total));
            end = upto;
            total = total.saturating_add(bytes);
        }
        if let Some(starts) = run.starts {
            let packets = starts.get(position..end).unwrap_or(&[]).iter();
            for (&start, &stop) in packets.zip(run.ends.get(position..end).unwrap_or(&[])) {
                match segments.last_mut() {
                    Some(last) if last.source == source && last.end == start => last.end = stop,
                    _ => segments.push(Segment {
                        source,
                        start,
                        end: stop,
                    }),
                }
            }
        } else {
            let start = run.start_of(position);
            let Some(&stop) = run.ends.get(end.saturating_sub(1)) else {
                break; // unreachable: end is at most keys.len() == ends.len() and at least 1
            };
            segments.push(Segment {
                source,
                start,
                end: stop,
            });
        }
        if let Some(slot) = positions.get_mut(source) {
            *slot = end;
        }
        if limit.is_some_and(|limit| total >= limit) {
            break;
        }
        if let Some(&key) = keys.get(end) {
            heap.push(Reverse((key, source)));
        }
    }
    Ok((segments, positions))
}

/// Of the run's packets `position..end` (checked: ends in order, or starts before ends), the
/// first ones up to the one that brings their bytes to `room` or more: where they end, and
/// their bytes.
fn within(run: &Run<'_>, position: usize, end: usize, room: u64) -> (usize, u64) {
    let ends = run.ends.get(position..end).unwrap_or(&[]);
    match run.starts {
        Some(starts) => {
            let starts = starts.get(position..end).unwrap_or(&[]);
            let mut bytes = 0u64;
            for (index, (&start, &stop)) in starts.iter().zip(ends).enumerate() {
                bytes = bytes.saturating_add(stop.saturating_sub(start));
                if bytes >= room {
                    return (position + index + 1, bytes);
                }
            }
            (end, bytes)
        }
        None => {
            let first = run.start_of(position);
            let short = ends.partition_point(|&stop| stop.saturating_sub(first) < room);
            let upto = (short + 1).min(ends.len());
            let last = ends.get(upto.saturating_sub(1)).copied().unwrap_or(first);
            (position + upto, last.saturating_sub(first))
        }
    }
}

/// One piece of the output: bytes to copy, or a range of one blob to hand out as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes of blob `blob` of `source` from `from`, copied into the output buffer.
    Copy {
        source: usize,
        blob: usize,
        from: usize,
        len: usize,
    },
    /// Bytes `from..from + len` of blob `blob` of `source`, shared.
    Share {
        source: usize,
        blob: usize,
        from: usize,
        len: usize,
    },
}

/// Where the segments' bytes are in the sources' blobs (each source's blobs as (stream offset,
/// length), in stream order): pieces of at least `share_min` bytes are shared, the rest copied.
pub fn plan(
    segments: &[Segment],
    blobs: &[Vec<(u64, u64)>],
    share_min: u64,
) -> Result<Vec<Piece>, MergeError> {
    for (source, source_blobs) in blobs.iter().enumerate() {
        let mut previous = 0u64;
        for &(offset, length) in source_blobs {
            let end = offset.checked_add(length).ok_or(MergeError::Overflow)?;
            if offset < previous {
                return Err(MergeError::Missing {
                    source,
                    start: offset,
                    end,
                });
            }
            previous = end;
        }
    }
    let mut cursors = vec![0usize; blobs.len()];
    let mut pieces = Vec::with_capacity(segments.len());
    for segment in segments {
        let missing = MergeError::Missing {
            source: segment.source,
            start: segment.start,
            end: segment.end,
        };
        let (Some(source_blobs), Some(cursor)) =
            (blobs.get(segment.source), cursors.get_mut(segment.source))
        else {
            return Err(missing);
        };
        let mut at = segment.start;
        if at == segment.end {
            continue;
        }
        while at < segment.end {
            let mut entry = source_blobs.get(*cursor).copied();
            if !matches!(entry, Some((offset, length))
                         if offset <= at && at < offset.saturating_add(length))
            {
                // not in stream order (live mode, reordered packets) or past the cursor's blob
                *cursor = source_blobs
                    .partition_point(|&(offset, length)| offset.saturating_add(length) <= at);
                entry = source_blobs.get(*cursor).copied();
            }
            let (offset, length) = entry.ok_or(missing.clone())?;
            let stop = offset.checked_add(length).ok_or(MergeError::Overflow)?;
            if at < offset || at >= stop {
                return Err(missing);
            }
            let upto = segment.end.min(stop);
            let from = usize::try_from(at - offset).map_err(|_| MergeError::Overflow)?;
            let len = usize::try_from(upto - at).map_err(|_| MergeError::Overflow)?;
            let (source, blob) = (segment.source, *cursor);
            pieces.push(if upto - at >= share_min {
                Piece::Share {
                    source,
                    blob,
                    from,
                    len,
                }
            } else {
                Piece::Copy {
                    source,
                    blob,
                    from,
                    len,
                }
            });
            at = upto;
        }
    }
    Ok(pieces)
}

/// Copy the `Copy` pieces from `pieces[range]` into `out`, which is exactly as long as they are
/// together. `bytes_of(source, blob)` gives a blob's bytes.
pub fn gather<'b>(
    pieces: &[Piece],
    bytes_of: impl Fn(usize, usize) -> Option<&'b [u8]>,
    out: &mut [MaybeUninit<u8>],
) -> Result<(), MergeError> {
    gather_with(
        pieces,
        |source, blob, from, dst| bytes_of(source, blob).is_some_and(|b| copy_from(b, from, dst)),
        out,
    )
}

/// Writes all of `dst` from `bytes[from..]`; false when `bytes` is too short.
fn copy_from(bytes: &[u8], from: usize, dst: &mut [MaybeUninit<u8>]) -> bool {
    let src = from
        .checked_add(dst.len())
        .and_then(|upto| bytes.get(from..upto));
    src.is_some_and(|src| dst.put(0, src))
}

/// `gather` with `copy(source, blob, from, dst)` writing all of `dst` from bytes `from..` of a
/// blob, or returning false when the blob does not have them.
pub fn gather_with(
    pieces: &[Piece],
    copy: impl Fn(usize, usize, usize, &mut [MaybeUninit<u8>]) -> bool,
    out: &mut [MaybeUninit<u8>],
) -> Result<(), MergeError> {
    let mut at = 0usize;
    for piece in pieces {
        let Piece::Copy {
            source,
            blob,
            from,
            len,
        } = *piece
        else {
            continue;
        };
        let end = at.checked_add(len).ok_or(MergeError::Overflow)?;
        let dst = out.get_mut(at..end).ok_or(MergeError::Overflow)?;
        if !copy(source, blob, from, dst) {
            return Err(MergeError::Missing {
                source,
                start: from as u64,
                end: (from as u64).saturating_add(len as u64),
            });
        }
        at = end;
    }
    if at != out.len() {
        return Err(MergeError::Overflow);
    }
    Ok(())
}

/// A blob of a source: EPBs as bytes, or classic pcap records that become EPBs when copied.
enum Blob<'py> {
    Bytes(Bound<'py, PyBytes>),
    Records(Bound<'py, PcapRecords>),
}

impl<'py> Blob<'py> {
    fn extract(object: Bound<'py, PyAny>) -> PyResult<Self> {
        match object.cast_into::<PyBytes>() {
            Ok(bytes) => Ok(Blob::Bytes(bytes)),
            Err(error) => Ok(Blob::Records(error.into_inner().cast_into()?)),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Blob::Bytes(bytes) => bytes.as_bytes().len() as u64,
            Blob::Records(records) => records.get().size(),
        }
    }

    fn copy(&self, from: usize, dst: &mut [MaybeUninit<u8>]) -> bool {
        match self {
            Blob::Bytes(bytes) => copy_from(bytes.as_bytes(), from, dst),
            Blob::Records(records) => records.get().write_in(records.py(), from as u64, dst),
        }
    }
}

// --- Python ---------------------------------------------------------------------------------

/// `Queue` or `LiveQueue` for Python: one per source of a merger with the compiled core.
#[pyclass(module = "multisniff._core", name = "KeyQueue")]
pub struct KeyQueue {
    queue: Mode,
}

enum Mode {
    Exact(Queue),
    Live(LiveQueue),
}

impl KeyQueue {
    fn append_batch(
        &mut self,
        keys: &[i64],
        ends: &[u64],
        size: u64,
        released: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        match &mut self.queue {
            Mode::Exact(queue) => {
                queue.append(keys, ends, size)?;
                Ok(0)
            }
            Mode::Live(queue) => {
                let released = match released {
                    None => None,
                    // below every key: none is late; beyond them all: every one is
                    Some(released) => Some(match bound(released)? {
                        None => i64::MIN,
                        Some((_, true)) => {
                            queue.append(keys, ends, size, None)?;
                            return Ok(keys.len());
                        }
                        Some((value, false)) => value,
                    }),
                };
                Ok(queue.append(keys, ends, size, released)?)
            }
        }
    }

    fn pending_count(&self) -> usize {
        match &self.queue {
            Mode::Exact(queue) => queue.pending(),
            Mode::Live(queue) => queue.pending(),
        }
    }

    fn run(&self, count: usize) -> Result<Run<'_>, MergeError> {
        match &self.queue {
            Mode::Exact(queue) => queue.run(count),
            Mode::Live(queue) => queue.run(count),
        }
    }

    fn consume(&mut self, count: usize) -> Result<(), MergeError> {
        match &mut self.queue {
            Mode::Exact(queue) => queue.consume(count),
            Mode::Live(queue) => queue.consume(count),
        }
    }
}

/// An int that may not fit 64 bits as a bound on keys: None when it is below every key, else
/// the highest i64 at most it (with whether it was beyond them all).
fn bound(value: &Bound<'_, PyAny>) -> PyResult<Option<(i64, bool)>> {
    match value.extract::<i64>() {
        Ok(value) => Ok(Some((value, false))),
        Err(_) if value.gt(0)? => Ok(Some((i64::MAX, true))),
        Err(_) => Ok(None),
    }
}

fn u64_list(list: &Bound<'_, PyList>) -> PyResult<Vec<u64>> {
    let mut values = Vec::with_capacity(list.len());
    for item in list.iter() {
        values.push(item.extract::<u64>()?);
    }
    Ok(values)
}

fn i64_list(list: &Bound<'_, PyList>) -> PyResult<Vec<i64>> {
    let mut values = Vec::with_capacity(list.len());
    for item in list.iter() {
        values.push(item.extract::<i64>()?);
    }
    Ok(values)
}

#[pymethods]
impl KeyQueue {
    #[new]
    #[pyo3(signature = (*, live = false))]
    fn py_new(live: bool) -> Self {
        let queue = if live {
            Mode::Live(LiveQueue::new())
        } else {
            Mode::Exact(Queue::new())
        };
        Self { queue }
    }

    /// Add a batch: `Batch.keys`, `Batch.ends` and `size`, the length of its packets' EPBs
    /// together (of `b"".join(Batch.pieces)`, which need not be joined); in live mode, returns how many of its keys are below
    /// `released` (late packets). OverflowError when a key does not fit 64 bits (the caller goes
    /// on with the pure-Python merger); ValueError when the ends do not fit the keys or the
    /// bytes. Nothing is changed on error. (The ends are taken from the list, not read from the
    /// blocks' length fields: that touches a cache line per packet, which costs more.)
    #[pyo3(signature = (keys, ends, size, released = None))]
    fn append(
        &mut self,
        keys: &Bound<'_, PyList>,
        ends: &Bound<'_, PyList>,
        size: u64,
        released: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let keys = i64_list(keys)?;
        let ends = u64_list(ends)?;
        self.append_batch(&keys, &ends, size, released)
    }

    /// `append` for each `PcapRecords` piece of a batch, from the keys and ends it carries (no
    /// Python number per packet on either side); returns the late packets of them all.
    #[pyo3(signature = (pieces, released = None))]
    fn append_records(
        &mut self,
        pieces: &Bound<'_, PyList>,
        released: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let mut late = 0usize;
        for piece in pieces.iter() {
            let records: Bound<'_, PcapRecords> = piece.cast_into()?;
            let records = records.get();
            late += self.append_batch(records.keys(), records.ends(), records.size(), released)?;
        }
        Ok(late)
    }

    #[getter]
    fn pending(&self) -> usize {
        self.pending_count()
    }

    /// Exact mode: the highest key received. Live mode: the newest.
    #[getter]
    fn last_key(&self) -> Option<i64> {
        match &self.queue {
            Mode::Exact(queue) => queue.last_key,
            Mode::Live(queue) => queue.newest,
        }
    }

    /// Where the first byte still needed is in the source's stream: blobs that end before it
    /// may be dropped.
    #[getter]
    fn first_start(&self) -> u64 {
        match &self.queue {
            Mode::Exact(queue) => queue.first_start,
            Mode::Live(queue) => queue.low,
        }
    }

    /// How many pending packets may be written below (or at, `inclusive`) `horizon`, any int.
    fn releasable(&self, horizon: &Bound<'_, PyAny>, inclusive: bool) -> PyResult<usize> {
        let Some((horizon, beyond)) = bound(horizon)? else {
            return Ok(0);
        };
        if beyond {
            return Ok(self.pending_count());
        }
        Ok(match &self.queue {
            Mode::Exact(queue) => queue.releasable(horizon, inclusive),
            Mode::Live(queue) => queue.releasable(horizon, inclusive),
        })
    }

    /// The key of the `index`-th pending packet.
    fn key_at(&self, index: usize) -> PyResult<i64> {
        let (keys, head) = match &self.queue {
            Mode::Exact(queue) => (&queue.keys, queue.head),
            Mode::Live(queue) => (&queue.keys, queue.head),
        };
        let key = head.checked_add(index).and_then(|at| keys.get(at));
        key.copied()
            .ok_or_else(|| PyIndexError::new_err("no pending packet there"))
    }

    /// Exact mode: (keys, ends, head, first_start) as the pure-Python merger keeps them. Live
    /// mode: (keys, starts, ends) of the pending packets.
    fn export<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        match &self.queue {
            Mode::Exact(queue) => (
                queue.keys.clone(),
                queue.ends.clone(),
                queue.head,
                queue.first_start,
            )
                .into_pyobject(py),
            Mode::Live(queue) => {
                let head = queue.head;
                let pending = |values: &Vec<u64>| values.get(head..).unwrap_or(&[]).to_vec();
                (
                    queue.keys.get(head..).unwrap_or(&[]).to_vec(),
                    pending(&queue.starts),
                    pending(&queue.ends),
                )
                    .into_pyobject(py)
            }
        }
    }
}

/// Merge and take the next `count` packets of every queue: `parts` is a list of (queue, count,
/// blobs) in source order, blobs the source's [(stream offset, bytes)] in stream order. With a
/// `limit`, stop at the first packet that brings the merged bytes to `limit` or more (the rest
/// stays in the queues). Returns (blocks, packets taken): the merged packets as a list of
/// blocks, one bytes object for each stretch of copied packets, a memoryview for every run of
/// one source of at least `share_min` bytes in one blob.
#[pyfunction]
#[pyo3(signature = (parts, share_min, limit = None))]
fn merge<'py>(
    py: Python<'py>,
    parts: &Bound<'py, PyList>,
    share_min: u64,
    limit: Option<u64>,
) -> PyResult<(Bound<'py, PyList>, usize)> {
    let mut queues: Vec<PyRef<'py, KeyQueue>> = Vec::with_capacity(parts.len());
    let mut counts = Vec::with_capacity(parts.len());
    let mut blob_objects: Vec<Vec<Blob<'py>>> = Vec::with_capacity(parts.len());
    let mut blob_ranges: Vec<Vec<(u64, u64)>> = Vec::with_capacity(parts.len());
    for part in parts.iter() {
        let (queue, count, blobs): (Bound<'py, KeyQueue>, usize, Bound<'py, PyList>) =
            part.extract()?;
        if queues.iter().any(|seen| seen.as_ptr() == queue.as_ptr()) {
            return Err(PyValueError::new_err("a queue is given twice to one merge"));
        }
        let mut objects = Vec::with_capacity(blobs.len());
        let mut ranges = Vec::with_capacity(blobs.len());
        for blob in blobs.iter() {
            let (offset, object): (u64, Bound<'py, PyAny>) = blob.extract()?;
            let object = Blob::extract(object)?;
            ranges.push((offset, object.len()));
            objects.push(object);
        }
        queues.push(queue.try_borrow()?);
        counts.push(count);
        blob_objects.push(objects);
        blob_ranges.push(ranges);
    }
    let runs = queues
        .iter()
        .zip(&counts)
        .map(|(queue, &count)| queue.run(count))
        .collect::<Result<Vec<_>, _>>()?;
    let (segments, taken) = merge_order_until(&runs, limit)?;
    let mut pieces = plan(&segments, &blob_ranges, share_min)?;
    drop(runs);
    let blob_at = |source: usize, blob: usize| blob_objects.get(source)?.get(blob);
    for piece in pieces.iter_mut() {
        // records are copied: only EPBs that exist as bytes can be shared
        if let Piece::Share {
            source,
            blob,
            from,
            len,
        } = *piece
        {
            if let Some(Blob::Records(_)) = blob_at(source, blob) {
                *piece = Piece::Copy {
                    source,
                    blob,
                    from,
                    len,
                };
            }
        }
    }
    let copy = |source: usize, blob: usize, from: usize, dst: &mut [MaybeUninit<u8>]| {
        blob_at(source, blob).is_some_and(|object| object.copy(from, dst))
    };
    let out = PyList::empty(py);
    let mut stretch_start = 0usize;
    for (index, piece) in pieces.iter().enumerate() {
        if let Piece::Share {
            source,
            blob,
            from,
            len,
        } = *piece
        {
            copy_stretch(
                py,
                &out,
                pieces.get(stretch_start..index).unwrap_or(&[]),
                &copy,
            )?;
            stretch_start = index + 1;
            let Some(Blob::Bytes(object)) = blob_at(source, blob) else {
                return Err(PyValueError::new_err("a blob to share is missing"));
            };
            let view = PyMemoryView::from(object.as_any())?;
            let to = from.checked_add(len).ok_or(MergeError::Overflow)?;
            let slice = PySlice::new(
                py,
                isize::try_from(from).map_err(|_| MergeError::Overflow)?,
                isize::try_from(to).map_err(|_| MergeError::Overflow)?,
                1,
            );
            out.append(view.get_item(slice)?)?;
        }
    }
    copy_stretch(py, &out, pieces.get(stretch_start..).unwrap_or(&[]), &copy)?;
    drop(queues);
    for (part, &count) in parts.iter().zip(&taken) {
        let queue: Bound<'py, KeyQueue> = part.get_item(0)?.cast_into()?;
        queue.try_borrow_mut()?.consume(count)?;
    }
    Ok((out, taken.iter().sum()))
}

fn copy_stretch<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyList>,
    pieces: &[Piece],
    copy: &impl Fn(usize, usize, usize, &mut [MaybeUninit<u8>]) -> bool,
) -> PyResult<()> {
    let mut total = 0usize;
    for piece in pieces {
        if let Piece::Copy { len, .. } = piece {
            total = total.checked_add(*len).ok_or(MergeError::Overflow)?;
        }
    }
    if total == 0 {
        return Ok(());
    }
    let bytes = uninit_bytes(py, total, |buffer| gather_with(pieces, copy, buffer))?;
    out.append(bytes)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<KeyQueue>()?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(runs: &[Run<'_>]) -> Vec<(usize, u64, u64)> {
        merge_order(runs)
            .unwrap()
            .into_iter()
            .map(|segment| (segment.source, segment.start, segment.end))
            .collect()
    }

    #[test]
    fn a_limit_stops_at_the_packet_that_reaches_it() {
        let a = Run {
            keys: &[1, 2, 3, 7],
            ends: &[110, 120, 130, 140],
            first: 100,
            starts: None,
        };
        let b = Run {
            keys: &[4, 5, 6],
            ends: &[10, 30, 40],
            first: 0,
            starts: Some(&[0, 20, 30]),
        };
        let cut = |limit| {
            let (segments, taken) = merge_order_until(&[a, b], Some(limit)).unwrap();
            let segments: Vec<_> = segments
                .into_iter()
                .map(|segment| (segment.source, segment.start, segment.end))
                .collect();
            (segments, taken)
        };
        assert_eq!(cut(1), (vec![(0, 100, 110)], vec![1, 0]));
        assert_eq!(cut(10), (vec![(0, 100, 110)], vec![1, 0]));
        assert_eq!(cut(11), (vec![(0, 100, 120)], vec![2, 0]));
        // into the live run, whose packets are not contiguous: 30 + 10 + 10 bytes
        assert_eq!(
            cut(41),
            (vec![(0, 100, 130), (1, 0, 10), (1, 20, 30)], vec![3, 2])
        );
        assert_eq!(
            cut(1 << 40),
            (
                vec![(0, 100, 130), (1, 0, 10), (1, 20, 40), (0, 130, 140)],
                vec![4, 3]
            )
        );
        assert_eq!(merge_order_until(&[], Some(1)), Ok((vec![], vec![])));
    }

    #[test]
    fn interleaved_runs_alternate_and_ties_go_to_the_first_run() {
        let a = Run {
            keys: &[1, 3, 5],
            ends: &[10, 20, 30],
            first: 0,
            starts: None,
        };
        let b = Run {
            keys: &[1, 2, 6],
            ends: &[5, 10, 15],
            first: 0,
            starts: None,
        };
        assert_eq!(
            order(&[a, b]),
            vec![(0, 0, 10), (1, 0, 10), (0, 10, 30), (1, 10, 15)]
        );
    }

    #[test]
    fn equal_keys_in_the_second_run_wait_for_the_first() {
        let a = Run {
            keys: &[2, 2],
            ends: &[4, 8],
            first: 0,
            starts: None,
        };
        let b = Run {
            keys: &[2],
            ends: &[4],
            first: 0,
            starts: None,
        };
        assert_eq!(order(&[b, a]), vec![(0, 0, 4), (1, 0, 8)]);
        assert_eq!(order(&[a, b]), vec![(0, 0, 8), (1, 0, 4)]);
    }

    #[test]
    fn hostile_runs_are_errors() {
        let uneven = Run {
            keys: &[1, 2],
            ends: &[4],
            first: 0,
            starts: None,
        };
        assert_eq!(
            merge_order(&[uneven]),
            Err(MergeError::Lengths { keys: 2, ends: 1 })
        );
        let backwards = Run {
            keys: &[1, 2],
            ends: &[8, 4],
            first: 0,
            starts: None,
        };
        assert!(matches!(
            merge_order(&[backwards]),
            Err(MergeError::Backwards { .. })
        ));
        let before_first = Run {
            keys: &[1],
            ends: &[4],
            first: 9,
            starts: None,
        };
        assert!(matches!(
            merge_order(&[before_first]),
            Err(MergeError::Backwards { .. })
        ));
        let unsorted = Run {
            keys: &[9, 1, i64::MIN, i64::MAX],
            ends: &[1, 2, 3, 4],
            first: 0,
            starts: None,
        };
        assert_eq!(order(&[unsorted]), vec![(0, 0, 4)]);
        assert_eq!(merge_order(&[]), Ok(vec![]));
        let empty = Run {
            keys: &[],
            ends: &[],
            first: u64::MAX,
            starts: None,
        };
        assert_eq!(merge_order(&[empty, empty]), Ok(vec![]));
    }

    #[test]
    fn append_raises_backward_keys_and_checks_ends() {
        let mut queue = Queue::new();
        queue.append(&[5, 3, 7], &[4, 8, 12], 12).unwrap();
        queue.append(&[6, 9], &[4, 8], 8).unwrap();
        assert_eq!(queue.keys, vec![5, 5, 7, 7, 9]);
        assert_eq!(queue.ends, vec![4, 8, 12, 16, 20]);
        let before = queue.clone();
        assert!(queue.append(&[1], &[], 0).is_err());
        assert!(queue.append(&[1, 2], &[8, 4], 8).is_err());
        assert!(queue.append(&[1], &[9], 8).is_err());
        assert!(queue.append(&[1], &[1], u64::MAX).is_err());
        assert_eq!(queue, before);
        queue.append(&[], &[], 0).unwrap();
        assert_eq!(queue, before);
    }

    #[test]
    fn cuts_past_the_pending_packets_are_errors() {
        let mut queue = Queue::new();
        queue.append(&[1, 2, 3], &[4, 8, 12], 12).unwrap();
        assert_eq!(queue.releasable(2, true), 2);
        assert_eq!(queue.releasable(2, false), 1);
        assert_eq!(queue.releasable(i64::MIN, false), 0);
        assert_eq!(queue.releasable(i64::MAX, true), 3);
        assert!(queue.run(4).is_err());
        assert!(queue.run(usize::MAX).is_err());
        assert!(queue.consume(4).is_err());
        queue.consume(2).unwrap();
        let run = queue.run(1).unwrap();
        assert_eq!((run.keys, run.ends, run.first), (&[3][..], &[12][..], 8));
        queue.consume(1).unwrap();
        // more than half written: the next batch drops them
        queue.append(&[4], &[4], 4).unwrap();
        assert_eq!(
            (queue.keys.len(), queue.head, queue.first_start),
            (1, 0, 12)
        );
        assert_eq!(queue.run(1).unwrap().first, 12);
    }

    #[test]
    fn plan_shares_long_pieces_and_splits_at_blob_boundaries() {
        let segments = [
            Segment {
                source: 0,
                start: 0,
                end: 4,
            },
            Segment {
                source: 1,
                start: 10,
                end: 30,
            },
            Segment {
                source: 0,
                start: 4,
                end: 6,
            },
        ];
        let blobs = vec![vec![(0, 6)], vec![(10, 8), (18, 20)]];
        let pieces = plan(&segments, &blobs, 10).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Copy {
                    source: 0,
                    blob: 0,
                    from: 0,
                    len: 4
                },
                Piece::Copy {
                    source: 1,
                    blob: 0,
                    from: 0,
                    len: 8
                },
                Piece::Share {
                    source: 1,
                    blob: 1,
                    from: 0,
                    len: 12
                },
                Piece::Copy {
                    source: 0,
                    blob: 0,
                    from: 4,
                    len: 2
                },
            ]
        );
        let source0 = [1u8, 2, 3, 4, 5, 6];
        let source1 = [7u8; 8];
        let bytes_of = |source: usize, blob: usize| match (source, blob) {
            (0, 0) => Some(&source0[..]),
            (1, 0) => Some(&source1[..]),
            _ => None,
        };
        let mut out = [MaybeUninit::new(0u8); 14];
        gather(&pieces, bytes_of, &mut out).unwrap();
        let out = out.map(|byte| unsafe { byte.assume_init() });
        assert_eq!(out, [1, 2, 3, 4, 7, 7, 7, 7, 7, 7, 7, 7, 5, 6]);
        let mut out = [MaybeUninit::new(0u8); 14];
        let mut short = [MaybeUninit::new(0u8); 13];
        assert!(gather(&pieces, bytes_of, &mut short).is_err());
        let mut long = [MaybeUninit::new(0u8); 15];
        assert!(gather(&pieces, bytes_of, &mut long).is_err());
        assert!(gather(&pieces, |_, _| Some(&source0[..1]), &mut out).is_err());
    }

    #[test]
    fn plan_refuses_bytes_that_no_blob_holds() {
        let gap = [Segment {
            source: 0,
            start: 4,
            end: 12,
        }];
        assert!(plan(&gap, &[vec![(0, 6), (8, 4)]], 0).is_err());
        assert!(plan(&gap, &[vec![(6, 10)]], 0).is_err());
        assert!(plan(&gap, &[], 0).is_err());
        assert!(plan(&gap, &[vec![(u64::MAX, u64::MAX)]], 0).is_err());
        let past = [Segment {
            source: 0,
            start: 0,
            end: 12,
        }];
        assert!(plan(&past, &[vec![(0, 6)]], 0).is_err());
        assert_eq!(
            plan(
                &[Segment {
                    source: 7,
                    start: 3,
                    end: 3
                }],
                &[],
                0
            )
            .is_err(),
            true
        );
    }

    #[test]
    fn live_queues_sort_stably_count_late_packets_and_refuse_hostile_batches() {
        let mut queue = LiveQueue::new();
        assert_eq!(queue.append(&[5, 3, 5], &[4, 8, 12], 12, None), Ok(0));
        assert_eq!(queue.keys, vec![3, 5, 5]);
        assert_eq!(
            (queue.starts.clone(), queue.ends.clone()),
            (vec![4, 0, 8], vec![8, 4, 12])
        );
        // behind the held packets: merged in, held ones first among equal keys
        assert_eq!(queue.append(&[5, 1], &[4, 8], 8, Some(4)), Ok(1));
        assert_eq!(queue.keys, vec![1, 3, 5, 5, 5]);
        assert_eq!(queue.starts, vec![16, 4, 0, 8, 12]);
        let run = queue.run(5).unwrap();
        let segments = merge_order(&[run]).unwrap();
        let spans: Vec<(u64, u64)> = segments.iter().map(|s| (s.start, s.end)).collect();
        assert_eq!(spans, vec![(16, 20), (4, 8), (0, 4), (8, 16)]);
        let before = queue.clone();
        assert!(queue.append(&[1], &[], 0, None).is_err());
        assert!(queue.append(&[1, 2], &[8, 4], 8, None).is_err());
        assert!(queue.append(&[1], &[9], 8, None).is_err());
        assert!(queue.append(&[1], &[1], u64::MAX, None).is_err());
        assert_eq!(queue, before);
        assert!(queue.run(6).is_err() && queue.consume(6).is_err());
        queue.consume(3).unwrap();
        assert_eq!(queue.append(&[i64::MIN], &[4], 4, Some(i64::MIN)), Ok(0));
        assert_eq!((queue.head, queue.keys.len(), queue.low), (0, 3, 8));
        assert_eq!(queue.releasable(i64::MAX, true), 3);
        assert_eq!(queue.newest, Some(5));
    }

    #[test]
    fn reordered_runs_are_checked_and_found_in_any_blob() {
        let ends = [8u64, 4];
        let lying = Run {
            keys: &[1, 2],
            ends: &ends,
            first: 0,
            starts: Some(&[9, 0]),
        };
        assert!(matches!(
            merge_order(&[lying]),
            Err(MergeError::Backwards { .. })
        ));
        let short = Run {
            keys: &[1, 2],
            ends: &ends,
            first: 0,
            starts: Some(&[0]),
        };
        assert!(matches!(
            merge_order(&[short]),
            Err(MergeError::Lengths { .. })
        ));
        let run = Run {
            keys: &[1, 2],
            ends: &ends,
            first: 0,
            starts: Some(&[4, 0]),
        };
        let segments = merge_order(&[run]).unwrap();
        let pieces = plan(&segments, &[vec![(0, 4), (4, 4)]], 1 << 20).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Copy {
                    source: 0,
                    blob: 1,
                    from: 0,
                    len: 4
                },
                Piece::Copy {
                    source: 0,
                    blob: 0,
                    from: 0,
                    len: 4
                },
            ]
        );
        assert!(plan(&segments, &[vec![(4, 4), (0, 4)]], 0).is_err());
        assert!(plan(&segments, &[vec![(4, 4)]], 0).is_err());
    }
}
