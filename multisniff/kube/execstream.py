"""One exec WebSocket as a byte stream: stdout to read, stdin to write, an exit status at the end.

kubernetes-asyncio's own exec helper decodes every frame as text and keeps the whole output in
memory, which a pcap stream cannot survive. Here the frames stay bytes and are taken off the
socket only when the reader asks for more: aiohttp stops reading the socket once its small queue
is full, so a reader that does not call `read()` pauses the remote process (real backpressure).

The frame demultiplexing and the status parsing are sans-IO (`split_frame`, `parse_status`,
`ExecStream` over a `FrameTransport`), so they are tested with fakes; `open_exec` is the thin
aiohttp edge that opens the WebSocket and translates its refusals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import aiohttp
import anyio

from multisniff.errors import (
    ApiError,
    ApiRequest,
    ClusterError,
    Forbidden,
    NotFound,
    Unreachable,
    api_error_class,
)
from multisniff.kube.k8sclient import k8s
from multisniff.kube.model import ExecResult, PodRef
from multisniff.kube.wsprivate import ReadingHold, ReceiveQueue, chosen_protocol

logger = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PROTOCOLS = (V5, V4)
"""Asked for in this order; only v5 can half-close stdin."""

WRITE_CHUNK = 256 * 1024
"""Largest stdin frame we send; bigger writes are split so no frame nears a size limit."""
READ_CHUNK = 256 * 1024
"""Most stdout bytes one `read()` hands on: frames already queued are joined up to this."""
LINGER = 0.25
"""Seconds `read()` lets frames gather after the first one, by default (a capture's exec asks for
its own: `CaptureSpec.read_linger`) (tcpdump -U sends one message per
packet, the watchdog one per flush_delay): one chunk per pod per LINGER instead of one trip
through every layer per frame. Frames that reached us are safe from a crash of the remote side,
so only the remote side's batches need to be short. The queue of the WebSocket stays bounded
(aiohttp pauses the socket when it is full). Only from the LINGER_AFTER-th read on: short
commands, which read a chunk or two, are not slowed down. And only after a frame smaller than
LINGER_BELOW: a big frame says that traffic is heavy enough to gather by itself."""
LINGER_AFTER = 4
HOLD_RELEASE_STEPS = 3
LINGER_BELOW = 4096
CLOSE_GRACE = 5.0
"""Seconds the closing handshake of the WebSocket may take before the connection is dropped."""


def split_frame(frame: bytes) -> tuple[int, bytes]:
    """A binary message of the channel protocol -> (channel, payload). An empty message (the
    server's first, on some versions) is an empty stdout frame."""
    if not frame:
        return STDOUT, b""
    return frame[0], frame[1:]


def parse_status(raw: bytes) -> ExecResult:
    """The metav1.Status of the status channel -> how the process ended.

    Success is 0; NonZeroExitCode carries the code as the message of the `ExitCode` cause;
    anything else (the command was not found, the container is gone) has no exit code, and the
    server's message says why.
    """
    try:
        status = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        text = raw.decode("utf-8", errors="replace").strip()
        return ExecResult(None, f"the server sent a status that is not JSON: {text[:200]!r}")
    if not isinstance(status, dict):
        return ExecResult(None, f"the server sent an unexpected status: {status!r}"[:300])
    if status.get("status") == "Success":
        return ExecResult(0)
    message = str(status.get("message") or "")
    if status.get("reason") == "NonZeroExitCode":
        details = status.get("details") or {}
        for cause in details.get("causes") or ():
            if cause.get("reason") == "ExitCode":
                try:
                    return ExecResult(int(cause.get("message", "")), message)
                except ValueError:
                    break
    return ExecResult(None, message or f"the exec failed: {status!r}"[:300])


class FrameTransport(Protocol):
    """Binary messages in and out: what `ExecStream` needs of a WebSocket."""

    async def receive_frame(self) -> bytes | None:
        """The next binary message; None once the connection is closed."""
        ...

    async def send_frame(self, frame: bytes) -> None: ...


class ExecStream:
    """A running exec (`multisniff.kube.model.ExecChannel`) over a `FrameTransport`.

    One task reads (`read`, then `wait`); writing stdin may happen from another task.
    """

    def __init__(self, transport: FrameTransport, *, protocol: str | None,
                 on_stderr: Callable[[bytes], None] | None = None,
                 linger: float = 0.0) -> None:
        self._transport = transport
        self._queued: Callable[[], int] | None = getattr(transport, "queued", None)
        self._hold: Callable[[bool], None] | None = getattr(transport, "hold", None)
        self._linger = linger
        self._reads = 0
        self.protocol = protocol
        self._on_stderr = on_stderr
        self._status = bytearray()
        self._ended = False
        self._stdin_closed = False

    async def read(self) -> bytes:
        """The next stdout bytes (b"" at the end): at least one frame's, plus those of the
        frames that arrive within `linger` or are queued already, up to READ_CHUNK."""
        first = await self._next_stdout()
        queued = self._queued
        if not first or queued is None:
            return first
        self._reads += 1
        if self._linger > 0 and self._reads >= LINGER_AFTER and len(first) < LINGER_BELOW and \
                not queued():
            await self._gather()
        parts = [first]
        size = len(first)
        while size < READ_CHUNK and not self._ended and queued():
            payload = await self._next_stdout()
            if not payload:
                break
            parts.append(payload)
            size += len(payload)
        return first if len(parts) == 1 else b"".join(parts)

    async def _gather(self) -> None:
        """Let frames arrive for `linger` seconds; where the transport can hold them in its
        socket meanwhile, they are decrypted and parsed in one go afterwards, not one by one."""
        hold = self._hold
        if hold is None:
            await anyio.sleep(self._linger)
            return
        hold(True)
        try:
            await anyio.sleep(self._linger)
        finally:
            hold(False)
        for _ in range(HOLD_RELEASE_STEPS):  # the release takes effect in the loop's next turns
            await anyio.sleep(0)

    async def _next_stdout(self) -> bytes:
        while not self._ended:
            frame = await self._transport.receive_frame()
            if frame is None:
                self._ended = True
                break
            channel, payload = split_frame(frame)
            if channel == STDOUT:
                if payload:
                    return payload
            elif channel == STDERR:
                if payload and self._on_stderr is not None:
                    self._on_stderr(payload)
            elif channel == STATUS:
                self._status += payload
            else:
                logger.debug("exec: ignoring %d bytes on channel %d", len(payload), channel)
        return b""

    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            raise ClusterError("Cannot write to an exec whose stdin is already closed; "
                               "this is a bug in multisniff, please report it.")
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            await self._transport.send_frame(bytes([STDIN]) + view[start:start + WRITE_CHUNK])

    async def close_stdin(self) -> bool:
        if self.protocol != V5:
            return False
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._transport.send_frame(bytes([CLOSE, STDIN]))
        return True

    async def wait(self) -> ExecResult:
        """Drain what is left of stdout (discarded) and return the status."""
        while await self.read():
            pass
        if not self._status:
            return ExecResult(None, "the exec stream ended without a status from the server")
        return parse_status(bytes(self._status))


class _AiohttpTransport:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.queued = ReceiveQueue(ws)
        """Messages received and not taken yet: `receive_frame` returns those at once."""
        self.hold = ReadingHold(ws)
        """Stop (True) or resume (False) taking bytes off the connection: see wsprivate."""

    async def receive_frame(self) -> bytes | None:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is aiohttp.WSMsgType.TEXT:  # not sent by Kubernetes in binary protocols
                return str(msg.data).encode()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
                return None
            if msg.type is aiohttp.WSMsgType.ERROR:
                raise ClusterError(f"The exec stream broke: {msg.data}; the pod's node or the "
                                   "API server may have restarted, try again.")

    async def send_frame(self, frame: bytes) -> None:
        try:
            await self._ws.send_bytes(frame)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ClusterError(f"Cannot send to the exec stream: {exc}; the remote process may "
                               "have ended already.") from exc


def exec_request(pod: PodRef) -> ApiRequest:
    return ApiRequest("create", "pods/exec", pod.namespace, pod.name)


def handshake_refusal(status: int, pod: PodRef, container: str, detail: str) -> ApiError:
    """The error for a refused exec handshake (its HTTP status and reason phrase)."""
    request = exec_request(pod)
    if status == 403:
        # Before Kubernetes 1.31 the WebSocket upgrade (a GET) was authorized as `get`.
        return Forbidden(request, detail=detail, also=("get",))
    if status == 404:
        return NotFound(request, detail=f"pod {pod} or its container {container} does not "
                                        "exist (any more)")
    message = None
    if status == 400:
        message = (f"Cannot exec in {pod} container {container}: the server said "
                   f"{detail or 'bad request'} (400); the container may not be running.")
    return api_error_class(status)(request, status=status, detail=detail, message=message)


@asynccontextmanager
async def open_exec(
    api_client: Any,
    pod: PodRef,
    container: str,
    command: Sequence[str],
    *,
    stdin: bool = False,
    on_stderr: Callable[[bytes], None] | None = None,
    host: str = "",
    linger: float = LINGER,
) -> AsyncIterator[ExecStream]:
    """Open an exec through `api_client` (a kubernetes-asyncio WsApiClient); leaving closes it.
    `linger`: see LINGER.

    The heartbeat of the client must be off: a stream paused by backpressure answers no pings,
    and aiohttp would kill it.
    """
    # Typed as Any: the generated stubs promise `str` for what WsApiClient makes a WebSocket.
    api: Any = k8s.CoreV1Api(api_client)
    try:
        connecting = await api.connect_get_namespaced_pod_exec(
            pod.name, pod.namespace, command=list(command), container=container,
            stdin=stdin, stdout=True, stderr=True, tty=False,
            _preload_content=False,
            _headers={"sec-websocket-protocol": ",".join(PROTOCOLS)},
        )
        ws = await connecting.__aenter__()
    except aiohttp.WSServerHandshakeError as exc:
        raise handshake_refusal(exc.status, pod, container, exc.message) from exc
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise Unreachable(exec_request(pod), host=host, detail=str(exc)) from exc
    try:
        yield ExecStream(_AiohttpTransport(ws), protocol=chosen_protocol(ws), on_stderr=on_stderr,
                         linger=linger)
    finally:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLOSE_GRACE) as scope:
                try:
                    await ws.close()
                except (aiohttp.ClientError, OSError) as exc:
                    logger.debug("exec %s: closing the WebSocket failed: %s", pod, exc)
            if scope.cancelled_caught:
                logger.debug("exec %s: the WebSocket did not close in %ss; dropped it",
                             pod, CLOSE_GRACE)
            # Leaves aiohttp's request context (releases the connection to the pool).
            await connecting.__aexit__(None, None, None)
