"""The private parts of aiohttp that multisniff.kube.wsprivate reads, against a real aiohttp
WebSocket on loopback: these fail when an aiohttp release changes them (and the first one when
aiohttp starts to give the chosen subprotocol by its public API, which would make the workaround
unneeded)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from multisniff.kube.wsprivate import ReadingHold, ReceiveQueue, chosen_protocol

pytestmark = pytest.mark.anyio

OFFER = "v5.channel.k8s.io,v4.channel.k8s.io"
"""As kubernetes-asyncio's WsApiClient sends it: a plain header, not aiohttp's `protocols=`."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, anyio.Event]]:
    """A WebSocket server that picks v5, sends three binary messages, then waits for `done`."""
    done = anyio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io",))
        await ws.prepare(request)
        for i in range(3):
            await ws.send_bytes(bytes([1, i]))
        await done.wait()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/exec", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/exec", done
    finally:
        done.set()
        await runner.cleanup()


async def test_the_chosen_protocol_comes_from_the_handshake_response(
        server: tuple[str, anyio.Event]) -> None:
    url, done = server
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, headers={"Sec-WebSocket-Protocol": OFFER}) as ws:
        assert ws.protocol is None  # not public: else use it, and drop the workaround
        assert chosen_protocol(ws) == "v5.channel.k8s.io"
        done.set()


async def test_the_receive_queue_counts_the_messages_that_wait(
        server: tuple[str, anyio.Event]) -> None:
    url, done = server
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, headers={"Sec-WebSocket-Protocol": OFFER}) as ws:
        queued = ReceiveQueue(ws)
        first = await ws.receive()
        with anyio.fail_after(10):
            while queued() < 2:  # the other two arrive on their own
                await anyio.sleep(0.01)
        assert queued() == 2
        taken = [first.data, (await ws.receive()).data, (await ws.receive()).data]
        assert taken == [b"\x01\x00", b"\x01\x01", b"\x01\x02"]
        assert queued() == 0
        done.set()
        closing = await ws.receive()
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert queued() == 0


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client trusting it."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_held_connection_takes_no_bytes_until_released(tls: bool,
                                                               tmp_path: Path) -> None:
    go, done = anyio.Event(), anyio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io",))
        await ws.prepare(request)
        await go.wait()
        for i in range(3):
            await ws.send_bytes(bytes([1, i]))
        await done.wait()
        await ws.close()
        return ws

    server_ssl, client_ssl = tls_contexts(tmp_path) if tls else (None, None)
    app = web.Application()
    app.router.add_get("/exec", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{runner.addresses[0][1]}/exec"
    try:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(url, ssl=client_ssl if tls else False,
                                   headers={"Sec-WebSocket-Protocol": OFFER}) as ws:
            queued, hold = ReceiveQueue(ws), ReadingHold(ws)
            assert hold.works
            hold(True)
            go.set()
            await anyio.sleep(0.5)  # sent, and waiting in the kernel: none taken
            assert queued() == 0
            hold(False)
            with anyio.fail_after(10):
                while queued() < 3:
                    await anyio.sleep(0.01)
            done.set()
    finally:
        done.set()
        await runner.cleanup()
