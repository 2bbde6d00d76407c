"""The exec stream's demultiplexing and status parsing, over a fake transport of our own."""

from __future__ import annotations

import json

import pytest

from multisniff.errors import ClusterError
from multisniff.kube.execstream import V4, V5, ExecStream, parse_status, split_frame
from multisniff.kube.model import ExecResult


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeTransport:
    """Plays back frames, then reports the connection closed; records what is sent."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)
        self.sent: list[bytes] = []
        self.received = 0

    async def receive_frame(self) -> bytes | None:
        if not self.frames:
            return None
        self.received += 1
        return self.frames.pop(0)

    async def send_frame(self, frame: bytes) -> None:
        self.sent.append(frame)


def status(**fields: object) -> bytes:
    return b"\x03" + json.dumps(fields).encode()


NONZERO_3 = status(status="Failure", reason="NonZeroExitCode",
                   message="command terminated with non-zero exit code: exit code 3",
                   details={"causes": [{"reason": "ExitCode", "message": "3"}]})


def test_split_frame_takes_the_channel_byte_and_keeps_the_rest_binary() -> None:
    assert split_frame(bytes([1, 0, 255, 10])) == (1, bytes([0, 255, 10]))
    assert split_frame(b"") == (1, b"")
    assert split_frame(b"\x03") == (3, b"")


def test_status_success_is_exit_zero() -> None:
    assert parse_status(b'{"metadata":{},"status":"Success"}') == ExecResult(0)


def test_status_nonzero_exit_code_comes_from_the_cause() -> None:
    assert parse_status(NONZERO_3[1:]).exit_code == 3


@pytest.mark.parametrize("raw", [
    b'{"status":"Failure","message":"exec: \\"nope\\": executable file not found"}',
    b'{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[]}}',
    b'{"status":"Failure","reason":"NonZeroExitCode",'
    b'"details":{"causes":[{"reason":"ExitCode","message":"x"}]}}',
    b"not json at all",
    b"[1]",
])
def test_other_failures_have_no_exit_code_but_a_message(raw: bytes) -> None:
    result = parse_status(raw)
    assert result.exit_code is None
    assert result.message


@pytest.mark.anyio
async def test_stdout_stderr_and_status_are_separated() -> None:
    errors: list[bytes] = []
    transport = FakeTransport([b"\x01", b"\x01out\x00\xff", b"\x02err", b"\x04resize?",
                               b"\x01more", NONZERO_3[:20], b"\x03" + NONZERO_3[20:]])
    # The status may come in pieces, each with its channel byte.
    stream = ExecStream(transport, protocol=V5, on_stderr=errors.append)

    assert await stream.read() == b"out\x00\xff"
    assert await stream.read() == b"more"
    assert await stream.read() == b""
    assert await stream.read() == b""
    assert errors == [b"err"]
    assert (await stream.wait()).exit_code == 3


@pytest.mark.anyio
async def test_reading_nothing_receives_nothing() -> None:
    transport = FakeTransport([b"\x01a", b"\x01b"])
    stream = ExecStream(transport, protocol=V5)

    assert await stream.read() == b"a"
    assert transport.received == 1  # the second frame stays in the transport until asked for


@pytest.mark.anyio
async def test_wait_drains_unread_stdout_and_without_status_says_so() -> None:
    stream = ExecStream(FakeTransport([b"\x01unread"]), protocol=V4)

    result = await stream.wait()

    assert result.exit_code is None
    assert "without a status" in result.message


@pytest.mark.anyio
async def test_write_frames_stdin_in_bounded_chunks() -> None:
    transport = FakeTransport([])
    stream = ExecStream(transport, protocol=V5)
    data = bytes(range(256)) * 4096  # 1 MiB

    await stream.write(data)

    assert all(frame[0] == 0 and len(frame) <= 256 * 1024 + 1 for frame in transport.sent)
    assert b"".join(frame[1:] for frame in transport.sent) == data


@pytest.mark.anyio
async def test_close_stdin_sends_the_v5_close_frame_once() -> None:
    transport = FakeTransport([])
    stream = ExecStream(transport, protocol=V5)

    assert await stream.close_stdin() is True
    assert await stream.close_stdin() is True
    assert transport.sent == [b"\xff\x00"]
    with pytest.raises(ClusterError):
        await stream.write(b"late")


@pytest.mark.anyio
async def test_close_stdin_is_impossible_on_v4() -> None:
    transport = FakeTransport([])
    stream = ExecStream(transport, protocol=V4)

    assert await stream.close_stdin() is False
    assert transport.sent == []


class QueuedTransport(FakeTransport):
    """Like FakeTransport, but says how many frames it holds already, as the aiohttp one does;
    `arriving` frames join the queue only while the reader lingers (sleeps)."""

    def __init__(self, frames: list[bytes], arriving: list[bytes] | None = None) -> None:
        super().__init__(frames)
        self.arriving = list(arriving or ())

    def queued(self) -> int:
        return len(self.frames)


@pytest.mark.anyio
async def test_read_joins_the_stdout_of_frames_already_queued_up_to_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("multisniff.kube.execstream.READ_CHUNK", 5)
    transport = QueuedTransport([b"\x01ab", b"\x02err", b"\x01cd", b"\x01ef", b"\x01gh"])
    errors: list[bytes] = []
    stream = ExecStream(transport, protocol=V5, on_stderr=errors.append)
    assert await stream.read() == b"abcdef"  # stops once READ_CHUNK is reached
    assert errors == [b"err"]
    assert await stream.read() == b"gh"
    assert await stream.read() == b""


@pytest.mark.anyio
async def test_read_lingers_for_more_frames_only_when_none_are_queued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("multisniff.kube.execstream.LINGER_AFTER", 2)
    transport = QueuedTransport([b"\x01--"], arriving=[b"\x01cd", b"\x01ef"])
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        transport.frames.extend(transport.arriving)
        transport.arriving.clear()

    monkeypatch.setattr("multisniff.kube.execstream.anyio.sleep", sleep)
    stream = ExecStream(transport, protocol=V5, linger=0.05)
    assert await stream.read() == b"--"  # the first reads of a stream never linger
    assert slept == []
    transport.frames.append(b"\x01ab")
    assert await stream.read() == b"abcdef"
    assert slept == [0.05]
    # a transport that cannot tell what it holds: one frame per read, no lingering
    plain = ExecStream(FakeTransport([b"\x01ab", b"\x01cd"]), protocol=V5, linger=0.05)
    assert await plain.read() == b"ab"
    assert await plain.read() == b"cd"
    assert slept == [0.05]
    # a frame of LINGER_BELOW bytes or more is a batch gathered by the sender: no lingering
    big = b"x" * 4096
    transport.frames.append(b"\x01" + big)
    transport.arriving.append(b"\x01ij")
    assert await stream.read() == big
    assert slept == [0.05]
