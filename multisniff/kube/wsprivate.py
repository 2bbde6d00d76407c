"""The three things the exec stream needs of an aiohttp WebSocket that aiohttp has no public API
for; the only module that reads private attributes of aiohttp (and of asyncio's TLS transport).

- The subprotocol the server chose. aiohttp fills the public `ClientWebSocketResponse.protocol`
  only when the caller passed `protocols=` to `ws_connect`; kubernetes-asyncio's `WsApiClient`
  sends the offer as a plain `Sec-WebSocket-Protocol` header instead, so the answer is only in
  the headers of the handshake response, which aiohttp keeps as `_response`.
- How many received messages wait in aiohttp's queue (`_reader._buffer`), so that a read can
  take the frames that are there already without waiting for more: without it, nothing is
  coalesced.
- Holding the connection's reading for a moment (`ReadingHold`), so that the frames of a busy
  pod wait in the kernel's socket buffer and are then read, decrypted and parsed in one go
  instead of a TCP segment at a time: the protocol of the response's connection
  (`_response.connection.protocol`) and, under TLS, the socket's own transport beneath asyncio's
  TLS layer (`transport._ssl_protocol._transport`), which would go on reading otherwise.
  aiohttp's own flow control pauses the same protocol when its queue is full.

All read attributes that may change in any aiohttp (or asyncio) release. Where one is missing
the answer is "unknown" (None, 0, no hold): exec streams still work, on v4 semantics or without
coalescing. tests/unit/test_kube_wsprivate.py runs them against a real aiohttp WebSocket on
loopback, with and without TLS, and fails when one stops working, or when aiohttp starts to
fill `protocol` by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

_DATA = (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT)


def chosen_protocol(ws: aiohttp.ClientWebSocketResponse) -> str | None:
    """The Sec-WebSocket-Protocol of the handshake response, or None."""
    if ws.protocol is not None:
        return ws.protocol
    headers = getattr(getattr(ws, "_response", None), "headers", None)
    if headers is None:
        return None
    chosen = headers.get("Sec-WebSocket-Protocol")
    return chosen.strip() if isinstance(chosen, str) else None


class ReceiveQueue:
    """How many data messages `ws.receive()` would return without waiting."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._buffer: Sequence[Any] = getattr(getattr(ws, "_reader", None), "_buffer", ())

    def __call__(self) -> int:
        """Data messages at the head of the queue (a ping or close there counts as none: its
        `receive()` could wait for the next message)."""
        buffer = self._buffer
        if not buffer:
            return 0
        kind = getattr(buffer[0][0], "type", None)
        return len(buffer) if kind in _DATA else 0


class ReadingHold:
    """`hold(True)` stops taking bytes off the WebSocket's connection, `hold(False)` resumes."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        connection = getattr(getattr(ws, "_response", None), "connection", None)
        self._protocol: Any = getattr(connection, "protocol", None)
        transport = getattr(connection, "transport", None)
        self._raw: Any = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)

    @property
    def works(self) -> bool:
        return self._protocol is not None

    def __call__(self, held: bool) -> None:
        protocol, raw = self._protocol, self._raw
        if protocol is None:
            return
        if held:
            protocol.pause_reading()
            if raw is not None:
                raw.pause_reading()
        else:
            if raw is not None:
                raw.resume_reading()
            protocol.resume_reading()
