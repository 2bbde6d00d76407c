//! The fuzz entry of the compiled core: `fuzz_one` takes one input made by a fuzzer (libFuzzer,
//! through cargo-fuzz's target in `rust/fuzz`; `make fuzz-core`) and runs the crate's plain
//! parsing functions on it, without Python.
//!
//! The contract it checks is the crate's: on any input every function returns, and none
//! panics, reads out of bounds or allocates what the input merely claims. A panic here is a bug;
//! the fuzzers report it with the input that caused it.
//!
//! The reader's loops are checked for more than not panicking: what `pcap_scan` and
//! `pcapng_scan` count, `pcap_write` and `pcapng_write` must write, packet for packet.
//!
//! An input is a 4-byte header, then the capture (`rust/fuzz/seeds.py` makes seeds so): the
//! header chooses what a caller would pass besides the bytes (byte order, timestamp units, the
//! captured-length cap) and where the capture is cut in two, as a chunked feed cuts it. Hostile
//! parameters are part of the input: the functions must hold for any the Python side passes.

use crate::{merge, reader};

/// What a fuzz input asks of the parsers besides the capture bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case<'a> {
    pub little: bool,
    /// Timestamp units per second: 10**6 or 10**9.
    pub units: u64,
    /// The largest captured length a caller accepts.
    pub cap: i64,
    /// Where the capture is cut in two, at most its length.
    pub split: usize,
    pub capture: &'a [u8],
}

/// The header's length.
pub const HEADER: usize = 4;

impl<'a> Case<'a> {
    /// The case an input describes; a shorter input than a header is an empty capture.
    pub fn from_input(data: &'a [u8]) -> Case<'a> {
        let mut head = [0u8; HEADER];
        let used = data.len().min(HEADER);
        head[..used].copy_from_slice(&data[..used]);
        let capture = &data[used..];
        let cap = match head[1] & 3 {
            0 => 0,
            1 => 64,
            2 => 262_144,
            _ => i64::MAX,
        };
        let units = if head[0] & 2 == 0 {
            1_000_000
        } else {
            1_000_000_000
        };
        let split = usize::from(u16::from_le_bytes([head[2], head[3]]));
        Case {
            little: head[0] & 1 == 0,
            units,
            cap,
            split: split.min(capture.len()),
            capture,
        }
    }
}

/// Runs every plain parsing function of the crate on `data`; returns normally unless a
/// function panics (which is the bug a fuzzer looks for).
///
/// The parsers are wired here as they land in the crate (the reader's record loops, the merge);
/// each one is called on the whole capture and on its two halves at `split`.
pub fn fuzz_one(data: &[u8]) {
    let case = Case::from_input(data);
    let (head, tail) = case.capture.split_at(case.split);
    for piece in [case.capture, head, tail] {
        parse(&case, piece);
    }
}

/// The largest pcapng block the Python reader accepts by default (MAX_BLOCK_SIZE).
const MAX_BLOCK: u64 = 16 * 1024 * 1024;

fn parse(case: &Case<'_>, piece: &[u8]) {
    // From the start, after a pcap file header and from the middle: where a chunked feed
    // resumes is arbitrary.
    for start in [0, 24.min(piece.len()), piece.len() / 2] {
        classic_pcap(case, piece, start);
        pcapng(case, piece, start);
    }
    queues(piece);
}

/// The merge's queues and order with keys and ends read from the input: they come from our
/// own reader, but must refuse nonsense with an error, never a panic.
fn queues(piece: &[u8]) {
    let words: Vec<u64> = piece
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .collect();
    let (keys, ends) = words.split_at(words.len() / 2);
    let keys: Vec<i64> = keys.iter().map(|&k| k as i64).collect();
    let ends = &ends[..keys.len().min(ends.len())];
    let blob_len = ends.last().copied().unwrap_or(0);
    let mut exact = merge::Queue::new();
    let mut live = merge::LiveQueue::new();
    let _ = exact.append(&keys, ends, blob_len);
    let _ = live.append(&keys, ends, blob_len, keys.first().copied());
    let horizon = keys.get(keys.len() / 2).copied().unwrap_or(0);
    for inclusive in [false, true] {
        let count = exact.releasable(horizon, inclusive);
        let live_count = live.releasable(horizon, inclusive);
        if let (Ok(a), Ok(b)) = (exact.run(count), live.run(live_count)) {
            if let Ok(segments) = merge::merge_order(&[a, b]) {
                let blobs = vec![vec![(0, blob_len)], vec![(0, blob_len / 2)]];
                let _ = merge::plan(&segments, &blobs, 64);
                // a limit takes a prefix of the same order
                let limit = horizon.unsigned_abs() % 4096;
                if let Ok((some, taken)) = merge::merge_order_until(&[a, b], Some(limit)) {
                    assert!(some.len() <= segments.len());
                    assert!(taken.first() <= Some(&count));
                    assert!(taken.get(1) <= Some(&live_count));
                }
            }
        }
        let _ = exact.consume(count);
        let _ = live.consume(live_count);
    }
}

/// The classic-pcap loop: what the scan counts, the write must write, byte for byte.
fn classic_pcap(case: &Case<'_>, piece: &[u8], start: usize) {
    for (key_mult, key_div) in [(1, 1), (1000, 1), (1_000_000_000, case.units)] {
        let params = reader::PcapParams {
            little: case.little,
            units: case.units,
            key_mult,
            key_div,
            oid: 3,
            cap: case.cap,
        };
        let (stop, count, size) = reader::pcap_scan(piece, start, &params);
        assert!(stop >= start && stop <= piece.len());
        let mut out = vec![0u8; size];
        let mut packets = 0usize;
        let mut last_end = 0usize;
        let written = reader::pcap_write(piece, start, stop, &params, &mut out, |_, end| {
            assert!(end > last_end);
            last_end = end;
            packets += 1;
        });
        assert_eq!((written, packets), (size, count));
        // the merger's records: the same packets, and any packet-aligned range of their EPBs
        // written later is that range of what pcap_write wrote
        let records = reader::Records::scan(piece, start, &params, u64::MAX);
        if records.stop() == stop {
            assert_eq!(records.size(), size as u64);
            let ends = records.ends();
            let (a, b) = (ends.len() / 3, ends.len() * 2 / 3);
            let from = a
                .checked_sub(1)
                .and_then(|i| ends.get(i))
                .copied()
                .unwrap_or(0);
            let to = b
                .checked_sub(1)
                .and_then(|i| ends.get(i))
                .copied()
                .unwrap_or(0);
            let mut part = vec![0u8; (to - from) as usize];
            assert!(records.write(piece, from, &mut part));
            assert_eq!(&part[..], &out[from as usize..to as usize]);
            let mut misaligned = vec![0u8; 1];
            assert!(!records.write(piece, 1, &mut misaligned));
        } else {
            // only a key beyond 64 bits stops it before pcap_scan does
            assert!(records.stop() < stop);
        }
    }
}

/// The pcapng loop over a section of a few interfaces (one of which Python would handle).
fn pcapng(case: &Case<'_>, piece: &[u8], start: usize) {
    let interfaces = [
        Some(reader::Interface {
            oid: 0,
            offset: 0,
            key_mult: 1,
            key_div: 1,
            most: case.cap,
        }),
        Some(reader::Interface {
            oid: u32::MAX,
            offset: -(1 << 40),
            key_mult: 1000,
            key_div: i128::from(case.units),
            most: 262_144,
        }),
        None,
    ];
    let (stop, why, count, size) = reader::pcapng_scan(
        piece,
        start,
        &mut reader::section_of(&interfaces),
        MAX_BLOCK,
    );
    assert!(stop >= start && stop <= piece.len());
    if let reader::Stop::Python { end } = why {
        assert!(end > stop && end <= piece.len() || end == piece.len());
    }
    let mut out = vec![0u8; size];
    let mut packets = 0usize;
    let written = reader::pcapng_write(
        piece,
        start,
        stop,
        &mut reader::section_of(&interfaces),
        &mut out,
        |_, _| packets += 1,
    );
    assert_eq!((written, packets), (size, count));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_shorter_than_a_header_are_empty_captures() {
        for input in [&b""[..], b"\x01", b"\x01\x02\x03"] {
            let case = Case::from_input(input);
            assert_eq!((case.split, case.capture), (0, &b""[..]));
            fuzz_one(input);
        }
    }

    #[test]
    fn the_header_chooses_parameters_and_the_split_stays_inside_the_capture() {
        let case = Case::from_input(b"\x03\x01\xff\xffabc");
        assert_eq!(
            (case.little, case.units, case.cap, case.split),
            (false, 1_000_000_000, 64, 3)
        );
        assert_eq!(case.capture, b"abc");
        fuzz_one(b"\x03\x01\xff\xffabc");
    }
}
