//! The fuzz entry of the compiled core: `fuzz_one` takes one input made by a fuzzer (libFuzzer,
//! through cargo-fuzz's target in `rust/fuzz`; `make fuzz-core`) and runs the crate's plain
//! parsing functions on it, without Python.
//!
//! The contract it checks is the crate's: on any input every function returns, and none
//! panics, reads out of bounds or allocates what the input merely claims. A panic here is a bug;
//! the fuzzers report it with the input that caused it.
//!
//! An input is a 4-byte header, then the capture (`rust/fuzz/seeds.py` makes seeds so): the
//! header chooses what a caller would pass besides the bytes (byte order, timestamp units, the
//! captured-length cap) and where the capture is cut in two, as a chunked feed cuts it. Hostile
//! parameters are part of the input: the functions must hold for any the Python side passes.

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

fn parse(case: &Case<'_>, piece: &[u8]) {
    // The parsers of this branch: none yet (see the function's documentation).
    let _ = (case, piece);
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
