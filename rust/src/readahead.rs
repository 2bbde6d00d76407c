//! Reading the next chunk of an input of an offline merge in a thread of its own, without the
//! GIL, while the merge works on the current one: reading a file that is in the page cache is a
//! copy that took a third of a merge's time, and a second core can do it.
//!
//! The thread reads only what it is asked for (`want`): the merge knows which inputs it will
//! need next (those whose newest packets are oldest), so a chunk or two read ahead keep the
//! thread busy, and the memory of a merge of many inputs does not grow with a chunk ahead for
//! each of them. At most one chunk per input is read ahead.
//!
//! Either side waits for the other by spinning a little (`SPIN`) before it sleeps, and wakes
//! the other only if it sleeps: a merge step takes about as long as a read, and on a virtual
//! machine waking a thread on the other CPU costs as much as 10 us (measured here), several
//! times a step. The spinning is bounded, so a side that has nothing to do soon still sleeps.
//!
//! This is IO beside the sans-IO core, not in it: the readers still take whatever bytes they
//! are given. Each input's descriptor is duplicated, so the thread reads from its own copy
//! (sharing the file offset with the caller's, who must not read it meanwhile) and a caller
//! that closes its descriptor early cannot make the thread read another file.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// One input: the chunk read and not yet taken, the one asked for, and whether its end (or an
/// error) was read.
struct Input {
    fd: Option<Arc<OwnedFd>>,
    ready: Option<io::Result<(Blank, usize)>>,
    /// Asked for and not yet read: the bytes object to read it into.
    wanted: Option<Blank>,
    reading: bool,
    done: bool,
}

impl Input {
    /// Nothing is read, being read or asked for, and there is more to read.
    fn idle(&self) -> bool {
        !self.done && self.ready.is_none() && self.wanted.is_none() && !self.reading
    }
}

struct State {
    inputs: Vec<Input>,
    /// Where the thread looks for an input to read next (round robin).
    next: usize,
    stop: bool,
    /// How many of the two sides sleep on `changed` (a change wakes them only then).
    sleeping: usize,
}

/// How long a side that waits for the other polls before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

struct Shared {
    state: Mutex<State>,
    /// The reading thread sleeps here for a request; `take` sleeps here for a chunk.
    changed: Condvar,
    /// Counts the changes of `state`, so that a side can poll for one without the lock.
    version: AtomicU64,
    chunk: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // a poisoned lock means the other side panicked: its state is still consistent
        // (every change is one push or pop), so go on with it
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wait for a change of the state: poll for up to `SPIN`, then sleep until woken.
    fn wait<'a>(&'a self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let seen = self.version.load(Ordering::Acquire);
        drop(guard);
        let started = Instant::now();
        while self.version.load(Ordering::Acquire) == seen && started.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        let mut guard = self.lock();
        if self.version.load(Ordering::Acquire) != seen {
            return guard;
        }
        guard.sleeping += 1;
        let mut guard = self
            .changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.sleeping -= 1;
        guard
    }

    /// The state was changed (under the lock, which `guard` still holds): tell the other side.
    fn changed(&self, guard: &MutexGuard<'_, State>) {
        self.version.fetch_add(1, Ordering::Release);
        if guard.sleeping > 0 {
            self.changed.notify_all();
        }
    }

    /// The reading thread: read the chunks asked for, until stopped.
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
                        .is_some_and(|input| input.wanted.is_some())
                });
            let Some(index) = found else {
                state = self.wait(state);
                continue;
            };
            state.next = (index + 1) % count;
            let Some(input) = state.inputs.get_mut(index) else {
                continue;
            };
            let (Some(fd), Some(blank)) = (input.fd.clone(), input.wanted.take()) else {
                continue; // not asked for once the input is done
            };
            input.reading = true;
            drop(state);
            // SAFETY: the blank's buffer is `chunk` bytes long and only this thread has it.
            let result = unsafe { read_some(&fd, blank.buffer, self.chunk) };
            state = self.lock();
            if let Some(input) = state.inputs.get_mut(index) {
                input.reading = false;
                input.done = !matches!(result, Ok(size) if size > 0);
                if input.done {
                    input.fd = None;
                }
                input.ready = Some(result.map(|size| (blank, size)));
            }
            self.changed(&state);
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

/// `ReadAhead(fds, chunk)`: `want(i)` asks for the next chunk of input `i` to be read in the
/// background; `take(i)` returns it (at most `chunk` bytes, b"" at its end; a read error is
/// raised as OSError, once, at the point in the stream where it happened), reading it first if
/// it was not asked for. `close()` stops the thread, as does the object going away.
#[pyclass(module = "multisniff._core", name = "ReadAhead")]
pub struct ReadAhead {
    shared: Arc<Shared>,
}

impl ReadAhead {
    /// Tell the thread to end. It is not waited for: it ends as soon as the read it may be in
    /// returns, which for a pipe can take until its writer writes or closes, and an offline
    /// merge that fails must not hang on that. What it still holds goes when it ends.
    fn stop(&self) {
        let mut state = self.shared.lock();
        state.stop = true;
        self.shared.changed(&state);
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

#[pymethods]
impl ReadAhead {
    /// Read input `index`'s next chunk in the background unless it is read, being read or
    /// asked for already.
    fn want(&self, py: Python<'_>, index: usize) -> PyResult<()> {
        let idle = |shared: &Shared| -> PyResult<bool> {
            let state = shared.lock();
            let input = state
                .inputs
                .get(index)
                .ok_or_else(|| PyIndexError::new_err(format!("no input {index}")))?;
            Ok(input.idle() && !state.stop)
        };
        if !idle(&self.shared)? {
            return Ok(());
        }
        // made with the GIL, outside the lock; only this thread asks, so the input is still idle
        let blank = Blank::new(py, self.shared.chunk)?;
        let mut state = self.shared.lock();
        if let Some(input) = state.inputs.get_mut(index) {
            if input.idle() {
                input.wanted = Some(blank);
            }
        }
        self.shared.changed(&state);
        Ok(())
    }

    #[new]
    fn py_new(fds: Vec<RawFd>, chunk: usize) -> PyResult<Self> {
        if chunk == 0 {
            return Err(PyValueError::new_err("chunk must be at least 1"));
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
                ready: None,
                wanted: None,
                reading: false,
                done: false,
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                inputs,
                next: 0,
                stop: false,
                sleeping: 0,
            }),
            changed: Condvar::new(),
            version: AtomicU64::new(0),
            chunk,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("multisniff-read".into())
            .spawn(move || worker.run())?;
        Ok(Self { shared })
    }

    /// The next chunk of input `index`; waits (without the GIL) until it is read.
    fn take<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        self.want(py, index)?;
        let shared = Arc::clone(&self.shared);
        let result = py.detach(move || {
            let mut state = shared.lock();
            loop {
                let Some(input) = state.inputs.get_mut(index) else {
                    return Err(());
                };
                if let Some(result) = input.ready.take() {
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
