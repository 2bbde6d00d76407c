"""A pytest plugin: record the pods under test while the tests run, keep what failed tests saw.

Registered through the `pytest11` entry point and off unless asked for: nothing happens without
--multisniff-selector (or a --multisniff-profile that sets labels). Then one capture runs for
the whole session, with a mark on the timeline as each test's setup, call and teardown begins
and with each one's outcome; or, with --multisniff-per-test, one capture per test (started and
ready before its setup, stopped after its teardown). The `multisniff` fixture gives a test the
running recording (`multisniff.mark("text")`, `multisniff.path`). With --multisniff-keep
on-failure (default) a recording is kept only when a test in it failed; the terminal summary
lists the files kept for the failed tests.

The capture runs in an event loop of its own, in a thread (anyio's blocking portal), so that
synchronous tests and pytest itself are not touched; it installs no signal handler.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from multisniff.api import Capture
    from multisniff.engine.session import SessionResult

READY_TIMEOUT = 60.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("multisniff", "record the pods under test (multisniff)")
    group.addoption("--multisniff-selector", metavar="SELECTOR",
                    help="record the pods this label selector matches while the tests run "
                         "(turns the plugin on)")
    group.addoption("--multisniff-namespace", metavar="NAMESPACE",
                    help="their namespace (default: the kubeconfig context's)")
    group.addoption("--multisniff-profile", metavar="NAME|PATH",
                    help="capture settings from a multisniff profile, e.g. chaos-ci")
    group.addoption("--multisniff-dir", metavar="DIR", default="multisniff-recordings",
                    help="where recordings go (default ./multisniff-recordings)")
    group.addoption("--multisniff-keep", choices=("on-failure", "always"),
                    default="on-failure",
                    help="keep a recording only if a test in it failed (default), or always")
    group.addoption("--multisniff-per-test", action="store_true",
                    help="one recording per test instead of one for the session")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("multisniff_selector") or config.getoption("multisniff_profile"):
        config.pluginmanager.register(Recorder(config), "multisniff-recorder")


@dataclass
class Recording:
    """One capture, running in the portal's event loop: what the `multisniff` fixture gives."""

    path: Path
    portal: BlockingPortal
    capture: Capture
    context: AbstractContextManager[Capture]
    failed: list[str] = field(default_factory=list)
    """Node ids of the tests that failed while it ran."""
    result: SessionResult | None = None

    def mark(self, text: str) -> None:
        """Put `text` on the recording's timeline now."""
        if not self.capture.done:
            self.portal.call(self.capture.mark, text)

    def stop(self) -> SessionResult:
        self.context.__exit__(None, None, None)
        self.result = self.capture.result
        return self.result


class Recorder:
    """The plugin once turned on: starts, marks and stops the recordings."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.directory = Path(config.getoption("multisniff_dir"))
        self.keep_always = config.getoption("multisniff_keep") == "always"
        self.per_test = bool(config.getoption("multisniff_per_test"))
        self.session: Recording | None = None
        self.current: Recording | None = None
        self.kept: list[Recording] = []
        self.problems: list[str] = []
        self._portal_context: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None

    # --- recordings ---------------------------------------------------------------------------

    def _start(self, name: str) -> Recording | None:
        import anyio.from_thread

        from multisniff import api
        from multisniff.errors import MultisniffError

        if self._portal is None:
            self._portal_context = anyio.from_thread.start_blocking_portal("asyncio")
            self._portal = self._portal_context.__enter__()
        portal = self._portal
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{_UNSAFE.sub('_', name)[:150]}.pcapng"
        option = self.config.getoption
        keywords: dict[str, Any] = {}
        if option("multisniff_namespace"):
            keywords["namespace"] = option("multisniff_namespace")
        try:
            capture = portal.call(lambda: api.capture(
                option("multisniff_selector"), output=path, profile=option("multisniff_profile"),
                **keywords))
            context = portal.wrap_async_context_manager(capture)
            context.__enter__()
        except MultisniffError as exc:
            if not self.per_test:
                raise pytest.UsageError(f"multisniff: {exc}") from None
            self.problems.append(f"{name}: not recorded: {exc}")
            return None
        recording = Recording(path=path, portal=portal, capture=capture, context=context)
        try:
            portal.call(capture.ready, READY_TIMEOUT)
        except api.NotReady as exc:
            self.problems.append(f"{name}: {exc}")
        return recording

    def _finish(self, recording: Recording, what: str) -> None:
        """Stop it; keep it if a test in it failed (or always), else remove it."""
        from multisniff.errors import MultisniffError

        try:
            recording.stop()
        except MultisniffError as exc:
            self.problems.append(f"{what}: the recording failed: {exc}")
        if recording.failed or self.keep_always:
            if recording.path.exists():
                self.kept.append(recording)
        else:
            recording.path.unlink(missing_ok=True)

    def _close_portal(self) -> None:
        if self._portal_context is not None:
            self._portal_context.__exit__(None, None, None)
            self._portal_context = self._portal = None

    # --- hooks --------------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if not self.per_test:
            self.session = self.current = self._start(
                time.strftime("session-%Y%m%d-%H%M%S"))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        if self.per_test:
            self.current = self._start(item.nodeid)
        try:
            yield
        finally:
            if self.per_test and self.current is not None:
                recording, self.current = self.current, None
                self._finish(recording, item.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self._mark(f"{item.nodeid} setup")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self._mark(f"{item.nodeid} call")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self._mark(f"{item.nodeid} teardown")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else \
            report.outcome
        self._mark(f"{report.nodeid} {report.when}: {outcome}")
        if report.failed and self.current is not None and \
                report.nodeid not in self.current.failed:
            self.current.failed.append(report.nodeid)

    def _mark(self, text: str) -> None:
        if self.current is not None:
            self.current.mark(text)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        try:
            if self.session is not None:
                recording, self.session = self.session, None
                self.current = None
                self._finish(recording, "the session")
        finally:
            self._close_portal()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.kept and not self.problems:
            return
        terminalreporter.section("multisniff recordings")
        for problem in self.problems:
            terminalreporter.line(f"problem: {problem}")
        for recording in self.kept:
            failed = f" (failed: {', '.join(recording.failed)})" if recording.failed else ""
            terminalreporter.line(f"kept {recording.path}{failed}")


class NotRecording:
    """What the `multisniff` fixture gives when the plugin is off: marks go nowhere, so that
    tests that make them run the same with and without a recording."""

    path = None
    capture = None

    def mark(self, text: str) -> None:
        pass


@pytest.fixture
def multisniff(request: pytest.FixtureRequest) -> Recording | NotRecording:
    """The recording running for this test: `.mark(text)`, `.path`, `.capture` (the running
    `multisniff.Capture`); without --multisniff-selector, a NotRecording."""
    recorder = request.config.pluginmanager.get_plugin("multisniff-recorder")
    if isinstance(recorder, Recorder) and recorder.current is not None:
        return recorder.current
    return NotRecording()
