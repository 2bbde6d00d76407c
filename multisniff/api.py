"""The one way a capture starts: `capture(...)`, used by the command line and by Python callers.

    async with multisniff.capture("app=web", namespace="shop", output="web.pcapng",
                                  profile="chaos-ci") as cap:
        await cap.ready()          # every pod matched so far has a tcpdump listening
        ...                        # cap.pods: the captures as they are now; cap.stop(reason)
    cap.result                     # what the summary shows, also after an error

Here the layers are wired: settings from a profile plus keywords, the connection, the capture
mode from the registry, the output, and the session running in a task group of its own. The
caller's signal handling stays the caller's: nothing here installs a handler. `run_capture` is
the same for a plain script that is not async.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import IO, Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus

from multisniff import profiles
from multisniff.capture import registry
from multisniff.capture.cleanup import CleanupReport
from multisniff.capture.cleanup import cleanup as remove_leftovers
from multisniff.capture.model import ModeOptions
from multisniff.engine.events import Event, EventKind, Timeline
from multisniff.engine.output import FileOutput, LiveOutput
from multisniff.engine.rotation import RotatingFileSink
from multisniff.engine.runs import CaptureRun
from multisniff.engine.session import Session, SessionResult, check_settings
from multisniff.engine.session import dry_run as session_dry_run
from multisniff.engine.settings import CaptureSettings
from multisniff.engine.sinks import (
    AsyncWriterSink,
    ByteSink,
    FdSink,
    FileObjectSink,
    WiresharkSink,
)
from multisniff.errors import MultisniffError, UsageError
from multisniff.kube.model import Cluster

__all__ = ["Capture", "Event", "EventKind", "NotReady", "capture", "cleanup", "dry_run",
           "mode_names",
           "run_capture", "settings_for"]


class _AsyncWritable(Protocol):
    def write(self, data: bytes, /) -> Awaitable[Any]: ...


Output = str | os.PathLike[str] | IO[bytes] | _AsyncWritable
"""Where packets go: a path (an exactly time-ordered pcapng file), "-" (a live stream on
stdout), a writable binary file object, or an object with ``async write(bytes)`` (both live
streams, merged within the reorder window)."""


class NotReady(MultisniffError):
    """`Capture.ready()` timed out: some pods have no tcpdump listening yet."""


def mode_names() -> tuple[str, ...]:
    """The capture modes `mode=` (and --mode) takes."""
    return registry.mode_names()


def settings_for(profile: str | CaptureSettings | None = None,
                 **overrides: Any) -> CaptureSettings:
    """Settings from a profile (a name, a path, a Profile; None: the defaults) and keyword
    overrides named as profile keys; durations and sizes may be strings ("30s", "10M")."""
    if profile is None or isinstance(profile, str):
        base: CaptureSettings = profiles.resolve(profile)[0]
    else:
        base = profile
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in profiles.KEYS or key == "description":
            raise TypeError(f"capture() got an unexpected keyword argument {key!r}")
        if value is None:
            if key != "namespace":
                continue
        else:
            try:
                value = profiles.convert(key, value)
            except ValueError as exc:
                raise UsageError(f"{key}: {exc}.") from exc
        changes[key] = value
    if overrides.get("all_namespaces") and overrides.get("namespace") is None:
        changes["namespace"] = None
    settings = base.settings().replace(**changes)
    check_settings(settings)
    return settings


def capture(selector: str | None = None, *, output: Output | None = None,
            wireshark: bool = False, profile: str | CaptureSettings | None = None,
            kubeconfig: str | None = None, context: str | None = None,
            cluster: Cluster | None = None, **settings: Any) -> Capture:
    """A capture of every pod that `selector` matches (kubectl label syntax), as an async
    context manager. Keywords are profile keys and override the profile: namespace,
    all_namespaces, field_selector, container, interface, filter, snaplen, mode, duration,
    count, max_size, follow, ... (see configs/all-traffic.toml). Give `output` or
    `wireshark=True`. `cluster` is an already connected Cluster (else the kubeconfig's).
    Usage errors raise `UsageError` here, before anything starts."""
    if selector is not None:
        settings["labels"] = selector
    resolved = settings_for(profile, **settings)
    if output is None and not wireshark:
        raise UsageError("Say where the capture goes: -o FILE, -o - for stdout, or "
                         "--wireshark.")
    if output is not None and wireshark:
        raise UsageError("Give either -o or --wireshark, not both.")
    if resolved.rotating and (wireshark or output == "-" or
                              not isinstance(output, (str, os.PathLike))):
        raise UsageError("--rotate-size and --rotate-every write a ring of files; give a "
                         "file with -o, not a live stream.")
    if isinstance(output, str) and output == "-" and os.isatty(1):
        raise UsageError("Refusing to write binary pcapng to a terminal; redirect stdout "
                         "or give a file with -o.")
    return Capture(resolved, output=output, wireshark=wireshark, kubeconfig=kubeconfig,
                   context=context, cluster=cluster)


class Capture:
    """One running capture session: enter it to start, leave it to stop and clean up."""

    def __init__(self, settings: CaptureSettings, *, output: Output | None,
                 wireshark: bool = False, kubeconfig: str | None = None,
                 context: str | None = None, cluster: Cluster | None = None) -> None:
        self.settings = settings
        self._output_target = output
        self._wireshark = wireshark
        self._kubeconfig = kubeconfig
        self._context = context
        self._cluster = cluster
        self._stack = AsyncExitStack()
        self._session: Session | None = None
        self._error: MultisniffError | None = None
        self._result: SessionResult | None = None
        self._done = anyio.Event()
        self._started_at = time.time()
        self.mode_options = mode_options(settings)
        """What the modes are told, the session's mark (its id: `session_id`) among it."""

    @property
    def session_id(self) -> str:
        """The id of the session label on everything it creates (`multisniff cleanup
        --session ID` finds what a killed run left)."""
        return self.mode_options.session.session_id

    @property
    def output_name(self) -> str:
        """The output as the summary names it: a path, "-" or "wireshark"."""
        if self._wireshark:
            return "wireshark"
        target = self._output_target
        if isinstance(target, (str, os.PathLike)):
            return os.fspath(target)
        return str(getattr(target, "name", None) or type(target).__name__)

    # --- entering and leaving -----------------------------------------------------------------

    async def __aenter__(self) -> Capture:
        try:
            cluster = self._cluster
            if cluster is None:
                from multisniff.kube.api import connect

                cluster = await self._stack.enter_async_context(
                    connect(self._kubeconfig, self._context))
            mode = registry.create(self.settings.mode, cluster, self.mode_options)
            output = await self._make_output()
            self._session = session = Session(cluster, mode, self.settings, output)
            if isinstance(output, LiveOutput):
                output.on_closed = lambda why: session.stop(why)
            tg: TaskGroup = await self._stack.enter_async_context(anyio.create_task_group())
            await tg.start(self._run)
        except BaseException as exc:
            self._fail(exc)
            self._done.set()
            await self._stack.aclose()
            raise
        if self._error is not None:
            await self._stack.aclose()
            raise self._error
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        cancelled = exc_type is not None and issubclass(exc_type,
                                                        anyio.get_cancelled_exc_class())
        pending: tuple[Any, Any, Any] = (exc_type, exc, tb) if cancelled else (None, None, None)
        try:
            if not cancelled:
                self.stop("the capture's block ended" if exc_type is None else
                          f"the capture's block raised {exc_type.__name__}")
                await self._done.wait()
        except BaseException:
            pending = sys.exc_info()
            raise
        finally:
            await self._stack.__aexit__(*pending)
        if exc_type is None and self._error is not None:
            raise self._error

    async def _make_output(self) -> LiveOutput | FileOutput:
        settings = self.settings
        target = self._output_target
        sink: ByteSink
        if self._wireshark:
            sink = await WiresharkSink.start()
        elif target == "-":
            sink = FdSink(1, "stdout")
        elif isinstance(target, (str, os.PathLike)) and settings.rotating:
            sink = RotatingFileSink(os.fspath(target), max_size=settings.rotate_size,
                                    every=settings.rotate_every,
                                    keep_files=settings.keep_files)
        elif isinstance(target, (str, os.PathLike)):
            return FileOutput(os.fspath(target), grace=settings.stop_grace)
        elif target is not None and _is_async_writer(target):
            sink = AsyncWriterSink(target)  # type: ignore[arg-type]
        elif target is not None and callable(getattr(target, "write", None)):
            sink = FileObjectSink(target)  # type: ignore[arg-type]
        else:
            raise UsageError(f"The output must be a path, '-', a writable binary file or an "
                             f"async byte sink, not {type(target).__name__}.")
        return LiveOutput(sink, buffer_chunks=settings.buffer_chunks,
                          reorder_window=settings.reorder_window,
                          flush_interval=settings.flush_interval,
                          max_pending=settings.max_pending, grace=settings.stop_grace)

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        session = self._session
        assert session is not None
        try:
            self._result = await session.run(task_status=task_status)
        except MultisniffError as exc:
            self._error = exc
            self._result = session.result
            if not session.started:
                task_status.started()
        finally:
            if self._result is not None:
                self._result.left_behind = list(self.mode_options.leftovers.entries)
            self._done.set()

    def _fail(self, exc: BaseException) -> None:
        """The result of a capture that ended before its session could: empty, with the
        error's sentence and exit code."""
        if isinstance(exc, MultisniffError):
            self._error = self._error or exc
        if self._result is None and self._error is not None:
            self._result = SessionResult(
                runs=[], skipped=[], exit_code=self._error.exit_code,
                output=self.output_name, started=self._started_at, ended=time.time(),
                stop_reason="", error=str(self._error))

    # --- while it runs ------------------------------------------------------------------------

    @property
    def pods(self) -> tuple[CaptureRun, ...]:
        """Every capture so far (a restarted container is a new one), with its live state,
        counters and mode: `run.label`, `run.state`, `run.packets`, `run.dropped`, ..."""
        return self._session.pods if self._session is not None else ()

    @property
    def session(self) -> Session:
        assert self._session is not None, "the capture has not been entered"
        return self._session

    async def ready(self, timeout: float | None = None) -> None:
        """Return once every pod matched so far has a tcpdump listening (or its capture has
        ended); raise NotReady, naming the pods, after `timeout` seconds."""
        session = self.session
        try:
            with anyio.fail_after(timeout):
                await session.ready()
        except TimeoutError:
            waiting = [run.label for run in session.runs if run.state == "starting"]
            raise NotReady(
                f"{len(waiting)} pod{'s' if len(waiting) != 1 else ''} had no tcpdump "
                f"listening after {timeout:g} s: {', '.join(waiting)}; see the log for why, "
                f"or wait longer.") from None

    @property
    def timeline(self) -> Timeline:
        """The events so far (`timeline.events`), and where `multisniff record` adds its own."""
        return self.session.timeline

    def mark(self, text: str) -> Event:
        """Put `text` on the timeline now: a packet on the interface multisniff/events with
        `text` as its comment, in time order among the pods' packets."""
        return self.session.timeline.mark(text)

    def stop(self, reason: str = "stopped by the caller", *, interrupted: bool = False) -> None:
        """End the capture: every tcpdump is stopped, what they sent is written, and
        everything created is removed. Returns at once; `wait()` for the end."""
        if self._session is not None:
            self._session.stop(reason, interrupted=interrupted)

    def abort(self) -> None:
        """Cut the captures off now (cleanup still runs, shielded and bounded)."""
        if self._session is not None:
            self._session.abort()

    async def wait(self) -> SessionResult:
        """Wait until the capture ends by itself (its limits, `stop()`, every capture over
        without follow); its result, or the error that ended it."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> SessionResult:
        """What the summary shows, once the capture has ended, also after an error."""
        if self._result is None:
            raise RuntimeError("The capture has not ended yet; await wait() or leave its "
                               "async with block first.")
        return self._result

    @property
    def error(self) -> MultisniffError | None:
        """The error that ended the capture, if one did."""
        return self._error


def mode_options(settings: CaptureSettings) -> ModeOptions:
    """What the capture modes are told of the settings, for one session."""
    return ModeOptions(ephemeral_image=settings.ephemeral_image,
                       agent_image=settings.agent_image,
                       agent_namespace=settings.agent_namespace,
                       allow_privileged=settings.allow_privileged,
                       remote_lifetime=settings.remote_lifetime)


def _is_async_writer(target: object) -> bool:
    import inspect

    write = getattr(target, "write", None)
    return write is not None and inspect.iscoroutinefunction(write)


async def dry_run(selector: str | None = None, *, profile: str | CaptureSettings | None = None,
                  kubeconfig: str | None = None, context: str | None = None,
                  cluster: Cluster | None = None, **settings: Any) -> list[str]:
    """What `capture(...)` with the same arguments would do, in lines: the matched pods, the
    mode each would get and why, what would be created, how long remote tcpdumps may live."""
    if selector is not None:
        settings["labels"] = selector
    resolved = settings_for(profile, **settings)
    async with AsyncExitStack() as stack:
        if cluster is None:
            from multisniff.kube.api import connect

            cluster = await stack.enter_async_context(connect(kubeconfig, context))
        mode = registry.create(resolved.mode, cluster, mode_options(resolved))
        try:
            return await session_dry_run(cluster, mode, resolved)
        finally:
            with anyio.CancelScope(shield=True):
                await mode.aclose()


async def cleanup(*, namespace: str | None = None, all_namespaces: bool = False,
                  session: str | None = None, dry_run: bool = False,
                  kubeconfig: str | None = None, context: str | None = None,
                  cluster: Cluster | None = None) -> CleanupReport:
    """Find and remove what earlier capture sessions left behind: agent pods (of `session`
    only, when given), and multisniff's processes and files in every running container of
    the namespace (the kubeconfig context's unless given; every one with `all_namespaces`).
    `dry_run` only lists them. It also ends captures still running: use it when none is."""
    if all_namespaces and namespace:
        raise UsageError("Give either -n NAMESPACE or -A (all namespaces), not both.")
    async with AsyncExitStack() as stack:
        if cluster is None:
            from multisniff.kube.api import connect

            cluster = await stack.enter_async_context(connect(kubeconfig, context))
        where = None if all_namespaces else (namespace or cluster.default_namespace)
        return await remove_leftovers(cluster, namespace=where, session=session,
                                      dry_run=dry_run)


def run_capture(selector: str | None = None, **arguments: Any) -> SessionResult:
    """`capture(...)` for a plain script: blocks until the capture ends by itself (give
    `duration`, `count` or `max_size`, or `follow=False`) and returns its result; raises the
    error that ended it (its result is then lost with it: use `capture` to keep both).
    No signal handler is installed: Ctrl-C cancels, and cleanup still runs."""

    async def main() -> SessionResult:
        async with capture(selector, **arguments) as cap:
            return await cap.wait()

    result: SessionResult = anyio.run(main, backend="asyncio")
    return result
