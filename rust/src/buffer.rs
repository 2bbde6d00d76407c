//! Writing into the buffer of a new Python bytes object without clearing it first.
//!
//! `PyBytes::new_with` zeroes its buffer before handing it out; for the reader's EPBs and the
//! merge's output, which are written whole, that clearing cost as much as a third of the copy.

use std::mem::MaybeUninit;
use std::ptr::NonNull;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// An output buffer written by offset: a plain byte slice (tests, fuzzing) or the uninitialised
/// buffer of a new bytes object. Writes that do not fit write nothing and return false.
pub trait Out {
    fn size(&self) -> usize;
    /// Copies `src` to `at..at + src.len()`.
    fn put(&mut self, at: usize, src: &[u8]) -> bool;
    /// Writes `n` zero bytes at `at`.
    fn zero(&mut self, at: usize, n: usize) -> bool;
}

/// `slice[at..at + n]`, or None where that is not inside it.
fn region<T>(slice: &mut [T], at: usize, n: usize) -> Option<&mut [T]> {
    at.checked_add(n).and_then(|end| slice.get_mut(at..end))
}

impl Out for [u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn put(&mut self, at: usize, src: &[u8]) -> bool {
        region(self, at, src.len())
            .map(|dst| dst.copy_from_slice(src))
            .is_some()
    }
    fn zero(&mut self, at: usize, n: usize) -> bool {
        region(self, at, n).map(|dst| dst.fill(0)).is_some()
    }
}

impl Out for Vec<u8> {
    fn size(&self) -> usize {
        self.len()
    }
    fn put(&mut self, at: usize, src: &[u8]) -> bool {
        self.as_mut_slice().put(at, src)
    }
    fn zero(&mut self, at: usize, n: usize) -> bool {
        self.as_mut_slice().zero(at, n)
    }
}

impl Out for [MaybeUninit<u8>] {
    fn size(&self) -> usize {
        self.len()
    }
    fn put(&mut self, at: usize, src: &[u8]) -> bool {
        region(self, at, src.len())
            .map(|dst| dst.write_copy_of_slice(src))
            .is_some()
    }
    fn zero(&mut self, at: usize, n: usize) -> bool {
        region(self, at, n)
            .map(|dst| dst.fill(MaybeUninit::new(0)))
            .is_some()
    }
}

/// A new bytes object of `len` bytes that `fill` writes all of. `fill` must write every byte
/// before returning Ok (the callers check what they wrote against `len`); on error the object
/// is dropped unread.
pub fn uninit_bytes<'py, E>(
    py: Python<'py>,
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> Result<(), E>,
) -> PyResult<Bound<'py, PyBytes>>
where
    PyErr: From<E>,
{
    let size = pyo3::ffi::Py_ssize_t::try_from(len)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("bytes object too long"))?;
    // SAFETY: PyBytes_FromStringAndSize with a null pointer returns a new bytes object of `size`
    // uninitialised bytes (or null with an exception set); its buffer stays valid while we own
    // the reference, and nobody else sees the object before it is returned. It is exposed only
    // as MaybeUninit, and `fill` writes every byte before the object is handed out.
    unsafe {
        let object = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
        let bytes = Bound::from_owned_ptr_or_err(py, object)?.cast_into_unchecked::<PyBytes>();
        let buffer = NonNull::new(pyo3::ffi::PyBytes_AsString(object).cast::<MaybeUninit<u8>>())
            .ok_or_else(|| pyo3::exceptions::PyMemoryError::new_err("no bytes buffer"))?;
        fill(std::slice::from_raw_parts_mut(buffer.as_ptr(), len))?;
        Ok(bytes)
    }
}
