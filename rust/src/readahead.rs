//! Reading the next chunk of every input of an offline merge in a thread of its own, without
//! the GIL, while the merge works on the current one: reading a file that is in the page cache
//! is a copy that took a third of a merge's time, and a second core can do it.
//!
//! This is IO beside the sans-IO core, not in it: the readers still take whatever bytes they
//! are given. Each input's descriptor is duplicated, so the thread reads from its own copy
//! (sharing the file offset with the caller's, who must not read it meanwhile) and a caller
//! that closes its descriptor early cannot make the thread read another file. At most `depth`
//! chunks per input wait, so memory stays flat; the buffers are reused.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A new bytes object of `chunk` bytes that nobody else has seen, and its buffer: the thread
/// reads into the buffer without the GIL, and `take` hands the object out as it is when the
/// read filled it (no copy).
struct Blank {
    object: Py<PyBytes>,
    buffer: *mut u8,
}

// SAFETY: the buffer belongs to `object`, which is kept alive by the Py reference and is
// referenced nowhere else until `take` hands it out: only one thread at a time touches the
// buffer (the one that took the Blank out of the shared state), and Python never reads it
// before then.
unsafe impl Send for Blank {}

impl Blank {
    fn new(py: Python<'_>, chunk: usize) -> PyResult<Self> {
        let size = pyo3::ffi::Py_ssize_t::try_from(chunk)
            .map_err(|_| PyValueError::new_err("chunk too large"))?;
        // SAFETY: PyBytes_FromStringAndSize with a null pointer returns a new bytes object of
        // `size` uninitialised bytes (or null with an exception set); the buffer lives as long
        // as the object, and is written (by read(2)) before anyone reads it.
        unsafe {
            let pointer = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size);
            let object =
                Bound::from_owned_ptr_or_err(py, pointer)?.cast_into_unchecked::<PyBytes>();
            let buffer = pyo3::ffi::PyBytes_AsString(pointer).cast::<u8>();
            if buffer.is_null() {
                return Err(PyValueError::new_err("no bytes buffer"));
            }
            Ok(Blank {
                object: object.unbind(),
                buffer,
            })
        }
    }
}

/// One input: the chunks read and not yet taken, and whether its end (or an error) was read.
struct Input {
    fd: Option<Arc<OwnedFd>>,
    ready: VecDeque<io::Result<(Blank, usize)>>,
    done: bool,
}

struct State {
    inputs: Vec<Input>,
    /// Bytes objects to read into.
    free: Vec<Blank>,
    /// Where the thread looks for an input to read next (round robin).
    next: usize,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The reading thread waits here for room; `take` waits here for a chunk.
    changed: Condvar,
    chunk: usize,
    depth: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // a poisoned lock means the other side panicked: its state is still consistent
        // (every change is one push or pop), so go on with it
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reading thread: fill every input up to `depth` chunks, until stopped.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            if state.stop {
                return;
            }
            let count = state.inputs.len();
            let start = state.next;
            let found = (0..count)
                .map(|step| (start + step) % count)
                .find(|&index| {
                    state
                        .inputs
                        .get(index)
                        .is_some_and(|input| !input.done && input.ready.len() < self.depth)
                });
            let Some(index) = found else {
                state = self.wait(state);
                continue;
            };
            state.next = (index + 1) % count;
            let Some(fd) = state.inputs.get(index).and_then(|input| input.fd.clone()) else {
                continue;
            };
            let Some(blank) = state.free.pop() else {
                state = self.wait(state); // `take` makes new ones
                continue;
            };
            drop(state);
            // SAFETY: the blank's buffer is `chunk` bytes long and only this thread has it.
            let result = unsafe { read_some(&fd, blank.buffer, self.chunk) };
            state = self.lock();
            let result = match result {
                Ok(size) => Ok((blank, size)),
                Err(error) => {
                    state.free.push(blank);
                    Err(error)
                }
            };
            if let Some(input) = state.inputs.get_mut(index) {
                input.done = !matches!(result, Ok((_, size)) if size > 0);
                if input.done {
                    input.fd = None;
                }
                input.ready.push_back(result);
            }
            self.changed.notify_all();
        }
    }
}

/// read(2) into `len` bytes at `buffer`, again when interrupted.
///
/// # Safety
/// `buffer` must be valid for writes of `len` bytes and not be accessed by anyone else meanwhile.
unsafe fn read_some(fd: &OwnedFd, buffer: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        let got = libc::read(fd.as_raw_fd(), buffer.cast(), len);
        if got >= 0 {
            return Ok(got as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `ReadAhead(fds, chunk, depth=1)`: `take(i)` returns the next chunk of input `i` (at most
/// `chunk` bytes, b"" at its end; a read error is raised as OSError, once, at the point in the
/// stream where it happened). `close()` stops the thread, as does the object going away.
#[pyclass(module = "multisniff._core", name = "ReadAhead")]
pub struct ReadAhead {
    shared: Arc<Shared>,
}

impl ReadAhead {
    /// Tell the thread to end. It is not waited for: it ends as soon as the read it may be in
    /// returns, which for a pipe can take until its writer writes or closes, and an offline
    /// merge that fails must not hang on that. What it still holds goes when it ends.
    fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

#[pymethods]
impl ReadAhead {
    #[new]
    #[pyo3(signature = (fds, chunk, depth = 1))]
    fn py_new(py: Python<'_>, fds: Vec<RawFd>, chunk: usize, depth: usize) -> PyResult<Self> {
        if chunk == 0 || depth == 0 {
            return Err(PyValueError::new_err("chunk and depth must be at least 1"));
        }
        let mut inputs = Vec::with_capacity(fds.len());
        for fd in fds {
            if fd < 0 {
                return Err(PyValueError::new_err(format!(
                    "{fd} is not a file descriptor"
                )));
            }
            // SAFETY: the caller's descriptor is open for the duration of this call (it was
            // just passed in); it is only duplicated here, and the thread reads the duplicate,
            // which it owns.
            let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
            inputs.push(Input {
                fd: Some(Arc::new(owned)),
                ready: VecDeque::new(),
                done: false,
            });
        }
        // a chunk ahead for every input, and one more that `take` replaces as it hands one out
        let free = (0..inputs.len().saturating_mul(depth).saturating_add(1))
            .map(|_| Blank::new(py, chunk))
            .collect::<PyResult<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                inputs,
                free,
                next: 0,
                stop: false,
            }),
            changed: Condvar::new(),
            chunk,
            depth,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("multisniff-read".into())
            .spawn(move || worker.run())?;
        Ok(Self { shared })
    }

    /// The next chunk of input `index`; waits (without the GIL) until it is read.
    fn take<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let shared = Arc::clone(&self.shared);
        let result = py.detach(move || {
            let mut state = shared.lock();
            loop {
                let Some(input) = state.inputs.get_mut(index) else {
                    return Err(());
                };
                if let Some(result) = input.ready.pop_front() {
                    return Ok(result.map(Some));
                }
                if input.done || state.stop {
                    return Ok(Ok(None));
                }
                state = shared.wait(state);
            }
        });
        let (blank, size) = match result {
            Err(_) => return Err(PyIndexError::new_err(format!("no input {index}"))),
            Ok(Err(error)) => return Err(os_error(error)),
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => return Ok(PyBytes::new(py, b"")),
        };
        let replacement = Blank::new(py, self.shared.chunk)?;
        self.shared.lock().free.push(replacement);
        self.shared.changed.notify_all();
        let object = blank.object.into_bound(py);
        if size == self.shared.chunk {
            return Ok(object); // filled: handed out as it is
        }
        Ok(PyBytes::new(
            py,
            object.as_bytes().get(..size).unwrap_or(&[]),
        ))
    }

    /// Stop reading: `take` then returns what was read already, then b"".
    fn close(&self) {
        self.stop();
    }
}

/// OSError(errno, strerror), which Python makes the subclass for the errno (IsADirectoryError
/// ...) with `errno` and `strerror` set, as os.read raises it.
fn os_error(error: io::Error) -> PyErr {
    let Some(code) = error.raw_os_error() else {
        return error.into();
    };
    let text = error.to_string();
    let strerror = text
        .strip_suffix(&format!(" (os error {code})"))
        .unwrap_or(&text);
    pyo3::exceptions::PyOSError::new_err((code, strerror.to_owned()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReadAhead>()?;
    Ok(())
}
