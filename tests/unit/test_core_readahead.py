"""The compiled core's read-ahead (`_core.ReadAhead`), which reads the inputs of an offline merge
in a thread of its own: every input's chunks in order and whole, whatever order they are asked
for and taken in, its end said again and again, read errors raised where they happen, nothing
read that was not asked for, and no thread left behind however it is stopped."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from multisniff.pcap import core

pytestmark = pytest.mark.skipif(not core.available(), reason="the compiled core is not built")

CHUNK = 4096


def compiled() -> Any:
    with core.use(core.COMPILED):
        module = core.compiled()
    assert module is not None
    return module


def files(tmp_path: Path, sizes: list[int]) -> list[tuple[int, bytes]]:
    """Open files of these sizes with random content: (fd, content)."""
    rng = random.Random(7)
    opened = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"in{index}"
        content = rng.randbytes(size)
        path.write_bytes(content)
        opened.append((os.open(path, os.O_RDONLY), content))
    return opened


def threads() -> int:
    """The read-ahead threads of this process (the kernel's task names)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a task that ended
            count += Path(f"/proc/self/task/{task}/comm").read_text().strip() == "multisniff-read"
    return count


@pytest.mark.parametrize("wants", [0, 1, 3])
def test_every_input_comes_whole_and_in_order_in_any_order_of_taking(tmp_path: Path,
                                                                     wants: int) -> None:
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 7 * CHUNK + 5, 40 * CHUNK]
    opened = files(tmp_path, sizes)
    ahead = compiled().ReadAhead([fd for fd, _ in opened], CHUNK)
    got: list[list[bytes]] = [[] for _ in opened]
    ended = [False] * len(opened)
    rng = random.Random(wants)
    while not all(ended):
        for _ in range(wants):  # asking again, or for an input that has ended, is harmless
            ahead.want(rng.randrange(len(opened)))
        index = rng.choice([i for i, done in enumerate(ended) if not done])
        chunk = ahead.take(index)
        assert isinstance(chunk, bytes) and len(chunk) <= CHUNK
        if chunk:
            got[index].append(chunk)
        else:
            ended[index] = True
    for index, (fd, content) in enumerate(opened):
        assert b"".join(got[index]) == content
        # whole chunks but for the last one of a file
        assert all(len(chunk) == CHUNK for chunk in got[index][:-1])
        assert ahead.take(index) == b"" and ahead.take(index) == b""
        os.close(fd)
    ahead.close()


def test_only_what_is_asked_for_is_read(tmp_path: Path) -> None:
    (fd, content), = files(tmp_path, [10 * CHUNK])
    ahead = compiled().ReadAhead([fd], CHUNK)
    time.sleep(0.05)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # (the thread's copy shares the offset)
    ahead.want(0)
    ahead.want(0)  # one chunk ahead at most
    deadline = time.monotonic() + 5
    while os.lseek(fd, 0, os.SEEK_CUR) < CHUNK and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    assert os.lseek(fd, 0, os.SEEK_CUR) == CHUNK
    assert ahead.take(0) == content[:CHUNK]
    assert ahead.take(0) == content[CHUNK : 2 * CHUNK]  # read when taken, not asked for
    ahead.close()
    os.close(fd)


def test_the_thread_reads_its_own_copy_of_each_descriptor(tmp_path: Path) -> None:
    (fd, content), = files(tmp_path, [3 * CHUNK])
    ahead = compiled().ReadAhead([fd], CHUNK)
    os.close(fd)  # the caller's descriptor may go; the thread's copy reads on
    assert b"".join(iter(lambda: ahead.take(0), b"")) == content
    ahead.close()


def test_short_reads_of_a_pipe_come_as_they_are(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    ahead = compiled().ReadAhead([read_end], CHUNK)
    os.write(write_end, b"first")
    assert ahead.take(0) == b"first"
    os.write(write_end, b"x" * (CHUNK + 10))
    os.close(write_end)
    rest = b"".join(iter(lambda: ahead.take(0), b""))
    assert rest == b"x" * (CHUNK + 10)
    ahead.close()
    os.close(read_end)


def test_a_read_error_is_raised_once_where_it_happened(tmp_path: Path) -> None:
    (fd, content), = files(tmp_path, [2 * CHUNK])
    directory = os.open(tmp_path, os.O_RDONLY)
    ahead = compiled().ReadAhead([fd, directory], CHUNK)
    with pytest.raises(OSError) as raised:
        ahead.take(1)
    assert raised.value.errno == errno.EISDIR
    assert ahead.take(1) == b""  # the input has ended with its error
    assert b"".join(iter(lambda: ahead.take(0), b"")) == content  # the others go on
    ahead.close()
    os.close(fd)
    os.close(directory)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    (fd, _), = files(tmp_path, [10])
    module = compiled()
    with pytest.raises(ValueError):
        module.ReadAhead([fd], 0)
    with pytest.raises(ValueError):
        module.ReadAhead([-1], CHUNK)
    with pytest.raises(OSError):
        module.ReadAhead([987654], CHUNK)  # not open
    ahead = module.ReadAhead([fd], CHUNK)
    with pytest.raises(IndexError):
        ahead.take(1)
    with pytest.raises(IndexError):
        ahead.want(1)
    ahead.close()
    os.close(fd)


def settled_threads() -> int:
    """threads(), once the threads of read-aheads closed before have had time to end."""
    deadline = time.monotonic() + 5
    while threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()


def test_no_thread_is_left_behind_when_closed_or_dropped_midway(tmp_path: Path) -> None:
    before = settled_threads()
    opened = files(tmp_path, [50 * CHUNK, 50 * CHUNK])
    module = compiled()
    ahead = module.ReadAhead([fd for fd, _ in opened], CHUNK)
    ahead.want(1)
    assert ahead.take(0)
    ahead.close()
    ahead.close()  # twice is fine
    ahead.want(0)  # and asking after it
    # after close: what was read already, then the end; never a hang
    assert len(b"".join(iter(lambda: ahead.take(1), b""))) <= CHUNK
    dropped = module.ReadAhead([fd for fd, _ in opened], CHUNK)
    assert dropped.take(1)
    del dropped
    blocked_read, blocked_write = os.pipe()  # a thread waiting in read(2) on an empty pipe
    waiting = module.ReadAhead([blocked_read], CHUNK)
    waiting.want(0)
    time.sleep(0.05)
    started = time.monotonic()
    waiting.close()  # does not wait for the read (a failed merge must not hang on a pipe)
    assert time.monotonic() - started < 1
    os.close(blocked_read)
    assert threads() > before
    os.close(blocked_write)  # EOF ends that read; the thread then sees it was stopped
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == before
    for fd, _ in opened:
        os.close(fd)
