//! multisniff's compiled core: the per-packet work of `multisniff.pcap` (record parsing,
//! transcoding to EPBs, the timeline merge), behind the interfaces of the pure-Python core,
//! which stays the reference (`multisniff/pcap/core.py` chooses between them).
//!
//! Capture files are untrusted input: every length is checked against what is in the buffer
//! before any slice or allocation, and no function may panic on any input (a panic would
//! surface as a Python exception and is a bug that the differential tests look for).

use pyo3::prelude::*;

pub mod buffer;
pub mod fuzzing;
pub mod merge;
pub mod readahead;
pub mod reader;

/// Changes whenever a function's signature or results change, so that a stale build of the
/// extension (an editable install not rebuilt) is refused rather than misused.
pub const ABI: u32 = 6;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ABI", ABI)?;
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    reader::register(m)?;
    merge::register(m)?;
    readahead::register(m)?;
    Ok(())
}
