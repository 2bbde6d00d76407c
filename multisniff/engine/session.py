"""The capture session: one task group that starts a capture per target, follows pod churn,
copies every capture into the output, and tears everything down on every way out.

Ways out: the end of every capture (without follow), --duration, --count or --max-size reached
(totals over all pods), `stop()` (Ctrl-C, SIGTERM), the reader of a live output going away, and
cancellation. Every one asks each remote tcpdump to stop (`RemoteCapture.stop()`), lets the
readers drain for `stop_grace` seconds, then cancels what is left; leaving each capture's
context removes what the mode created for it, the mode's `aclose()` what it created for the
session, and the output is flushed with its ISBs (all shielded and bounded).

A restarted target container ends a capture that runs in it (`RemoteCapture.bound_to_container`;
the run is "ended by a container restart", not failed, and a new run starts) and not one that
holds only the pod's network namespace (the run goes on, under the new container's key).

A capture whose exec stream breaks while nobody asked it to stop, after its tcpdump's header came
(the API server or the kubelet restarted: `read()` raises ClusterError, or the stream ends
without an exit status) is resumed:
the API is asked, with backoff for up to `reconnect_timeout` seconds, whether its pod and
container are still there and an exec reaches them again; then the run is "interrupted" (what
it got is kept, and counts as captured), the timeline gets a gap event, and a new run of the
same target takes over under an interface of the same name. Without an answer in time the run
fails with a sentence that says so. The pod watch reconnects the same way: it lists the pods
again, acts on what changed meanwhile, and watches on.

Exit codes of a session (multisniff.errors.ExitCode): 0 every target was captured, 1 some
failed while others were captured, 3 nothing was captured, 130 interrupted (Ctrl-C/SIGTERM).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from multisniff.capture.auto import assess
from multisniff.capture.model import (
    CaptureMode,
    CaptureReport,
    CaptureSpec,
    RemoteCapture,
    Target,
)
from multisniff.engine.events import Event, Timeline
from multisniff.engine.output import FileOutput, LiveOutput
from multisniff.engine.runs import CAPTURED, CaptureRun, Transcoder
from multisniff.engine.settings import CaptureSettings
from multisniff.engine.targets import Candidate, candidate, covered, plan
from multisniff.errors import (
    ApiRequest,
    ClusterError,
    ExitCode,
    Forbidden,
    MultisniffError,
    NamespaceNotFound,
    OutputError,
    RefusedError,
    UsageError,
)
from multisniff.kube.api import pod_changes
from multisniff.kube.model import (
    Cluster,
    PodEvent,
    PodEventType,
    PodInfo,
    PodList,
    PodRef,
    PodSelector,
)
from multisniff.pcap.blocks import NameRecord

log = logging.getLogger("multisniff")

CONTAINER_NEWS = 10.0
"""Seconds the API may take to show that a container ended (the kubelet notices and reports
it within a few seconds) when a capture bound to it ended without being asked to."""
RECONNECT_FIRST = 0.5
RECONNECT_MOST = 5.0
"""Seconds between reconnect attempts: the first wait, doubled up to this."""
API_SERVER_FAILURE = "Internal error occurred"
"""How the API server's InternalError status begins (e.g. it cannot dial the kubelet)."""
BROKEN_WITHOUT_STATUS = "its exec stream ended without an exit status"
BROKEN_UNDER_IT = "its exec stream was closed under it (its tcpdump was stopped unasked)"

_T = TypeVar("_T")


class NothingMatches(MultisniffError):
    exit_code = ExitCode.NOTHING


def selector_of(settings: CaptureSettings, default_namespace: str) -> PodSelector:
    """The pods the settings ask for; without -n or -A, those of `default_namespace` (the
    kubeconfig context's namespace, as kubectl does)."""
    namespace = None if settings.all_namespaces else (settings.namespace or default_namespace)
    return PodSelector(namespace=namespace, labels=settings.labels,
                       fields=settings.field_selector)


def where(selector: PodSelector) -> str:
    return "any namespace" if selector.namespace is None else f"namespace {selector.namespace}"


async def check_namespace(cluster: Cluster, selector: PodSelector) -> None:
    """Raise NamespaceNotFound when the namespace asked for does not exist."""
    if selector.namespace is not None and not await cluster.namespace_exists(selector.namespace):
        raise NamespaceNotFound(ApiRequest("list", "pods", selector.namespace))


async def check_exec(cluster: Cluster, pods: Sequence[PodInfo], mode: CaptureMode) -> None:
    """Raise RefusedError when the mode may exec in none of the namespaces it would exec into
    for these pods (theirs, or its agents'): every capture mode runs tcpdump through an exec,
    so nothing could start."""
    if not pods:
        return
    namespaces = sorted(mode.exec_namespaces(sorted({pod.ref.namespace for pod in pods})))
    for namespace in namespaces:
        if await cluster.can_i("create", "pods", namespace=namespace, subresource="exec"):
            return
    if namespaces:
        where = f"in namespace{'s' if len(namespaces) > 1 else ''} {', '.join(namespaces)}"
        raise Forbidden(ApiRequest("create", "pods/exec"), also=("get",), where=where)


async def no_match_message(cluster: Cluster, selector: PodSelector) -> str:
    labels = await cluster.label_summary(selector.namespace)
    have = (f"pods there have {', '.join(labels[:8])}" if labels
            else "there are no labelled pods there")
    wanted = selector.labels or "the selector"
    if selector.fields:
        wanted += f" (fields {selector.fields})"
    return f"No pod in {where(selector)} matches {wanted}; {have}."


@dataclass
class SessionResult:
    """What the summary shows: every capture, the pods not captured, how and why it ended."""

    runs: list[CaptureRun]
    skipped: list[Candidate]
    exit_code: ExitCode
    output: str
    started: float
    ended: float
    stop_reason: str
    output_bytes: int = 0
    error: str = ""
    """The sentence of the error that ended the session, if one did."""
    left_behind: list[str] = field(default_factory=list)
    """What could not be removed, each with the command that removes it."""
    events: list[Event] = field(default_factory=list)
    """The events of the timeline (see engine/events.py), in the order they happened."""

    @property
    def packets(self) -> int:
        return sum(run.packets for run in self.runs)


class Session:
    def __init__(self, cluster: Cluster, mode: CaptureMode, settings: CaptureSettings,
                 output: LiveOutput | FileOutput, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self.mode = mode
        self.settings = settings
        self.output = output
        self.selector = selector_of(settings, cluster.default_namespace)
        self.wall_clock = wall_clock
        self.runs: list[CaptureRun] = []
        self.skipped: list[Candidate] = []
        self.active: dict[tuple[str, ...], tuple[CaptureRun, RemoteCapture | None]] = {}
        self.packets = 0
        self.bytes = 0
        self.stop_reason = ""
        self.interrupted = False
        self.fatal: MultisniffError | None = None
        self.refusals: list[RefusedError] = []
        self._seen_ips: set[str] = set()
        self._skipped_uids: set[str] = set()
        self._tg: TaskGroup | None = None
        self._stop_requested = anyio.Event()
        self._idle = anyio.Event()
        self._watch_scope = anyio.CancelScope()
        self._started_at = 0.0
        self._stopping = False
        self._outages: dict[tuple[str, ...], tuple[float, float]] = {}
        """Per target key whose stream broke: since when, and the wait before the next try."""
        self._starting: set[CaptureRun] = set()
        """Runs of the pods found at the start that are not capturing (or over) yet."""
        self._all_started = anyio.Event()
        self.started = False
        self.ended = False
        self._progress = anyio.Event()
        """Set, and replaced, whenever the session starts or a capture stops starting."""
        """The captures of the pods found at the start have been started."""
        self.result: SessionResult | None = None
        """Once the session ended: what the summary shows, also when an error ended it."""
        self.timeline = Timeline(output, pod_events=settings.events)

    @property
    def pods(self) -> tuple[CaptureRun, ...]:
        """Every capture so far, with its live state and counters."""
        return tuple(self.runs)

    # --- control ------------------------------------------------------------------------------

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """End the session: stop every capture, drain, clean up. Safe to call many times."""
        if not self.stop_reason:
            self.stop_reason = reason
            log.info("Stopping: %s.", reason)
        self.interrupted = self.interrupted or interrupted
        self._stop_requested.set()

    def abort(self) -> None:
        """Cancel everything at once (a second Ctrl-C); cleanup still runs, shielded."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _started(self, run: CaptureRun) -> None:
        """`run` is capturing, or over: it starts no more."""
        self._starting.discard(run)
        if not self._starting:
            self._all_started.set()
        self._progress.set()
        self._progress = anyio.Event()

    async def ready(self) -> None:
        """Return once the session has started and no capture of it is still starting:
        every target found so far has its tcpdump listening, or its capture has ended."""
        while not self.ended and (not self.started or
                                  any(run.state == "starting" for run in self.runs)):
            await self._progress.wait()

    def _spec(self) -> CaptureSpec:
        settings = self.settings
        live = isinstance(self.output, LiveOutput)
        return CaptureSpec(interface=settings.interface, bpf_filter=settings.filter,
                           snaplen=settings.snaplen, lifetime=settings.remote_lifetime,
                           packet_count=settings.count,
                           flush_delay=settings.remote_flush_delay(live=live),
                           read_linger=settings.client_read_linger(live=live))

    # --- the session --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> SessionResult:
        """Capture until a way out is taken; the result, or the error that ended it (whose
        result is then in `self.result`). `task_status.started()` is called once the pods
        found at the start have their captures starting (or there are none)."""
        self._started_at = self.wall_clock()
        try:
            try:
                await self._run(await self._prepare(), task_status)
            finally:
                self.ended = True
                self._progress.set()
                await self._close_mode()
        except MultisniffError as exc:
            self.fatal = self.fatal or exc
        return self._result()

    async def _prepare(self) -> PodList:
        """Before anything starts: the pods, and the refusals that would stop every capture."""
        pod_list = await self.cluster.list_pods(self.selector)
        if not pod_list.pods:
            await check_namespace(self.cluster, self.selector)
            message = await no_match_message(self.cluster, self.selector)
            if not self.settings.follow:
                raise NothingMatches(message.rstrip(".") + "; check -l and -n (or follow with "
                                     "the default instead of --no-follow).")
            log.warning("%s Waiting for matching pods (Ctrl-C to end).", message)
        await check_exec(self.cluster, pod_list.pods, self.mode)
        return pod_list

    async def _run(self, pod_list: PodList, task_status: TaskStatus[None]) -> None:
        log.info("Remote tcpdumps end after at most %s.", self.settings.remote_lifetime_text())
        async with self.output.open():
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._names(pod_list.pods)
                    await self._names(await self._peers())
                    await self._node_names()
                    self.timeline.pods_at_start(pod_list.pods)
                    for item in plan(pod_list.pods, self.settings.container):
                        self._start(item)
                    self._starting = {run for run, _ in self.active.values()}
                    if not self._starting:
                        self._all_started.set()
                    if self.settings.follow:
                        tg.start_soon(self._watch, pod_list)
                    elif not self.active:
                        self.stop("no pod could be captured")
                    if self.settings.duration is not None:
                        tg.start_soon(self._duration_timer, self.settings.duration)
                    tg.start_soon(self._supervise)
                    self.started = True
                    self._progress.set()
                    self._progress = anyio.Event()
                    task_status.started()
            except OutputError as exc:
                self.fatal = exc

    async def _close_mode(self) -> None:
        """The mode's session ends: what it created for the session goes, shielded and bounded
        by stop_grace, also when the session was cancelled."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.stop_grace) \
                as scope:
            try:
                await self.mode.aclose()
            except Exception as exc:
                log.error("Ending the %s mode failed: %s", self.mode.name, exc)
        if scope.cancelled_caught:
            log.error("Ending the %s mode took over %.0f s; it was cut off, and may have left "
                      "things behind.", self.mode.name, self.settings.stop_grace)

    async def _duration_timer(self, seconds: float) -> None:
        """--duration counts from when the pods found at the start are all capturing (or
        failed), so that slow starts (uploads, image pulls) do not eat it; a start that takes
        longer than startup_timeout starts the clock anyway."""
        with anyio.move_on_after(self.settings.startup_timeout):
            await self._all_started.wait()
        if self.runs:
            log.info("Capturing for %gs from now.", seconds)
        await anyio.sleep(seconds)
        self.stop(f"--duration {seconds:g}s reached")

    async def _supervise(self) -> None:
        await self._stop_requested.wait()
        self._stopping = True
        self._watch_scope.cancel()
        for run, capture in list(self.active.values()):
            await self._stop_capture(run, capture)
        with anyio.move_on_after(self.settings.stop_grace) as scope:
            while self.active:
                self._idle = anyio.Event()
                await self._idle.wait()
        if scope.cancelled_caught:
            left = ", ".join(run.label for run, _ in self.active.values())
            log.error("Captures of %s did not end within %.0f s of being stopped; cutting them "
                      "off.", left, self.settings.stop_grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _stop_capture(self, run: CaptureRun, capture: RemoteCapture | None) -> None:
        if run.state in ("starting", "capturing"):
            run.state = "stopping"
        if capture is not None:
            with anyio.move_on_after(self.settings.stop_grace):
                try:
                    await capture.stop()
                except MultisniffError as exc:  # its stream is closing already: it ends
                    log.debug("Stopping the capture of %s: %s", run.label, exc)

    # --- pods and targets ---------------------------------------------------------------------

    async def _names(self, pods: tuple[PodInfo, ...] | list[PodInfo]) -> None:
        records: list[NameRecord] = []
        for pod in pods:
            if pod.host_network:
                continue
            for ip in (*pod.ips, *([pod.ip] if pod.ip else [])):
                if ip in self._seen_ips:
                    continue
                try:
                    address = ipaddress.ip_address(ip).packed
                except ValueError:
                    continue
                self._seen_ips.add(ip)
                records.append(NameRecord(address=address, names=(str(pod.ref),)))
        await self.output.names(records)

    async def _peers(self) -> tuple[PodInfo, ...]:
        """Every pod we may list (all namespaces, else the selected one), so that the peers of
        the captured pods have names in the NRB too, not only the captured pods themselves."""
        for namespace in (None, self.selector.namespace):
            try:
                return (await self.cluster.list_pods(PodSelector(namespace=namespace))).pods
            except MultisniffError as exc:
                log.debug("Cannot list pods of %s for names: %s",
                          namespace or "every namespace", exc)
            if namespace is None and self.selector.namespace is None:
                break
        return ()

    async def _node_names(self) -> None:
        """node/NAME for the nodes' addresses: the kubelet's probes come from there."""
        try:
            nodes = await self.cluster.list_nodes()
        except MultisniffError as exc:
            log.debug("Cannot list nodes for names: %s", exc)
            return
        records: list[NameRecord] = []
        for node in nodes:
            for ip in node.addresses:
                if ip not in self._seen_ips:
                    self._seen_ips.add(ip)
                    records.append(NameRecord(address=ipaddress.ip_address(ip).packed,
                                              names=(f"node/{node.name}",)))
        await self.output.names(records)

    def _start(self, item: Candidate) -> None:
        if item.target is None:
            if item.pod.uid not in self._skipped_uids:
                self._skipped_uids.add(item.pod.uid)
                self.skipped.append(item)
                log.info("Not capturing %s: %s.", item.pod.ref, item.reason)
            return
        if self._stopping or item.key in self.active:
            return
        run = self._launch(item.key, item.target, shared_with=item.shared_with)
        if item.target.pod.host_network:
            log.info("%s uses the host network of node %s: capturing that network once%s.",
                     run.label, item.target.pod.node,
                     f" (it also carries {', '.join(item.shared_with)})"
                     if item.shared_with else "")

    def _launch(self, key: tuple[str, ...], target: Target, *, shared_with: tuple[str, ...],
                resumed: str = "") -> CaptureRun:
        run = CaptureRun(number=len(self.runs) + 1, target=target, mode=self.mode.name,
                         interface=self.settings.interface, bpf_filter=self.settings.filter,
                         snaplen=self.settings.snaplen, shared_with=shared_with,
                         started=self.wall_clock(), resumed=resumed)
        self.runs.append(run)
        self.active[key] = (run, None)
        assert self._tg is not None
        self._tg.start_soon(self._capture, key, run, name=f"capture {run.label}")
        return run

    def _covered(self, pod: PodInfo, run: CaptureRun) -> None:
        """A hostNetwork pod that joined a node network we capture already: say so once, in
        place of whatever was said of it before (it may have been Pending)."""
        run.shared_with = (*run.shared_with, str(pod.ref))
        self.skipped = [item for item in self.skipped if item.pod.uid != pod.uid]
        self._skipped_uids.discard(pod.uid)
        self._start(covered(pod, run.label))

    async def _watch(self, pod_list: PodList) -> None:
        """Follow the pods; when the watch breaks (the API server went away), list them again
        with backoff for up to reconnect_timeout, act on what changed meanwhile, watch on."""
        known: dict[PodRef, PodInfo] = {pod.ref: pod for pod in pod_list.pods}
        version = pod_list.resource_version
        with self._watch_scope:
            while True:
                try:
                    async for event in self.cluster.watch_pods(self.selector, version):
                        await self._seen(known, event)
                    return
                except RefusedError as exc:
                    log.error("Following pods stopped: %s Captures already running go on.",
                              exc)
                    return
                except MultisniffError as exc:
                    log.warning("Following pods broke: %s Listing them again for up to %g s "
                                "(reconnect_timeout).", exc, self.settings.reconnect_timeout)
                    relisted, last = await self._retrying(
                        lambda: self.cluster.list_pods(self.selector), "listing pods again")
                if relisted is None:
                    log.error("Following pods stopped: the pods could not be listed again "
                              "within reconnect_timeout %g s (%s). Captures already running "
                              "go on.", self.settings.reconnect_timeout, last or "stopping")
                    if not self.active:
                        self.stop("the pod watch could not reconnect")
                    return
                log.info("Following pods again (%d match).", len(relisted.pods))
                for event in pod_changes(known, relisted.pods):
                    await self._seen(known, event)
                version = relisted.resource_version

    async def _seen(self, known: dict[PodRef, PodInfo], event: PodEvent) -> None:
        if event.type is PodEventType.DELETED:
            known.pop(event.pod.ref, None)
        else:
            known[event.pod.ref] = event.pod
        await self._on_event(event.type, event.pod)

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]], what: str, *,
                        timeout: float | None = None, first_wait: float = 0.0
                        ) -> tuple[_T | None, str]:
        """`attempt()` until it returns, waiting longer after each failure, for up to
        `timeout` (reconnect_timeout) seconds and only while the session is not stopping: its
        value, or None and the last failure."""
        delay = RECONNECT_FIRST
        last = ""
        with anyio.move_on_after(self.settings.reconnect_timeout if timeout is None
                                 else timeout):
            if first_wait:
                with anyio.move_on_after(first_wait):
                    await self._stop_requested.wait()
            while not self._stopping:
                try:
                    return await attempt(), ""
                except MultisniffError as exc:
                    last = str(exc)
                    log.debug("%s failed: %s; again in %.1f s", what, exc, delay)
                with anyio.move_on_after(delay):
                    await self._stop_requested.wait()
                delay = min(delay * 2, RECONNECT_MOST)
        return None, last

    async def _on_event(self, kind: PodEventType, pod: PodInfo) -> None:
        self.timeline.pod_event(kind, pod)
        gone = kind is PodEventType.DELETED or pod.deleting or pod.phase in ("Succeeded",
                                                                              "Failed")
        item = candidate(pod, self.settings.container)
        goes_on = False
        for key, (run, capture) in list(self.active.items()):
            if run.target.pod.uid != pod.uid or pod.host_network:
                continue
            if not gone and capture is not None and not capture.bound_to_container:
                # It holds the pod's network namespace, which outlives the containers.
                goes_on = True
                if item.target is not None and item.key != key:
                    del self.active[key]
                    self.active[item.key] = (run, capture)
                    run.restarts += 1
                    log.info("%s: its container was restarted; its capture goes on.",
                             run.label)
                continue
            if gone or item.target is None or item.key != key:
                why = "went away" if gone else "was restarted or stopped running"
                if not gone and run.state != "stopping":
                    run.ended_by = "a container restart"
                log.info("%s %s; ending its capture, keeping what it sent.", run.label, why)
                await self._stop_capture(run, capture)
        if gone:
            return
        await self._names([pod])
        if goes_on:
            return
        if item.target is not None and pod.host_network:
            for run, _ in self.active.values():
                if run.target.pod.host_network and run.target.pod.node == pod.node:
                    if run.target.pod.uid != pod.uid and str(pod.ref) not in run.shared_with:
                        self._covered(pod, run)
                    return
        if item.target is not None and item.key not in self.active:
            log.info("Starting a capture of %s (new or restarted pod).", pod.ref)
        self._start(item)

    # --- one capture --------------------------------------------------------------------------

    async def _capture(self, key: tuple[str, ...], run: CaptureRun) -> None:
        cancelled = False
        bound = True
        broke = ""
        started = False
        resume = ""
        try:
            assessment = await assess(self.mode, run.target)
            run.reason = assessment.reason
            run.mode = assessment.mode
            if not assessment.usable:
                run.state = "refused"
                run.error = assessment.reason
                if assessment.refused:  # the cluster's no: said once if it is every pod's
                    self.refusals.append(RefusedError(
                        f"Cannot capture {run.label}: {assessment.reason.rstrip('.')}."))
                log.error("Cannot capture %s: %s", run.label, assessment.reason)
                return
            async with self.mode.open(run.target, self._spec()) as capture:
                bound = capture.bound_to_container
                self.active[key] = (run, capture)
                if run.state == "stopping" or self._stopping:
                    run.state = "stopping"
                    await capture.stop()
                    self._started(run)
                    await self._copy(run, capture)
                else:
                    # Not a task group of its own: one would wrap _copy's errors in a group.
                    announcing = anyio.CancelScope()
                    assert self._tg is not None
                    self._tg.start_soon(self._announce, run, capture, announcing)
                    try:
                        broke, started = await self._copy(run, capture)
                    finally:
                        announcing.cancel()
                if not broke:
                    with anyio.move_on_after(self.settings.stop_grace):
                        run.report = await capture.wait()
            if not broke and bound and not run.ended_by and run.state != "stopping" and \
                    not self._stopping and killed(run.report) and \
                    await self._container_ended(run):
                run.ended_by = "a container restart"
            if not broke and started and not run.ended_by and run.state == "capturing" and \
                    not self._stopping and run.report is not None:
                if run.report.exit_code is None:
                    broke = BROKEN_WITHOUT_STATUS
                elif run.report.unasked:
                    broke = BROKEN_UNDER_IT
            if broke:
                now = self.wall_clock()
                since, wait = self._outages.get(key, (now, 0.0))
                if not run.resumed or run.packets or now - run.started > 2 * RECONNECT_MOST:
                    since, wait = now, 0.0  # not a resumed run that broke again at once
                self._outages[key] = (since, min(max(2 * wait, RECONNECT_FIRST),
                                                 RECONNECT_MOST))
                resume = await self._reconnect(run, broke, bound=bound, since=since,
                                               first_wait=wait)
            elif run.ended_by:
                # What is cut short (the last packet, tcpdump's statistics) died with it.
                run.state, run.error = "ended", ""
            else:
                if run.report is not None and run.report.exit_code not in (0, None) and \
                        not run.packets and not run.error:
                    run.error = (f"tcpdump exited with {run.report.exit_code}: "
                                 f"{run.report.message}".rstrip(": "))
                run.state = "failed" if run.error else "done"
        except OutputError as exc:
            run.state, run.error = "failed", str(exc)
            self.fatal = exc
            self.stop("the output cannot be written")
        except RefusedError as exc:
            run.state, run.error = "refused", str(exc)
            self.refusals.append(exc)
            log.error("Capture of %s was refused: %s", run.label, exc)
        except MultisniffError as exc:
            if run.ended_by:  # its start failed as its container ended
                run.state, run.error = "ended", ""
            else:
                run.state, run.error = "failed", str(exc)
                log.error("Capture of %s failed: %s", run.label, exc)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            run.state = "failed" if not run.packets else "done"
            run.error = run.error or "cut off while stopping"
            raise
        except Exception as exc:  # one pod's failure must not end the others' captures
            run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("Capture of %s failed: %s", run.label, run.error, exc_info=True)
        finally:
            self._started(run)
            run.ended = self.wall_clock()
            if not cancelled:
                self.timeline.capture_ended(run.label, run.state, run.packets, run.error)
                # When cancelled, the output's own shielded flush ends every run it has.
                with anyio.move_on_after(self.settings.stop_grace):
                    await self.output.end(run)
            for held, (active, _) in list(self.active.items()):
                if active is run:  # under its own key, or a restarted container's
                    del self.active[held]
            if resume and not self._stopping and key not in self.active:
                self._launch(key, run.target, shared_with=run.shared_with, resumed=resume)
            if not self._stopping:
                # News while the others go on; when the session stops, its summary says it.
                log.info("%s: %s, %d packets, %d dropped; the other captures go on.",
                         run.label, run.outcome, run.packets, run.dropped)
            if not self.active:
                self._idle.set()
                if not self.settings.follow:
                    self.stop("every capture has ended")

    async def _announce(self, run: CaptureRun, capture: RemoteCapture,
                        scope: anyio.CancelScope) -> None:
        """A run captures once its tcpdump says so: before, packets sent to the pod are not
        seen, and --duration must not count that time."""
        with scope:
            with anyio.move_on_after(self.settings.startup_timeout):
                await capture.listening()
            if run.state == "starting":
                run.state = "capturing"
                log.info("Capturing %s (%s).", run.label, run.description)
                self.timeline.capture_started(run.label, run.description)
            self._started(run)

    async def _container_ended(self, run: CaptureRun) -> bool:
        """Whether the run's container has ended (restarted, stopped, or its pod is gone), as
        the API shows within CONTAINER_NEWS seconds; asked of the pod itself, so that it does
        not depend on --follow's watch or on which news comes first."""
        pod = run.target.pod
        before = pod.container(run.target.container)
        selector = PodSelector(pod.ref.namespace, fields=f"metadata.name={pod.ref.name}")
        with anyio.move_on_after(min(CONTAINER_NEWS, self.settings.stop_grace)):
            while True:
                try:
                    listed = (await self.cluster.list_pods(selector)).pods
                except MultisniffError as exc:
                    log.debug("Cannot look at %s after its capture ended: %s", pod.ref, exc)
                    return False
                now = next((p for p in listed if p.uid == pod.uid), None)
                if now is None or now.deleting or now.phase != "Running":
                    return True
                info = now.container(run.target.container)
                if before is None or info is None or not info.running or \
                        info.container_id != before.container_id or \
                        info.restart_count > before.restart_count:
                    return True
                await anyio.sleep(0.5)
        return False

    async def _reconnect(self, run: CaptureRun, broke: str, *, bound: bool, since: float,
                         first_wait: float) -> str:
        """The run's exec stream broke (`broke` says how) while nobody asked it to stop: wait,
        with backoff for up to reconnect_timeout from `since` (when the outage began: a run
        resumed that broke again at once goes on with its predecessor's outage, and waits
        `first_wait` first), until the API answers and an exec reaches the pod again. Sets the
        run's end; returns how a new run resumes it ("after a gap of ...") or "" when none
        should (the pod or container is gone, no answer in time, stopping)."""
        started = self.wall_clock()
        left = self.settings.reconnect_timeout - (started - since)
        pod = run.target.pod
        before = pod.container(run.target.container)
        selector = PodSelector(pod.ref.namespace, fields=f"metadata.name={pod.ref.name}")
        log.warning("%s: %s; reconnecting for up to %g s (reconnect_timeout).", run.label,
                    broke, self.settings.reconnect_timeout)

        async def attempt() -> str:
            if run.state == "stopping":
                return "stopped"
            listed = (await self.cluster.list_pods(selector)).pods
            now = next((p for p in listed if p.uid == pod.uid), None)
            if now is None or now.deleting or now.phase != "Running":
                return "pod"
            info = now.container(run.target.container)
            if bound and (before is None or info is None or not info.running or
                          info.container_id != before.container_id):
                return "container"
            # An exit status, a failed command's included, says the node's kubelet is reachable
            # again; a refused handshake raises, and the API server tells its own failure to
            # reach the kubelet as an InternalError status.
            async with self.cluster.exec(pod.ref, run.target.container, ["true"]) as channel:
                while await channel.read():
                    pass
                result = await channel.wait()
            if result.exit_code is None and result.message.startswith(API_SERVER_FAILURE):
                raise ClusterError(f"The exec into {pod.ref} failed: {result.message}")
            return "ok"

        verdict, last = (await self._retrying(attempt, f"reconnecting {run.label}",
                                              timeout=left, first_wait=first_wait)
                         if left > 0 else (None, "it broke again each time it was resumed"))
        waited = self.wall_clock() - started
        if verdict == "ok" and not self._stopping and run.state != "stopping":
            run.state, run.ended_by, run.error = "interrupted", f"a broken stream ({broke})", ""
            self.timeline.gap(run.label, f"{broke}; a new capture starts {waited:.1f} s later")
            log.info("%s: reachable again after %.1f s; starting a new capture.", run.label,
                     waited)
            return f"after a gap of {waited:.1f} s ({broke})"
        if verdict in ("pod", "container"):
            run.state, run.error = "ended", ""
            run.ended_by = "a container restart" if verdict == "container" else \
                "its pod going away"
        elif verdict is None and not self._stopping and run.state != "stopping":
            run.state = "failed"
            run.error = (f"{broke}, and it could not be resumed within reconnect_timeout "
                         f"{self.settings.reconnect_timeout:g} s ({last or 'no answer'}); "
                         "raise reconnect_timeout to wait longer for the cluster")
        else:  # stopped meanwhile: what it got is what was asked for
            run.state, run.ended_by, run.error = "interrupted", f"a broken stream ({broke})", ""
        return ""

    def _left(self) -> tuple[int | None, int | None]:
        settings = self.settings
        packets_left = None if settings.count is None else settings.count - self.packets
        bytes_left = None if settings.max_size is None else settings.max_size - self.bytes
        return packets_left, bytes_left

    async def _copy(self, run: CaptureRun, capture: RemoteCapture) -> tuple[str, bool]:
        """Copy the run's capture into the output until its stream ends. Returns how its
        stream broke when it broke while capturing and nobody asked it to stop (else ""), and
        whether tcpdump's header came: only a tcpdump known to have run is resumed."""
        transcoder = Transcoder(run)
        broke = ""
        while True:
            try:
                data = await capture.read()
            except ClusterError as exc:
                if self._stopping or run.state != "capturing" or \
                        transcoder.reader.format is None:
                    raise
                broke = str(exc).rstrip(".")
                break
            if not data:
                break
            packets_left, bytes_left = self._left()
            out, packets, size = transcoder.feed(data, packets_left=packets_left,
                                                 bytes_left=bytes_left)
            run.packets += packets
            run.bytes += size
            self.packets += packets
            self.bytes += size
            if out:
                await self.output.write(run, out)
            if transcoder.error is not None:
                run.error = f"its capture stream is damaged: {transcoder.error}"
                await capture.stop()
                break
            packets_left, bytes_left = self._left()
            if packets_left is not None and packets_left <= 0:
                self.stop(f"--count {self.settings.count} packets reached")
            if bytes_left is not None and (bytes_left <= 0 or run.cut):
                self.stop(f"--max-size {self.settings.max_size} bytes reached")
        started = transcoder.reader.format is not None
        problem = transcoder.finish()
        missing = transcoder.missing_interface()
        if missing:
            await self.output.write(run, missing)
        if problem is not None and not run.error and not broke:
            if transcoder.reader.format is None and run.state == "stopping":
                run.error = "it was stopped before its tcpdump had started"
            else:
                run.error = f"its capture stream was cut off: {problem}"
        return broke, started

    # --- the end ------------------------------------------------------------------------------

    def _result(self) -> SessionResult:
        """The result, kept in `self.result`; raises the error that ended the session."""
        captured = [run for run in self.runs if run.state in CAPTURED]
        failed = [run for run in self.runs if run.state not in CAPTURED]
        error: MultisniffError | None = self.fatal
        if error is not None:
            code = error.exit_code
        elif self.interrupted:
            code = ExitCode.INTERRUPTED
        elif not captured and self.refusals and all(run.state == "refused" for run in self.runs):
            # The cluster refused every capture (Pod Security, RBAC): say why, once.
            error = self.refusals[0]
            code = error.exit_code
        elif not captured:
            code = ExitCode.NOTHING
        elif failed:
            code = ExitCode.PARTIAL
        else:
            code = ExitCode.OK
        captured_uids = {run.target.pod.uid for run in self.runs}
        self.result = SessionResult(
            runs=self.runs,
            skipped=[item for item in self.skipped if item.pod.uid not in captured_uids],
            exit_code=code, output=self.output.path,
            started=self._started_at, ended=self.wall_clock(), stop_reason=self.stop_reason,
            output_bytes=self.output.bytes_written, error=str(error) if error else "",
            events=self.timeline.events)
        if error is not None:
            raise error
        return self.result


async def dry_run(cluster: Cluster, mode: CaptureMode, settings: CaptureSettings) -> list[str]:
    """What a capture would do: matched pods, the mode each would get and why, what it creates."""
    selector = selector_of(settings, cluster.default_namespace)
    pods = (await cluster.list_pods(selector)).pods
    if not pods:
        return [await no_match_message(cluster, selector)]
    lines = [f"{len(pods)} pod{'s' if len(pods) != 1 else ''} in {where(selector)} match "
             f"{selector.labels or 'the selector'}:"]
    for item in plan(pods, settings.container):
        if item.target is None:
            lines.append(f"  {item.pod.ref}: not captured, {item.reason}")
            continue
        assessment = await assess(mode, item.target)
        verdict = "would capture" if assessment.usable else "cannot capture"
        lines.append(f"  {item.pod.ref}: {verdict} with mode {assessment.mode} via container "
                     f"{item.target.container} on node {item.pod.node}: {assessment.reason}")
        lines.extend(f"    would create: {thing}" for thing in assessment.creates)
        if item.shared_with:
            lines.append(f"    host network, also carries {', '.join(item.shared_with)}")
    lines.append(f"Remote tcpdumps would end after at most {settings.remote_lifetime_text()}.")
    return lines


def killed(report: CaptureReport | None) -> bool:
    """Whether a capture's end looks like a kill: no exit status (the stream was cut), or
    a signal's (128+N) rather than tcpdump's own."""
    return report is None or report.exit_code is None or report.exit_code >= 128


def check_settings(settings: CaptureSettings) -> None:
    """Raise UsageError where the settings contradict themselves or name no pods."""
    if settings.all_namespaces and settings.namespace:
        raise UsageError("Give either -n NAMESPACE or -A (all namespaces), not both.")
    if not settings.labels and not settings.field_selector:
        raise UsageError("Say which pods to capture with -l SELECTOR (e.g. -l app=web) or "
                         "--field-selector, or a --profile that sets labels.")
    if settings.keep_files is not None and not settings.rotating:
        raise UsageError("--keep-files needs --rotate-size or --rotate-every, which make the "
                         "files it keeps (as dumpcap's -b files: does).")
