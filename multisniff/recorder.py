"""The capture around a command that `multisniff record` runs: see multisniff/record.py for
what it does and its exit codes. Kept apart so that the command line's other sub-commands do
not import anyio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process, SocketStream, TaskGroup

from multisniff.errors import ExitCode, MultisniffError
from multisniff.record import (
    COMMAND_NOT_EXECUTABLE,
    COMMAND_NOT_FOUND,
    FORWARDED,
    MARK_SOCKET_VARIABLE,
    MAX_MARK,
)

if TYPE_CHECKING:
    from multisniff.api import Capture
    from multisniff.engine.settings import CaptureSettings

log = logging.getLogger("multisniff")


def _terminal_sent(number: int) -> bool:
    """A Ctrl-C or Ctrl-\\ typed at the terminal reaches COMMAND directly (it is in our
    process group, which the terminal has in the foreground): forwarding it would double it."""
    if number not in (signal.SIGINT, signal.SIGQUIT):
        return False
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
    return False


async def _ended(cap: Capture) -> None:
    """Wait for the capture's end; its error, if any, comes out of its `async with`."""
    with contextlib.suppress(MultisniffError):
        await cap.wait()


def _how_it_ended(returncode: int) -> tuple[str, int]:
    """("exit code 3" / "killed by SIGKILL", the exit code a shell would give)."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}", 128 + number
    return f"exit code {returncode}", returncode


class Recorder:
    def __init__(self, settings: CaptureSettings, command: list[str], *, output: str,
                 summary: str, ready_timeout: float, require_ready: bool, tail: float,
                 keep: str, kubeconfig: str | None = None, context: str | None = None,
                 cluster: Any = None) -> None:
        self.settings = settings.replace(events=True)  # the pods' churn is what record is for
        self.command = command
        self.output = output
        self.summary = summary
        self.ready_timeout = ready_timeout
        self.require_ready = require_ready
        self.tail = tail
        self.keep = keep
        self.kubeconfig = kubeconfig
        self.context = context
        self.cluster = cluster
        self.process: Process | None = None
        self.command_code: int | None = None
        self.command_how = ""
        self.command_started: float | None = None
        self.command_ended: float | None = None
        self.capture_error: MultisniffError | None = None
        self.exit_code: int = ExitCode.OK
        self._tail_scope: anyio.CancelScope | None = None
        self._interrupted = False

    async def run(self) -> int:
        from multisniff import api

        cap = api.capture(profile=self.settings, output=self.output,
                          kubeconfig=self.kubeconfig, context=self.context,
                          cluster=self.cluster)
        socket_dir = tempfile.mkdtemp(prefix="multisniff-record-")
        try:
            try:
                async with cap, anyio.create_task_group() as tg:
                    tg.start_soon(self._on_signals, cap)
                    await self._around_command(cap, tg, socket_dir)
                    tg.cancel_scope.cancel()
            except MultisniffError as exc:
                self.capture_error = self.capture_error or exc
                log.error("%s", exc)
        finally:
            shutil.rmtree(socket_dir, ignore_errors=True)
        return self._finish(cap)

    async def _around_command(self, cap: Capture, tg: TaskGroup, socket_dir: str) -> None:
        from multisniff.api import NotReady

        try:
            await cap.ready(timeout=self.ready_timeout)
        except NotReady as exc:
            if self.require_ready:
                self.capture_error = exc
                log.error("%s COMMAND is not run (--require-ready).", exc)
                cap.stop("not ready (--require-ready)")
                return
            log.warning("%s Running COMMAND anyway; those pods are captured once their "
                        "tcpdump listens (--require-ready would not run it).", exc)
        if self._interrupted:
            return
        ending = cap.session.stop_reason
        if cap.done or ending:
            log.error("The capture is over before the command could start (%s); COMMAND is "
                      "not run.", ending or "see above")
            return
        path = os.path.join(socket_dir, "marks")
        listener = await anyio.create_unix_listener(path)
        os.chmod(path, 0o600)
        tg.start_soon(self._serve_marks, listener, cap)
        env = {**os.environ, MARK_SOCKET_VARIABLE: path}
        try:
            self.process = await anyio.open_process(self.command, stdin=None, stdout=None,
                                                    stderr=None, env=env)
        except FileNotFoundError:
            self.command_code = COMMAND_NOT_FOUND
            self.command_how = "not found"
        except PermissionError:
            self.command_code = COMMAND_NOT_EXECUTABLE
            self.command_how = "not executable"
        except OSError as exc:  # e.g. a script without #! line: ENOEXEC
            self.command_code = COMMAND_NOT_EXECUTABLE
            self.command_how = f"cannot be executed ({(exc.strerror or str(exc)).lower()})"
        if self.process is None:
            log.error("Cannot run %s: %s; check the command after --.", self.command[0],
                      self.command_how)
            cap.timeline.command_ended(self.command, self.command_how, failed=True)
            cap.stop(f"the command could not be run ({self.command_how})")
            return
        self.command_started = time.time()
        cap.timeline.command_started(self.command)
        log.info("Running %s (pid %d).", self.command[0], self.process.pid)
        try:
            returncode = await self.process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._end_command()
        self.command_ended = time.time()
        self.command_how, self.command_code = _how_it_ended(returncode)
        cap.timeline.command_ended(self.command, self.command_how,
                                   failed=self.command_code != 0)
        log.info("%s ended (%s); capturing %g s more.", self.command[0], self.command_how,
                 self.tail)
        self._tail_scope = anyio.move_on_after(self.tail)
        with self._tail_scope:
            await _ended(cap)
        cap.stop("the command ended")
        await _ended(cap)

    async def _end_command(self) -> None:
        """COMMAND outlives no way out of ours: ask it to end, then make it."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        log.warning("Ending %s (pid %d), as multisniff is ending.", self.command[0],
                    process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def _on_signals(self, cap: Capture) -> None:
        with anyio.open_signal_receiver(*FORWARDED) as signals:
            async for number in signals:
                name = signal.Signals(number).name
                process = self.process
                if process is not None and process.returncode is None:
                    if not _terminal_sent(number):
                        log.info("%s: passing it on to %s.", name, self.command[0])
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(number)
                    continue
                if number not in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    continue
                if cap.done:
                    continue
                if self._interrupted:
                    log.warning("%s again: cutting the capture off now.", name)
                    cap.abort()
                    continue
                self._interrupted = True
                if process is None:
                    log.info("%s: stopping before the command started.", name)
                    cap.stop(f"interrupted ({name})", interrupted=True)
                else:
                    log.info("%s: ending the tail now.", name)
                    if self._tail_scope is not None:
                        self._tail_scope.cancel()
                    cap.stop(f"interrupted ({name})")

    async def _serve_marks(self, listener: Any, cap: Capture) -> None:
        async def handle(stream: SocketStream) -> None:
            async with stream:
                data = b""
                with anyio.move_on_after(10):
                    while len(data) <= MAX_MARK and not data.endswith(b"\n"):
                        try:
                            data += await stream.receive(MAX_MARK)
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
                text = data[:MAX_MARK].decode("utf-8", "replace").strip()
                if text:
                    cap.mark(text)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(b"ok\n")

        async with listener:
            await listener.serve(handle)

    # --- the end ------------------------------------------------------------------------------

    def _finish(self, cap: Capture) -> int:
        from multisniff import ui

        result = cap.result if cap.done else None
        capture_failed = self.capture_error is not None or result is None or (
            result.exit_code not in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.INTERRUPTED))
        capture_code = (self.capture_error.exit_code if self.capture_error is not None else
                        result.exit_code if result is not None else ExitCode.NOTHING)
        code: int
        if self.command_code is None:
            code = ExitCode.INTERRUPTED if self._interrupted and self.capture_error is None \
                else capture_code
        elif self.command_code == 0 and capture_failed:
            code = capture_code if capture_code != ExitCode.OK else ExitCode.NOTHING
        else:
            code = self.command_code
        if result is not None:
            for line in ui.summary_lines(result):
                log.info("%s", line)
        kept = self._keep(code)
        summary = ui.summary_json(result, exit_code=code, output=cap.output_name,
                                  error=str(self.capture_error or "") or
                                  (result.error if result is not None else ""))
        summary["command"] = {
            "argv": self.command,
            "exit_code": self.command_code,
            "how": self.command_how,
            "started": self.command_started,
            "ended": self.command_ended,
        }
        summary["kept"] = kept
        try:
            ui.write_summary_json(self.summary, summary)
        except OSError as exc:
            log.error("Cannot write the summary %s: %s.", self.summary,
                      (exc.strerror or str(exc)).lower())
        else:
            kept.append(self.summary)
        for path in kept:
            log.info("kept %s", path)
        self.exit_code = code
        return code

    def _keep(self, code: int) -> list[str]:
        """Apply --keep to the pcapng (and its parts, if merging them failed); what is left."""
        from multisniff.engine.rotation import ring_files

        keep = self.keep == "always" or (self.keep == "on-failure" and code != 0)
        paths = [Path(self.output), Path(self.output + ".parts")]
        if self.settings.rotating:
            paths = ring_files(self.output)
        present = [path for path in paths if path.exists()]
        if keep:
            return [str(path) for path in present]
        for path in present:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if present:
            log.info("Removed %s (--keep %s, exit code %d).", self.output, self.keep, code)
        return []
