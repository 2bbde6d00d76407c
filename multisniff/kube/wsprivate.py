"""The two things the exec stream needs of an aiohttp WebSocket that aiohttp has no public API
for; the only module that reads private attributes of aiohttp.

- The subprotocol the server chose. aiohttp fills the public `ClientWebSocketResponse.protocol`
  only when the caller passed `protocols=` to `ws_connect`; kubernetes-asyncio's `WsApiClient`
  sends the offer as a plain `Sec-WebSocket-Protocol` header instead, so the answer is only in
  the headers of the handshake response, which aiohttp keeps as `_response`.
- How many received messages wait in aiohttp's queue (`_reader._buffer`), so that a read can
  take the frames that are there already without waiting for more: without it, nothing is
  coalesced.

Both read attributes that may change in any aiohttp release. Where one is missing the answer is
"unknown" (None, 0): exec streams still work, on v4 semantics or without coalescing.
tests/unit/test_kube_wsprivate.py runs both against a real aiohttp WebSocket on loopback and
fails when either stops working, or when aiohttp starts to fill `protocol` by itself.
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
