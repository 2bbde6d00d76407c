//! The per-packet loops of `multisniff.pcap.reading.CaptureReader` for flat batches: classic
//! pcap records and the common pcapng blocks, transcoded to little-endian EPBs byte for byte
//! as the Python reader makes them.
//!
//! Each loop handles only what it is sure of and stops where Python must decide (a record or
//! block that is incomplete, damaged, of another kind, or a number past what these integer
//! types hold): the Python reader then handles that record or block itself, with its errors
//! and messages, and calls the loop again after it. The plain functions take `&[u8]` and never
//! panic; the `#[pyfunction]` wrappers append their results to the batch's lists.

use std::mem::MaybeUninit;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::buffer::{uninit_bytes, Out};

const EPB: u32 = 6;
const SHB: u32 = 0x0A0D0D0A;
const BYTE_ORDER_MAGIC_LE: u32 = 0x1A2B3C4D;
const BYTE_ORDER_MAGIC_BE: u32 = 0x4D3C2B1A;

fn u16_at(buf: &[u8], at: usize, little: bool) -> Option<u16> {
    let bytes: [u8; 2] = buf.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(if little {
        u16::from_le_bytes(bytes)
    } else {
        u16::from_be_bytes(bytes)
    })
}

fn u32_at(buf: &[u8], at: usize, little: bool) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little {
        u32::from_le_bytes(bytes)
    } else {
        u32::from_be_bytes(bytes)
    })
}

/// What the classic-pcap loop needs of the file header and the reader.
#[derive(Clone, Copy, Debug)]
pub struct PcapParams {
    pub little: bool,
    /// Timestamp units per second (10**6 or 10**9).
    pub units: u64,
    /// The merge key is ts * key_mult // key_div.
    pub key_mult: u64,
    pub key_div: u64,
    /// Interface id written into every EPB.
    pub oid: u32,
    /// The largest captured length accepted; a longer record stops the loop.
    pub cap: i64,
}

impl<'a, 'py> FromPyObject<'a, 'py> for PcapParams {
    type Error = PyErr;

    /// From the reader's `_pcap_kernel`: (little, units, key_mult, key_div, oid, cap).
    fn extract(object: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (little, units, key_mult, key_div, oid, cap) = object.extract()?;
        Ok(PcapParams {
            little,
            units,
            key_mult,
            key_div,
            oid,
            cap,
        })
    }
}

/// One classic-pcap record the loop accepts.
struct Record<'a> {
    ts: u64,
    key: u128,
    incl: u32,
    orig: u32,
    data: &'a [u8],
    total: u32,
}

fn pcap_record<'a>(buf: &'a [u8], pos: usize, p: &PcapParams) -> Option<(Record<'a>, usize)> {
    let sec = u32_at(buf, pos, p.little)?;
    let frac = u32_at(buf, pos.checked_add(4)?, p.little)?;
    let incl = u32_at(buf, pos.checked_add(8)?, p.little)?;
    let orig = u32_at(buf, pos.checked_add(12)?, p.little)?;
    let start = pos.checked_add(16)?;
    let next = start.checked_add(incl as usize)?;
    let data = buf.get(start..next)?;
    if i64::from(incl) > p.cap || p.key_div == 0 {
        return None;
    }
    let ts = u128::from(sec)
        .checked_mul(u128::from(p.units))?
        .checked_add(u128::from(frac))?;
    let ts = u64::try_from(ts).ok()?;
    let scaled = u128::from(ts).checked_mul(u128::from(p.key_mult))?;
    let key = if p.key_div == 1 {
        scaled
    } else {
        scaled / u128::from(p.key_div)
    };
    let total = u32::try_from((u64::from(incl) + 35) & !3).ok()?;
    Some((
        Record {
            ts,
            key,
            incl,
            orig,
            data,
            total,
        },
        next,
    ))
}

/// Where the classic-pcap loop stops from `pos`: the position of the first record it does not
/// take (incomplete, longer than the cap, or out of range), how many it takes, and the size
/// of their EPBs.
pub fn pcap_scan(buf: &[u8], mut pos: usize, p: &PcapParams) -> (usize, usize, usize) {
    let mut count = 0usize;
    let mut size = 0usize;
    while let Some((record, next)) = pcap_record(buf, pos, p) {
        match size.checked_add(record.total as usize) {
            Some(grown) => size = grown,
            None => break,
        }
        count += 1;
        pos = next;
    }
    (pos, count, size)
}

/// Writes the EPBs of the records from `pos` to `stop` (as found by `pcap_scan`) into `out`,
/// calling `packet(key, end offset in out)` for each; returns how many bytes were written.
/// Stops early, never panics, if `out` is too small or `stop` is not where a record ends.
pub fn pcap_write<O: Out + ?Sized>(
    buf: &[u8],
    mut pos: usize,
    stop: usize,
    p: &PcapParams,
    out: &mut O,
    mut packet: impl FnMut(u128, usize),
) -> usize {
    let mut at = 0usize;
    while pos < stop {
        let Some((r, next)) = pcap_record(buf, pos, p) else {
            break;
        };
        let total = r.total as usize;
        match at.checked_add(total) {
            Some(end) if end <= out.size() => {}
            _ => break,
        }
        let fields = [
            EPB,
            r.total,
            p.oid,
            (r.ts >> 32) as u32,
            r.ts as u32,
            r.incl,
            r.orig,
        ];
        let mut header = [0u8; 28];
        for (slot, value) in header.chunks_exact_mut(4).zip(fields) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        // total = 28 + data padded to 4 + 4 >= 32, and at + total fits in out (checked above)
        let data_end = 28 + r.data.len();
        let trailer_at = total - 4;
        let written = out.put(at, &header)
            && out.put(at + 28, r.data)
            && out.zero(at + data_end, trailer_at.saturating_sub(data_end))
            && out.put(at + trailer_at, &r.total.to_le_bytes());
        if !written {
            break;
        }
        at += total;
        packet(r.key, at);
        pos = next;
    }
    at
}

/// One interface of the current pcapng section, as the Python reader keeps it (`_section`),
/// or None where a number does not fit these types (Python handles its packets).
#[derive(Clone, Copy, Debug)]
pub struct Interface {
    pub oid: u32,
    /// if_tsoffset in timestamp units.
    pub offset: i128,
    pub key_mult: i128,
    pub key_div: i128,
    /// The longest captured length accepted.
    pub most: i64,
}

/// The interfaces of the current section by their number in it: `section(local)`.
pub trait Section: FnMut(u32) -> Option<Interface> {}
impl<F: FnMut(u32) -> Option<Interface>> Section for F {}

/// A `Section` over a slice.
pub fn section_of(interfaces: &[Option<Interface>]) -> impl Section + '_ {
    |local| interfaces.get(local as usize).copied().flatten()
}

/// Why the pcapng loop stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The block at the stop position is not complete in the buffer (or the buffer ends).
    Incomplete,
    /// Python must handle the block at the stop position: it ends at `end` (or `end` is the
    /// buffer's length, where the block is unsound and Python reports it).
    Python { end: usize },
}

/// An EPB the loop accepts: its key and the interface id to write.
fn pcapng_epb(
    buf: &[u8],
    pos: usize,
    length: usize,
    section: &mut impl Section,
) -> Option<(i128, u32)> {
    if length < 32 {
        return None;
    }
    let local = u32_at(buf, pos.checked_add(8)?, true)?;
    let high = u32_at(buf, pos.checked_add(12)?, true)?;
    let low = u32_at(buf, pos.checked_add(16)?, true)?;
    let caplen = u32_at(buf, pos.checked_add(20)?, true)? as usize;
    let iface = section(local)?;
    if caplen > length - 32 || i64::try_from(caplen).ok()? > iface.most {
        return None;
    }
    if iface.key_div <= 0 {
        return None;
    }
    let ts = i128::from(u64::from(high) << 32 | u64::from(low));
    let scaled = ts.checked_add(iface.offset)?.checked_mul(iface.key_mult)?;
    let key = if iface.key_div == 1 {
        scaled
    } else {
        scaled.div_euclid(iface.key_div)
    };
    let options_at = pos.checked_add(28)?.checked_add((caplen + 3) & !3)?;
    let options_end = pos.checked_add(length)?.checked_sub(4)?;
    if options_at != options_end && !options_clean(buf, options_at, options_end) {
        return None;
    }
    Some((key, iface.oid))
}

/// Whether the little-endian options area buf[at..end] of an EPB can be copied as it is:
/// every option inside it and one Wireshark accepts, nothing after opt_endofopt
/// (`CaptureReader._options_clean` with `blocks.option_is_valid`).
pub fn options_clean(buf: &[u8], mut at: usize, end: usize) -> bool {
    loop {
        let Some(header_end) = at.checked_add(4) else {
            return false;
        };
        if header_end > end {
            return at == end;
        }
        let (Some(code), Some(size)) = (u16_at(buf, at, true), u16_at(buf, header_end - 2, true))
        else {
            return false;
        };
        if code == 0 {
            return size == 0 && header_end == end;
        }
        let Some(value_end) = header_end.checked_add(size as usize).filter(|&e| e <= end) else {
            return false;
        };
        let Some(value) = buf.get(header_end..value_end) else {
            return false;
        };
        if !epb_option_is_valid(code, value) {
            return false;
        }
        let Some(next) = value_end.checked_add((4 - (size as usize & 3)) & 3) else {
            return false;
        };
        at = next;
    }
}

/// `blocks.option_is_valid(EPB, code, value)`.
pub fn epb_option_is_valid(code: u16, value: &[u8]) -> bool {
    match code {
        2988 | 2989 | 19372 | 19373 => value.len() >= 4,
        2 | 6 => value.len() == 4,
        4 | 5 => value.len() == 8,
        7 => match value.first() {
            None => false,
            Some(1 | 2) => value.len() == 9,
            Some(_) => true,
        },
        _ => true,
    }
}

/// Where the pcapng loop (a little-endian section) stops from `pos`, why, how many EPBs it
/// takes and their size in bytes. `max_block` is the reader's largest block.
pub fn pcapng_scan(
    buf: &[u8],
    mut pos: usize,
    section: &mut impl Section,
    max_block: u64,
) -> (usize, Stop, usize, usize) {
    let mut count = 0usize;
    let mut size = 0usize;
    let whole = Stop::Python { end: buf.len() };
    loop {
        let header = (
            u32_at(buf, pos, true),
            pos.checked_add(4).and_then(|at| u32_at(buf, at, true)),
        );
        let (Some(block_type), Some(length)) = header else {
            return (pos, Stop::Incomplete, count, size);
        };
        if block_type == SHB {
            return (pos, shb_stop(buf, pos, max_block), count, size);
        }
        if length < 12 || length & 3 != 0 || u64::from(length) > max_block {
            return (pos, whole, count, size);
        }
        let length = length as usize;
        let Some(next) = pos.checked_add(length).filter(|&next| next <= buf.len()) else {
            return (pos, Stop::Incomplete, count, size);
        };
        if u32_at(buf, next - 4, true) != Some(length as u32) {
            return (pos, whole, count, size);
        }
        if block_type != EPB || pcapng_epb(buf, pos, length, section).is_none() {
            return (pos, Stop::Python { end: next }, count, size);
        }
        let Some(grown) = size.checked_add(length) else {
            return (pos, Stop::Python { end: next }, count, size);
        };
        size = grown;
        count += 1;
        pos = next;
    }
}

/// The walk of `_pcapng_census` (offline.py) over the block headers of `buf` from `pos`, in
/// byte order `little` until a section header says otherwise (big-endian for its magic, else
/// little): returns where it stopped (fewer than 12 bytes left in `buf`, or a block length that
/// cannot be right, which ends the census), the byte order there, whether it stopped for a bad
/// length, and every interface description block passed with the byte order of its section.
pub fn pcapng_skim(
    buf: &[u8],
    mut pos: usize,
    mut little: bool,
) -> (usize, bool, bool, Vec<(usize, bool)>) {
    let mut idbs = Vec::new();
    loop {
        if pos.checked_add(12).is_none_or(|end| end > buf.len()) {
            return (pos, little, false, idbs);
        }
        let (Some(block_type), Some(magic)) = (u32_at(buf, pos, true), u32_at(buf, pos + 8, true))
        else {
            return (pos, little, false, idbs);
        };
        if block_type == SHB {
            little = magic != BYTE_ORDER_MAGIC_BE;
        }
        let Some(length) = u32_at(buf, pos + 4, little) else {
            return (pos, little, false, idbs);
        };
        if length < 12 || length & 3 != 0 {
            return (pos, little, true, idbs);
        }
        if u32_at(buf, pos, little) == Some(1) {
            idbs.push((pos, little));
        }
        match pos.checked_add(length as usize) {
            Some(next) => pos = next,
            None => return (pos, little, true, idbs),
        }
    }
}

/// `pcapng_skim` for Python: (stop, little, bad length, [(IDB position, little)]).
#[pyfunction]
fn pcapng_census_walk(
    buf: &[u8],
    pos: usize,
    little: bool,
) -> (usize, bool, bool, Vec<(usize, bool)>) {
    pcapng_skim(buf, pos, little)
}

/// How Python is to handle a section header block at `pos`: alone when it is complete and its
/// length holds, else with the rest of the buffer (where it reports the damage).
fn shb_stop(buf: &[u8], pos: usize, max_block: u64) -> Stop {
    let whole = Stop::Python { end: buf.len() };
    let little = match pos.checked_add(8).and_then(|at| u32_at(buf, at, true)) {
        None => return Stop::Incomplete,
        Some(BYTE_ORDER_MAGIC_LE) => true,
        Some(BYTE_ORDER_MAGIC_BE) => false,
        Some(_) => return whole,
    };
    let Some(length) = pos.checked_add(4).and_then(|at| u32_at(buf, at, little)) else {
        return whole;
    };
    if length < 28 || length & 3 != 0 || u64::from(length) > max_block {
        return whole;
    }
    match pos.checked_add(length as usize) {
        Some(end) if end <= buf.len() => Stop::Python { end },
        _ => Stop::Incomplete,
    }
}

/// Writes the EPBs that `pcapng_scan` took, from `pos` to `stop`, into `out`: each block as it
/// is with its interface id replaced. Calls `packet(key, end offset in out)` for each; returns
/// how many bytes were written. Stops early, never panics, on anything unexpected.
pub fn pcapng_write<O: Out + ?Sized>(
    buf: &[u8],
    mut pos: usize,
    stop: usize,
    section: &mut impl Section,
    out: &mut O,
    mut packet: impl FnMut(i128, usize),
) -> usize {
    let mut at = 0usize;
    while pos < stop {
        let Some(length) = pos.checked_add(4).and_then(|at| u32_at(buf, at, true)) else {
            break;
        };
        let length = length as usize;
        let Some((key, oid)) = pcapng_epb(buf, pos, length, section) else {
            break;
        };
        let Some(src) = pos.checked_add(length).and_then(|end| buf.get(pos..end)) else {
            break;
        };
        // length >= 32 (pcapng_epb): the block with its interface id (bytes 8..12) replaced
        let written = out.put(at, &src[..8])
            && out.put(at + 8, &oid.to_le_bytes())
            && out.put(at + 12, &src[12..]);
        if !written {
            break;
        }
        at += length;
        packet(key, at);
        pos += length; // buf.get(pos..pos + length) held
    }
    at
}

fn key_object<'py>(py: Python<'py>, key: i128) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(small) = i64::try_from(key) {
        return Ok(small.into_pyobject(py)?.into_any());
    }
    if let Ok(unsigned) = u64::try_from(key) {
        return Ok(unsigned.into_pyobject(py)?.into_any());
    }
    Ok(key.into_pyobject(py)?.into_any())
}

/// Appends one piece and its packets' keys and end offsets (from `start` on) to the batch's
/// lists; `write` fills the piece and reports each packet.
fn append_piece<'py>(
    py: Python<'py>,
    size: usize,
    start: u64,
    keys: &Bound<'py, PyList>,
    pieces: &Bound<'py, PyList>,
    ends: &Bound<'py, PyList>,
    write: impl FnOnce(&mut [MaybeUninit<u8>], &mut dyn FnMut(i128, usize)) -> usize,
) -> PyResult<()> {
    let mut found: Vec<(i128, usize)> = Vec::new();
    let mut written = 0usize;
    let piece = uninit_bytes(py, size, |out| {
        written = write(out, &mut |key, end| found.push((key, end)));
        if written == size {
            Ok(())
        } else {
            Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "compiled reader: wrote {written} of {size} bytes (a bug)"
            )))
        }
    })?;
    for (key, end) in found {
        keys.append(key_object(py, key)?)?;
        ends.append(start + end as u64)?;
    }
    pieces.append(piece)?;
    Ok(())
}

/// Classic pcap records of `buf` from `pos`, appended to a flat batch (keys, one piece,
/// ends from `start` on); returns the position of the first record not taken.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn pcap_flat<'py>(
    py: Python<'py>,
    buf: &[u8],
    pos: usize,
    params: PcapParams,
    start: u64,
    keys: &Bound<'py, PyList>,
    pieces: &Bound<'py, PyList>,
    ends: &Bound<'py, PyList>,
) -> PyResult<usize> {
    let (stop, count, size) = pcap_scan(buf, pos, &params);
    if count > 0 {
        append_piece(py, size, start, keys, pieces, ends, |out, packet| {
            pcap_write(buf, pos, stop, &params, out, |key, end| {
                packet(key as i128, end)
            })
        })?;
    }
    Ok(stop)
}

/// Classic pcap records found in a buffer, to be written out as EPBs later (`Records::write`):
/// where each starts, its merge key and where its EPB ends.
#[derive(Debug, Clone)]
pub struct Records {
    params: PcapParams,
    /// Where each record starts in the buffer, and where the last one ends.
    starts: Vec<usize>,
    stop: usize,
    /// The merge key of each record.
    keys: Vec<i64>,
    /// The end of each record's EPB, counted from the start of the first one.
    ends: Vec<u64>,
}

impl Records {
    /// The records of `buf` from `pos` that `pcap_write` would take, up to the first one whose
    /// key is beyond 64 bits or whose EPB would end past `limit` bytes (both left to Python).
    pub fn scan(buf: &[u8], pos: usize, params: &PcapParams, limit: u64) -> Self {
        let mut records = Records {
            params: *params,
            starts: Vec::new(),
            stop: pos,
            keys: Vec::new(),
            ends: Vec::new(),
        };
        let mut size = 0u64;
        while let Some((record, next)) = pcap_record(buf, records.stop, params) {
            let (Some(grown), Ok(key)) = (
                size.checked_add(u64::from(record.total)),
                i64::try_from(record.key),
            ) else {
                break;
            };
            if grown > limit {
                break;
            }
            size = grown;
            records.starts.push(records.stop);
            records.keys.push(key);
            records.ends.push(size);
            records.stop = next;
        }
        records
    }

    /// Where the first record not taken starts.
    pub fn stop(&self) -> usize {
        self.stop
    }

    pub fn keys(&self) -> &[i64] {
        &self.keys
    }

    /// The end of each record's EPB, counted from the start of the first one.
    pub fn ends(&self) -> &[u64] {
        &self.ends
    }

    /// The EPB length of all the records.
    pub fn size(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Writes the EPBs that are bytes `from..from + out.len()` of the records' EPBs into `out`,
    /// from `buf`, the buffer they were scanned in; false (with `out` not fully written) when
    /// the range does not begin and end at packets or `buf` is not that buffer.
    pub fn write<O: Out + ?Sized>(&self, buf: &[u8], from: u64, out: &mut O) -> bool {
        let Some(to) = from.checked_add(out.size() as u64) else {
            return false;
        };
        let packet_after = |offset: u64| -> Option<usize> {
            if offset == 0 {
                return Some(0);
            }
            self.ends.binary_search(&offset).ok().map(|index| index + 1)
        };
        let Some(first) = packet_after(from) else {
            return false;
        };
        // most ranges the merge asks for are one packet (interleaved inputs): no second search
        let last = if self.ends.get(first) == Some(&to) {
            first + 1
        } else {
            match packet_after(to) {
                Some(last) => last,
                None => return false,
            }
        };
        let (Some(&pos), Some(stop)) = (
            self.starts.get(first),
            self.starts
                .get(last)
                .copied()
                .or_else(|| (last == self.starts.len()).then_some(self.stop)),
        ) else {
            return out.size() == 0;
        };
        pcap_write(buf, pos, stop, &self.params, out, |_, _| {}) == out.size()
    }
}

/// Classic pcap records left in the bytes they were read in, written out as EPBs only when the
/// merge copies them into its output: one copy of each packet less than an EPB piece made at
/// once. Behaves as the piece of EPBs it stands for: `len()` is their length, `bytes()` makes
/// them. Only the merger asks for these (`CaptureReader(records=True)`).
#[pyclass(module = "multisniff._core", name = "PcapRecords", frozen)]
pub struct PcapRecords {
    chunk: Py<PyBytes>,
    records: Records,
    /// Where the first EPB starts in the batch's flat stream (`Batch.ends` counts from there).
    start: u64,
}

impl PcapRecords {
    pub fn keys(&self) -> &[i64] {
        self.records.keys()
    }

    pub fn ends(&self) -> &[u64] {
        self.records.ends()
    }

    pub fn size(&self) -> u64 {
        self.records.size()
    }
}

impl PcapRecords {
    /// `write` from the bytes the records were read in.
    pub fn write_in(&self, py: Python<'_>, from: u64, out: &mut [MaybeUninit<u8>]) -> bool {
        self.records
            .write(self.chunk.bind(py).as_bytes(), from, out)
    }
}

#[pymethods]
impl PcapRecords {
    fn __len__(&self) -> usize {
        usize::try_from(self.size()).unwrap_or(usize::MAX)
    }

    /// How many records (packets).
    #[getter]
    fn count(&self) -> usize {
        self.keys().len()
    }

    /// The key of the last record.
    #[getter]
    fn last_key(&self) -> Option<i64> {
        self.keys().last().copied()
    }

    /// Where the last EPB ends in the batch's flat stream.
    #[getter]
    fn end(&self) -> u64 {
        self.start.saturating_add(self.size())
    }

    /// The records' keys and the ends of their EPBs in the batch's flat stream, as lists: what
    /// `pcap_flat` appends to `Batch.keys` and `Batch.ends`.
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let ends = self
            .ends()
            .iter()
            .map(|&end| self.start.saturating_add(end));
        Ok((PyList::new(py, self.keys())?, PyList::new(py, ends)?))
    }

    fn __bytes__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let size = usize::try_from(self.size())
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("piece too long"))?;
        let chunk = self.chunk.bind(py).as_bytes();
        uninit_bytes(py, size, |out| {
            if self.records.write(chunk, 0, out) {
                Ok(())
            } else {
                Err(pyo3::exceptions::PyRuntimeError::new_err(
                    "compiled reader: records changed under a piece (a bug)",
                ))
            }
        })
    }
}

/// `pcap_flat` for the merger: the piece appended is a `PcapRecords` over `buf`, not EPBs, and
/// its packets' keys and ends stay in it (`PcapRecords.columns()` makes them lists). Stops at a
/// key beyond 64 bits, which Python then handles. Returns the position of the first record not
/// taken.
#[pyfunction]
fn pcap_records<'py>(
    py: Python<'py>,
    buf: &Bound<'py, PyBytes>,
    pos: usize,
    params: PcapParams,
    start: u64,
    pieces: &Bound<'py, PyList>,
) -> PyResult<usize> {
    let records = Records::scan(buf.as_bytes(), pos, &params, u64::MAX - start);
    let stop = records.stop();
    if !records.keys().is_empty() {
        let records = PcapRecords {
            chunk: buf.clone().unbind(),
            records,
            start,
        };
        pieces.append(Bound::new(py, records)?)?;
    }
    Ok(stop)
}

fn interface(entry: &Bound<'_, PyAny>) -> Option<Interface> {
    let entry = entry.cast::<PyTuple>().ok()?;
    if entry.len() != 5 {
        return None;
    }
    let most: i128 = entry.get_item(4).ok()?.extract().ok()?;
    Some(Interface {
        oid: entry.get_item(0).ok()?.extract().ok()?,
        offset: entry.get_item(1).ok()?.extract().ok()?,
        key_mult: entry.get_item(2).ok()?.extract().ok()?,
        key_div: entry.get_item(3).ok()?.extract().ok()?,
        most: most.clamp(-1, i64::MAX as i128) as i64,
    })
}

/// EPBs of a little-endian pcapng section in `buf` from `pos`, appended to a flat batch;
/// `section` is the reader's `_section`. Returns (stop position, end of the block Python must
/// handle there, or 0 when the block there is incomplete).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn pcapng_flat<'py>(
    py: Python<'py>,
    buf: &[u8],
    pos: usize,
    section: &Bound<'py, PyList>,
    max_block: u64,
    start: u64,
    keys: &Bound<'py, PyList>,
    pieces: &Bound<'py, PyList>,
    ends: &Bound<'py, PyList>,
) -> PyResult<(usize, usize)> {
    // Interfaces are converted when a packet uses them, not all on every call: Python calls
    // once for every block it handles, and a section may have thousands of interfaces.
    let declared = section.len();
    let mut known: Vec<Option<Option<Interface>>> = Vec::new();
    let mut lookup = |local: u32| -> Option<Interface> {
        let index = local as usize;
        if index >= declared {
            return None;
        }
        if known.len() <= index {
            known.resize(index + 1, None);
        }
        *known[index].get_or_insert_with(|| {
            section
                .get_item(index)
                .ok()
                .and_then(|entry| interface(&entry))
        })
    };
    let (stop, why, count, size) = pcapng_scan(buf, pos, &mut lookup, max_block);
    if count > 0 {
        append_piece(py, size, start, keys, pieces, ends, |out, packet| {
            pcapng_write(buf, pos, stop, &mut lookup, out, packet)
        })?;
    }
    Ok(match why {
        Stop::Incomplete => (stop, 0),
        Stop::Python { end } => (stop, end),
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PcapRecords>()?;
    m.add_function(wrap_pyfunction!(pcap_flat, m)?)?;
    m.add_function(wrap_pyfunction!(pcap_records, m)?)?;
    m.add_function(wrap_pyfunction!(pcapng_census_walk, m)?)?;
    m.add_function(wrap_pyfunction!(pcapng_flat, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sec: u32, frac: u32, data: &[u8], orig: u32, little: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [sec, frac, data.len() as u32, orig] {
            out.extend(if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            });
        }
        out.extend(data);
        out
    }

    fn params(little: bool) -> PcapParams {
        PcapParams {
            little,
            units: 1_000_000,
            key_mult: 1000,
            key_div: 1,
            oid: 7,
            cap: 262_144,
        }
    }

    fn run_pcap(buf: &[u8], p: &PcapParams) -> (usize, Vec<u8>, Vec<(u128, usize)>) {
        let (stop, count, size) = pcap_scan(buf, 0, p);
        let mut out = vec![0u8; size];
        let mut found = Vec::new();
        let written = pcap_write(buf, 0, stop, p, &mut out, |k, e| found.push((k, e)));
        assert_eq!(written, size);
        assert_eq!(found.len(), count);
        (stop, out, found)
    }

    #[test]
    fn pcap_records_become_epbs_in_both_orders() {
        for little in [true, false] {
            let mut buf = record(1, 2, b"abcde", 9, little);
            buf.extend(record(3, 4, b"", 0, little));
            buf.extend(&[1, 2, 3]); // an incomplete header
            let (stop, out, found) = run_pcap(&buf, &params(little));
            assert_eq!(stop, buf.len() - 3);
            assert_eq!(found, vec![(1_000_002_000, 40), (3_000_004_000, 72)]);
            let mut epb = Vec::new();
            for v in [6u32, 40, 7, 0, 1_000_002, 5, 9] {
                epb.extend(v.to_le_bytes());
            }
            epb.extend(b"abcde\0\0\0");
            epb.extend(40u32.to_le_bytes());
            assert_eq!(&out[..40], &epb[..]);
        }
    }

    #[test]
    fn records_write_any_packet_aligned_range_later_and_nothing_else() {
        let mut buf = Vec::new();
        for n in 0..5u32 {
            buf.extend(record(n, 0, &vec![n as u8; n as usize * 3], 100, true));
        }
        let p = params(true);
        let (stop, out, _) = run_pcap(&buf, &p);
        let records = Records::scan(&buf, 0, &p, u64::MAX);
        assert_eq!((records.stop(), records.size()), (stop, out.len() as u64));
        assert_eq!(records.keys().len(), 5);
        let mut bounds = vec![0u64];
        bounds.extend(records.ends());
        for (i, &from) in bounds.iter().enumerate() {
            for &to in &bounds[i..] {
                let mut part = vec![0u8; (to - from) as usize];
                assert!(records.write(&buf, from, &mut part));
                assert_eq!(&part[..], &out[from as usize..to as usize]);
            }
        }
        let mut part = vec![0u8; 8];
        assert!(!records.write(&buf, 4, &mut part)); // not where a packet starts
        assert!(!records.write(&buf, 0, &mut part)); // not where a packet ends
        assert!(!records.write(&buf, u64::MAX, &mut part));
        let mut all = vec![0u8; out.len()];
        assert!(!records.write(&buf[..buf.len() - 1], 0, &mut all)); // not its buffer
                                                                     // a limit stops the scan before the record that would pass it
        let limited = Records::scan(&buf, 0, &p, bounds[2] + 3);
        assert_eq!((limited.keys().len(), limited.size()), (2, bounds[2]));
    }

    #[test]
    fn pcap_stops_at_a_record_longer_than_the_cap_or_incomplete() {
        let mut p = params(true);
        p.cap = 4;
        let buf = record(1, 2, b"abcde", 9, true);
        assert_eq!(pcap_scan(&buf, 0, &p), (0, 0, 0));
        let p = params(true);
        assert_eq!(pcap_scan(&buf[..buf.len() - 1], 0, &p), (0, 0, 0));
        let mut huge = record(1, 2, b"", 0, true);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut p = params(true);
        p.cap = i64::MAX;
        assert_eq!(pcap_scan(&huge, 0, &p), (0, 0, 0));
    }

    #[test]
    fn pcap_write_never_overruns_a_short_output_or_a_wrong_stop() {
        let buf = record(1, 2, b"abcde", 9, true);
        let p = params(true);
        let mut out = vec![0u8; 10];
        assert_eq!(pcap_write(&buf, 0, buf.len(), &p, &mut out, |_, _| {}), 0);
        let mut out = vec![0u8; 100];
        assert_eq!(pcap_write(&buf, 3, usize::MAX, &p, &mut out, |_, _| {}), 0);
        assert_eq!(
            pcap_write(&buf, usize::MAX - 2, usize::MAX, &p, &mut out, |_, _| {}),
            0
        );
    }

    fn block(block_type: u32, body: &[u8]) -> Vec<u8> {
        let total = (12 + body.len()) as u32;
        let mut out = Vec::new();
        out.extend(block_type.to_le_bytes());
        out.extend(total.to_le_bytes());
        out.extend(body);
        out.extend(total.to_le_bytes());
        out
    }

    fn epb(local: u32, ts: u64, data: &[u8], options: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for v in [
            local,
            (ts >> 32) as u32,
            ts as u32,
            data.len() as u32,
            data.len() as u32,
        ] {
            body.extend(v.to_le_bytes());
        }
        body.extend(data);
        body.resize(body.len() + ((4 - data.len() % 4) % 4), 0);
        body.extend(options);
        block(EPB, &body)
    }

    fn section() -> Vec<Option<Interface>> {
        vec![
            Some(Interface {
                oid: 3,
                offset: -10,
                key_mult: 1000,
                key_div: 1,
                most: 100,
            }),
            None,
        ]
    }

    #[test]
    fn pcapng_epbs_are_copied_with_their_interface_id_replaced() {
        let mut buf = epb(0, 5, b"xyz", &[2, 0, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        buf.extend(epb(0, 20, b"", &[]));
        let (stop, why, count, size) = pcapng_scan(&buf, 0, &mut section_of(&section()), 1 << 24);
        assert_eq!(
            (stop, why, count, size),
            (buf.len(), Stop::Incomplete, 2, buf.len())
        );
        let mut out = vec![0u8; size];
        let mut found = Vec::new();
        pcapng_write(
            &buf,
            0,
            stop,
            &mut section_of(&section()),
            &mut out,
            |k, e| found.push((k, e)),
        );
        assert_eq!(found, vec![(-5000, 48), (10_000, buf.len())]);
        let mut expected = buf.clone();
        expected[8..12].copy_from_slice(&3u32.to_le_bytes());
        expected[56..60].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn pcapng_hands_python_every_block_it_does_not_take() {
        let s = section();
        let python = |buf: &[u8]| pcapng_scan(buf, 0, &mut section_of(&s), 1 << 24).1;
        // unknown interface, one Python cannot convert, a bad option, a caplen too long
        for buf in [
            epb(2, 0, b"a", &[]),
            epb(1, 0, b"a", &[]),
            epb(0, 0, b"a", &[2, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            epb(0, 0, b"a", &[0, 0, 0, 0, 1, 0, 0, 0]),
            epb(0, 0, &[0; 101], &[]),
            block(1, &[0; 8]),
        ] {
            assert_eq!(python(&buf), Stop::Python { end: buf.len() });
        }
        let mut bad_trailer = epb(0, 0, b"a", &[]);
        let n = bad_trailer.len();
        bad_trailer[n - 1] = 1;
        assert_eq!(python(&bad_trailer), Stop::Python { end: n });
        let mut bad_length = epb(0, 0, b"a", &[]);
        bad_length[4] = 13;
        assert_eq!(
            python(&bad_length),
            Stop::Python {
                end: bad_length.len()
            }
        );
        let mut shb = block(
            SHB,
            &[0x4D, 0x3C, 0x2B, 0x1A, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(python(&shb), Stop::Python { end: 28 });
        shb.truncate(20);
        assert_eq!(python(&shb), Stop::Incomplete);
        assert_eq!(python(&epb(0, 0, b"a", &[])[..20]), Stop::Incomplete);
    }

    #[test]
    fn keys_that_overflow_go_to_python() {
        let s = vec![Some(Interface {
            oid: 0,
            offset: i128::MAX,
            key_mult: 1,
            key_div: 1,
            most: 100,
        })];
        let buf = epb(0, u64::MAX, b"", &[]);
        assert_eq!(
            pcapng_scan(&buf, 0, &mut section_of(&s), 1 << 24).1,
            Stop::Python { end: buf.len() }
        );
    }

    /// Every prefix and many corruptions of a valid stream: no panic, and whatever is written
    /// fits what was scanned.
    #[test]
    fn hostile_inputs_never_panic() {
        let mut stream = epb(
            0,
            5,
            b"xyz",
            &[7, 0, 9, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0],
        );
        stream.extend(epb(0, 6, b"abcdefgh", &[0, 0, 0, 0]));
        stream.extend(record(1, 2, b"abc", 3, true));
        let s = section();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..20_000 {
            let mut buf = stream.clone();
            for _ in 0..(round % 4) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % buf.len();
                buf[at] = (seed >> 40) as u8;
            }
            let cut = (seed as usize >> 3) % (buf.len() + 1);
            let buf = &buf[..cut];
            for pos in [0usize, 1, 4, cut, cut + 1, usize::MAX] {
                let (stop, _, _, size) = pcapng_scan(buf, pos, &mut section_of(&s), 1 << 24);
                let mut out = vec![0u8; size];
                assert_eq!(
                    pcapng_write(buf, pos, stop, &mut section_of(&s), &mut out, |_, _| {}),
                    size
                );
                for little in [true, false] {
                    let p = params(little);
                    let (stop, _, size) = pcap_scan(buf, pos, &p);
                    let mut out = vec![0u8; size];
                    assert_eq!(pcap_write(buf, pos, stop, &p, &mut out, |_, _| {}), size);
                }
            }
            assert!(options_clean(buf, 0, buf.len()) || !options_clean(buf, 0, buf.len()));
            options_clean(buf, usize::MAX - 1, usize::MAX);
        }
    }
}
