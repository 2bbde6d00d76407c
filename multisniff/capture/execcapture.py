"""A remote tcpdump over one exec stream, as every mode runs it.

The exec's stdout is the pcap stream and its stderr ends with tcpdump's statistics; the process
on the other end (the watchdog, or the ephemeral mode's shell) stops tcpdump when its stdin
reaches EOF. `stop()` half-closes stdin; where the exec protocol cannot (v4) it runs the mode's
`stop_command` in the same container instead, which signals the watchdog by a PID file.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence

import anyio

from multisniff.capture.model import CaptureReport, CaptureSpec
from multisniff.capture.stats import last_lines, parse_statistics
from multisniff.kube.model import Cluster, ExecChannel, PodRef

STOP_TIMEOUT = 10.0


class StderrLog:
    """The stderr of a remote tcpdump, as it arrives (an exec's ``on_stderr``), and whether
    tcpdump has said that it captures: until then packets sent to the target are not seen.
    In the upload mode that is after the bundle has been unpacked there, well after the exec
    was opened."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.listening = anyio.Event()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        if not self.listening.is_set() and b"listening on" in self.data:
            self.listening.set()


class ExecCapture:
    """A RemoteCapture over the exec that runs a watched tcpdump."""

    def __init__(self, cluster: Cluster, pod: PodRef, container: str, channel: ExecChannel,
                 stderr: StderrLog, *, stop_command: Sequence[str],
                 bound_to_container: bool, spec: CaptureSpec | None = None) -> None:
        self.bound_to_container = bound_to_container
        self._cluster = cluster
        self._pod = pod
        self._container = container
        self._channel = channel
        self._stderr = stderr
        self._stop_command = list(stop_command)
        self._stopped = False
        self._spec = spec
        """What bounds the remote side: an end by neither was not its own (`unasked`)."""
        self._opened = time.monotonic()
        self.exit_code: int | None = None
        """The remote command's exit status, once `wait` has it."""

    async def read(self) -> bytes:
        data = await self._channel.read()
        if not data:
            self._stderr.listening.set()  # it never will
        return data

    async def listening(self) -> None:
        await self._stderr.listening.wait()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if await self._channel.close_stdin():
            return
        with anyio.move_on_after(STOP_TIMEOUT):
            await run_to_end(self._cluster, self._pod, self._container, self._stop_command)

    async def wait(self) -> CaptureReport:
        result = await self._channel.wait()
        self.exit_code = result.exit_code
        self._stderr.listening.set()
        text = bytes(self._stderr.data).decode(errors="replace")
        stats = parse_statistics(text)
        return CaptureReport(
            exit_code=result.exit_code,
            captured=stats.captured,
            received=stats.received,
            dropped_by_kernel=stats.dropped_by_kernel,
            message=last_lines(text) or result.message,
            unasked=self._unasked(),
        )

    def _unasked(self) -> bool:
        spec = self._spec
        return (spec is not None and not self._stopped and spec.packet_count is None and
                time.monotonic() - self._opened < spec.lifetime - 1)


def signal_by_pidfile(pidfile: str, signal: str) -> list[str]:
    """A command that sends SIG``signal`` to the process whose PID is in ``pidfile``: how a
    capture is stopped where the exec protocol cannot close stdin alone (v4)."""
    return ["sh", "-c", f'read -r p < {shlex.quote(pidfile)} && kill -{signal} "$p"']


async def run_to_end(cluster: Cluster, ref: PodRef, container: str,
                     command: Sequence[str]) -> tuple[int | None, bytes, str]:
    """Run a short command to its end: (exit code, stdout, server message or stderr)."""
    stderr = bytearray()
    out = bytearray()
    async with cluster.exec(ref, container, command, on_stderr=stderr.extend) as channel:
        while chunk := await channel.read():
            out += chunk
        result = await channel.wait()
    message = result.message or bytes(stderr).decode(errors="replace").strip()
    return result.exit_code, bytes(out), message
