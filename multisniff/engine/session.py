"""The capture session: one task group that starts a capture per target, follows pod churn,
copies every capture into the output, and tears everything down on every way out.

Ways out: the end of every capture (without follow), --duration, --count or --max-size reached
(totals over all pods), `stop()` (Ctrl-C, SIGTERM), the reader of a live output going away, and
cancellation. Every one asks each remote tcpdump to stop (`RemoteCapture.stop()`), lets the
readers drain for `stop_grace` seconds, then cancels what is left; leaving each mode's context
removes what it created, and the output is flushed with its ISBs (shielded and bounded there).

A restarted target container ends a capture that runs in it (`RemoteCapture.bound_to_container`;
the run is "ended by a container restart", not failed, and a new run starts) and not one that
holds only the pod's network namespace (the run goes on, under the new container's key).

Exit codes of a session (multisniff.errors.ExitCode): 0 every target was captured, 1 some
failed while others were captured, 3 nothing was captured, 130 interrupted (Ctrl-C/SIGTERM).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from multisniff.capture.model import CaptureMode, CaptureReport, CaptureSpec, RemoteCapture
from multisniff.engine.output import FileOutput, LiveOutput
from multisniff.engine.runs import CaptureRun, Transcoder
from multisniff.engine.targets import Candidate, candidate, covered, plan
from multisniff.errors import ExitCode, MultisniffError, OutputError, RefusedError, UsageError
from multisniff.kube.model import Cluster, PodEventType, PodInfo, PodSelector
from multisniff.pcap.blocks import NameRecord
from multisniff.profiles import Profile

log = logging.getLogger("multisniff")

CONTAINER_NEWS = 10.0
"""Seconds the API may take to show that a container ended (the kubelet notices and reports
it within a few seconds) when a capture bound to it ended without being asked to."""


class NothingMatches(MultisniffError):
    exit_code = ExitCode.NOTHING


def chosen_mode(mode: CaptureMode, reason: str) -> str:
    """The mode a target gets: a mode that chooses per target (auto) starts its reason with
    the name of the one it chose ("upload: ...")."""
    name, sep, _ = reason.partition(": ")
    if sep and name in ("upload", "ephemeral") and mode.name not in ("upload", "ephemeral"):
        return name
    return mode.name


def selector_of(profile: Profile, default_namespace: str) -> PodSelector:
    """The pods the profile asks for; without -n or -A, those of `default_namespace` (the
    kubeconfig context's namespace, as kubectl does)."""
    namespace = None if profile.all_namespaces else (profile.namespace or default_namespace)
    return PodSelector(namespace=namespace, labels=profile.labels, fields=profile.field_selector)


def where(selector: PodSelector) -> str:
    return "any namespace" if selector.namespace is None else f"namespace {selector.namespace}"


async def check_namespace(cluster: Cluster, selector: PodSelector) -> None:
    """Raise RefusedError when the namespace asked for does not exist."""
    if selector.namespace is not None and not await cluster.namespace_exists(selector.namespace):
        raise RefusedError(f"Namespace {selector.namespace} does not exist; check -n "
                           "(kubectl get namespaces lists them).")


async def check_exec(cluster: Cluster, pods: Sequence[PodInfo]) -> None:
    """Raise RefusedError when no matched pod is in a namespace where we may exec: every
    capture mode runs tcpdump through an exec, so nothing could start."""
    namespaces = sorted({pod.ref.namespace for pod in pods})
    for namespace in namespaces:
        if await cluster.can_i("create", "pods", namespace=namespace, subresource="exec"):
            return
    if namespaces:
        where = f"namespace{'s' if len(namespaces) > 1 else ''} {', '.join(namespaces)}"
        raise RefusedError(f"You may not create pods/exec in {where} (RBAC), which every "
                           "capture mode needs: ask for `create` (and `get`) on `pods/exec` "
                           "there, or use a kubeconfig that has it.")


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
    runs: list[CaptureRun]
    skipped: list[Candidate]
    exit_code: ExitCode
    output: str
    started: float
    ended: float
    stop_reason: str
    output_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def packets(self) -> int:
        return sum(run.packets for run in self.runs)


class Session:
    def __init__(self, cluster: Cluster, mode: CaptureMode, profile: Profile,
                 output: LiveOutput | FileOutput, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self.mode = mode
        self.profile = profile
        self.output = output
        self.selector = selector_of(profile, cluster.default_namespace)
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
        self._starting: set[CaptureRun] = set()
        """Runs of the pods found at the start that are not capturing (or over) yet."""
        self._all_started = anyio.Event()

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

    def _lifetime(self) -> float:
        """The remote tcpdump's own bound, counted from its start: the duration timer starts
        at most `startup_timeout` later."""
        profile = self.profile
        if profile.duration is None:
            return profile.max_lifetime
        return profile.duration + profile.startup_timeout + profile.lifetime_margin

    def _started(self, run: CaptureRun) -> None:
        self._starting.discard(run)
        if not self._starting:
            self._all_started.set()

    def _spec(self) -> CaptureSpec:
        profile = self.profile
        return CaptureSpec(interface=profile.interface, bpf_filter=profile.filter,
                           snaplen=profile.snaplen, lifetime=self._lifetime(),
                           packet_count=profile.count, flush_delay=self._flush_delay())

    def _flush_delay(self) -> float:
        delay = self.profile.flush_delay
        if isinstance(self.output, LiveOutput):
            # Batches held longer than a fraction of the reorder window would make the live
            # output's packets late.
            delay = min(delay, self.profile.reorder_window / 4)
        return delay

    # --- the session --------------------------------------------------------------------------

    async def run(self) -> SessionResult:
        self._started_at = self.wall_clock()
        pod_list = await self.cluster.list_pods(self.selector)
        if not pod_list.pods:
            await check_namespace(self.cluster, self.selector)
            message = await no_match_message(self.cluster, self.selector)
            if not self.profile.follow:
                raise NothingMatches(message.rstrip(".") + "; check -l and -n (or follow with "
                                     "the default instead of --no-follow).")
            log.warning("%s Waiting for matching pods (Ctrl-C to end).", message)
        await check_exec(self.cluster, pod_list.pods)
        async with self.output.open():
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._names(pod_list.pods)
                    await self._names(await self._peers())
                    for item in plan(pod_list.pods, self.profile.container):
                        self._start(item)
                    self._starting = {run for run, _ in self.active.values()}
                    if not self._starting:
                        self._all_started.set()
                    if self.profile.follow:
                        tg.start_soon(self._watch, pod_list.resource_version)
                    elif not self.active:
                        self.stop("no pod could be captured")
                    if self.profile.duration is not None:
                        tg.start_soon(self._duration_timer, self.profile.duration)
                    tg.start_soon(self._supervise)
            except OutputError as exc:
                self.fatal = exc
        return self._result()

    async def _duration_timer(self, seconds: float) -> None:
        """--duration counts from when the pods found at the start are all capturing (or
        failed), so that slow starts (uploads, image pulls) do not eat it; a start that takes
        longer than startup_timeout starts the clock anyway."""
        with anyio.move_on_after(self.profile.startup_timeout):
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
        with anyio.move_on_after(self.profile.stop_grace) as scope:
            while self.active:
                self._idle = anyio.Event()
                await self._idle.wait()
        if scope.cancelled_caught:
            left = ", ".join(run.label for run, _ in self.active.values())
            log.error("Captures of %s did not end within %.0f s of being stopped; cutting them "
                      "off.", left, self.profile.stop_grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _stop_capture(self, run: CaptureRun, capture: RemoteCapture | None) -> None:
        if run.state in ("starting", "capturing"):
            run.state = "stopping"
        if capture is not None:
            with anyio.move_on_after(self.profile.stop_grace):
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

    def _start(self, item: Candidate) -> None:
        if item.target is None:
            if item.pod.uid not in self._skipped_uids:
                self._skipped_uids.add(item.pod.uid)
                self.skipped.append(item)
                log.info("Not capturing %s: %s.", item.pod.ref, item.reason)
            return
        if self._stopping or item.key in self.active:
            return
        run = CaptureRun(number=len(self.runs) + 1, target=item.target, mode=self.mode.name,
                         interface=self.profile.interface, bpf_filter=self.profile.filter,
                         snaplen=self.profile.snaplen, shared_with=item.shared_with,
                         started=self.wall_clock())
        self.runs.append(run)
        self.active[item.key] = (run, None)
        if item.target.pod.host_network:
            log.info("%s uses the host network of node %s: capturing that network once%s.",
                     run.label, item.target.pod.node,
                     f" (it also carries {', '.join(item.shared_with)})"
                     if item.shared_with else "")
        assert self._tg is not None
        self._tg.start_soon(self._capture, item.key, run, name=f"capture {run.label}")

    def _covered(self, pod: PodInfo, run: CaptureRun) -> None:
        """A hostNetwork pod that joined a node network we capture already: say so once, in
        place of whatever was said of it before (it may have been Pending)."""
        run.shared_with = (*run.shared_with, str(pod.ref))
        self.skipped = [item for item in self.skipped if item.pod.uid != pod.uid]
        self._skipped_uids.discard(pod.uid)
        self._start(covered(pod, run.label))

    async def _watch(self, resource_version: str) -> None:
        with self._watch_scope:
            try:
                async for event in self.cluster.watch_pods(self.selector, resource_version):
                    await self._on_event(event.type, event.pod)
            except MultisniffError as exc:
                log.error("Following pods stopped: %s Captures already running go on.", exc)

    async def _on_event(self, kind: PodEventType, pod: PodInfo) -> None:
        gone = kind is PodEventType.DELETED or pod.deleting or pod.phase in ("Succeeded",
                                                                              "Failed")
        item = candidate(pod, self.profile.container)
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
        try:
            assessment = await self.mode.assess(run.target)
            run.reason = assessment.reason
            run.mode = chosen_mode(self.mode, assessment.reason)
            if not assessment.usable:
                run.state = "refused"
                run.error = assessment.reason
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
                        await self._copy(run, capture)
                    finally:
                        announcing.cancel()
                with anyio.move_on_after(self.profile.stop_grace):
                    run.report = await capture.wait()
            if bound and not run.ended_by and run.state != "stopping" and \
                    not self._stopping and killed(run.report) and \
                    await self._container_ended(run):
                run.ended_by = "a container restart"
            if run.ended_by:
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
                # When cancelled, the output's own shielded flush ends every run it has.
                with anyio.move_on_after(self.profile.stop_grace):
                    await self.output.end(run)
            for held, (active, _) in list(self.active.items()):
                if active is run:  # under its own key, or a restarted container's
                    del self.active[held]
            if not self._stopping:
                # News while the others go on; when the session stops, its summary says it.
                log.info("%s: %s, %d packets, %d dropped; the other captures go on.",
                         run.label, run.outcome, run.packets, run.dropped)
            if not self.active:
                self._idle.set()
                if not self.profile.follow:
                    self.stop("every capture has ended")

    async def _announce(self, run: CaptureRun, capture: RemoteCapture,
                        scope: anyio.CancelScope) -> None:
        """A run captures once its tcpdump says so: before, packets sent to the pod are not
        seen, and --duration must not count that time."""
        with scope:
            with anyio.move_on_after(self.profile.startup_timeout):
                await capture.listening()
            if run.state == "starting":
                run.state = "capturing"
                log.info("Capturing %s (%s).", run.label, run.description)
            self._started(run)

    async def _container_ended(self, run: CaptureRun) -> bool:
        """Whether the run's container has ended (restarted, stopped, or its pod is gone), as
        the API shows within CONTAINER_NEWS seconds; asked of the pod itself, so that it does
        not depend on --follow's watch or on which news comes first."""
        pod = run.target.pod
        before = pod.container(run.target.container)
        selector = PodSelector(pod.ref.namespace, fields=f"metadata.name={pod.ref.name}")
        with anyio.move_on_after(min(CONTAINER_NEWS, self.profile.stop_grace)):
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

    def _left(self) -> tuple[int | None, int | None]:
        profile = self.profile
        packets_left = None if profile.count is None else profile.count - self.packets
        bytes_left = None if profile.max_size is None else profile.max_size - self.bytes
        return packets_left, bytes_left

    async def _copy(self, run: CaptureRun, capture: RemoteCapture) -> None:
        transcoder = Transcoder(run)
        while True:
            data = await capture.read()
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
                self.stop(f"--count {self.profile.count} packets reached")
            if bytes_left is not None and (bytes_left <= 0 or run.cut):
                self.stop(f"--max-size {self.profile.max_size} bytes reached")
        problem = transcoder.finish()
        missing = transcoder.missing_interface()
        if missing:
            await self.output.write(run, missing)
        if problem is not None and not run.error:
            if transcoder.reader.format is None and run.state == "stopping":
                run.error = "it was stopped before its tcpdump had started"
            else:
                run.error = f"its capture stream was cut off: {problem}"

    # --- the end ------------------------------------------------------------------------------

    def _result(self) -> SessionResult:
        if self.fatal is not None:
            raise self.fatal
        captured = [run for run in self.runs if run.state in ("done", "ended")]
        failed = [run for run in self.runs if run.state not in ("done", "ended")]
        if self.interrupted:
            code = ExitCode.INTERRUPTED
        elif not captured and self.refusals and all(run.state == "refused" for run in self.runs):
            # The cluster refused every capture (Pod Security, RBAC): say why, once.
            raise self.refusals[0]
        elif not captured:
            code = ExitCode.NOTHING
        elif failed:
            code = ExitCode.PARTIAL
        else:
            code = ExitCode.OK
        captured_uids = {run.target.pod.uid for run in self.runs}
        return SessionResult(
            runs=self.runs,
            skipped=[item for item in self.skipped if item.pod.uid not in captured_uids],
            exit_code=code, output=self.output.path,
            started=self._started_at, ended=self.wall_clock(), stop_reason=self.stop_reason,
            output_bytes=self.output.bytes_written)


async def dry_run(cluster: Cluster, mode: CaptureMode, profile: Profile) -> list[str]:
    """What a capture would do: matched pods, the mode each would get and why, what it creates."""
    selector = selector_of(profile, cluster.default_namespace)
    pods = (await cluster.list_pods(selector)).pods
    if not pods:
        return [await no_match_message(cluster, selector)]
    lines = [f"{len(pods)} pod{'s' if len(pods) != 1 else ''} in {where(selector)} match "
             f"{selector.labels or 'the selector'}:"]
    for item in plan(pods, profile.container):
        if item.target is None:
            lines.append(f"  {item.pod.ref}: not captured, {item.reason}")
            continue
        assessment = await mode.assess(item.target)
        verdict = "would capture" if assessment.usable else "cannot capture"
        name = chosen_mode(mode, assessment.reason) if assessment.usable else mode.name
        lines.append(f"  {item.pod.ref}: {verdict} with mode {name} via container "
                     f"{item.target.container} on node {item.pod.node}: {assessment.reason}")
        lines.extend(f"    would create: {thing}" for thing in assessment.creates)
        if item.shared_with:
            lines.append(f"    host network, also carries {', '.join(item.shared_with)}")
    if not math.isinf(profile.duration or math.inf):
        duration = profile.duration or 0
        lines.append(f"Remote tcpdumps would end after at most "
                     f"{duration + profile.lifetime_margin:g} s (--duration {duration:g} s "
                     f"plus lifetime_margin {profile.lifetime_margin:g} s).")
    else:
        lines.append(f"Remote tcpdumps would end after at most {profile.max_lifetime:g} s "
                     "(max_lifetime, as no --duration is given; a profile may change it).")
    return lines


def killed(report: CaptureReport | None) -> bool:
    """Whether a capture's end looks like a kill: no exit status (the stream was cut), or
    a signal's (128+N) rather than tcpdump's own."""
    return report is None or report.exit_code is None or report.exit_code >= 128


def check_profile(profile: Profile) -> None:
    if profile.all_namespaces and profile.namespace:
        raise UsageError("Give either -n NAMESPACE or -A (all namespaces), not both.")
    if not profile.labels and not profile.field_selector:
        raise UsageError("Say which pods to capture with -l SELECTOR (e.g. -l app=web) or "
                         "--field-selector, or a --profile that sets labels.")
