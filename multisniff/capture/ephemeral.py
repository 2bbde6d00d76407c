"""Ephemeral mode: run tcpdump in an ephemeral container added to the target's pod.

For targets the upload mode cannot use (no shell or tar, not root, a read-only /tmp), an
ephemeral container ``msnf-<random6>`` joins the pod's network namespace, which every container
of the pod shares and which outlives their restarts. It names no ``targetContainerName``: that
would put it into the target container's PID namespace, whose every process the kernel kills
when the target's first process dies, so a crash of the target would end the capture. In a PID
namespace of its own, the capture goes on across the target's restarts, on the same interface.
It gets CAP_NET_ADMIN and CAP_NET_RAW and nothing else (never privileged), and its own process
is only a sleeper (``sleep LIFETIME``) that ends by itself when the capture's lifetime is over.
tcpdump (the image's) runs by exec in it under the same static watchdog as in the upload mode,
sent at the start of that exec's stdin (``head -c SIZE``, checked by size): it stops tcpdump at
the stream's end or the lifetime, passes its output on in batches, and removes itself at the
end. Where no watchdog can be had for the node's architecture (no compiler here), a POSIX shell
watchdog does the stopping instead: tcpdump in the background (under ``timeout`` where the image has
it), the shell waits for its stdin to reach EOF (stream closed, client gone) and then sends
tcpdump SIGTERM, which makes it flush and print its statistics; its packets come one frame
each, which costs more CPU here.

An ephemeral container cannot be removed from a pod spec: it stays listed, terminated, until
the pod is deleted. Its process ends with the capture instead: the capture's shell leaves a
file at its very end (after its exit status is known), and the sleeper, which looks for it
every second, ends then. Only when the capture did not get that far (its stream broke) do we
end the sleeper by another exec: it wrote its PID into the ephemeral container's own /tmp, and
we send SIGTERM to exactly that PID once /proc says it is our sleeper. The sleeper is PID 1 of
its container, which the kernel spares every signal it has no handler for, so it traps SIGTERM.
In a pod with ``shareProcessNamespace``, PID 1 is the pod's pause process, whose end would end
the pod: never a PID but the sleeper's.
A container that never ran (its image could not be pulled) or has ended has no sleeper to end;
an image that cannot be pulled is said once per session, and further pods on that node are not
given a container that cannot start.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from multisniff.capture.bundlecache import WATCHDOG_NAME, PerArchitecture, watchdog_for
from multisniff.capture.execcapture import (
    ExecCapture,
    StderrLog,
    run_to_end,
    signal_by_pidfile,
)
from multisniff.capture.model import (
    Assessment,
    CaptureSpec,
    Leftovers,
    ModeOptions,
    Target,
)
from multisniff.capture.upload import capture_arguments, watchdog_arguments
from multisniff.errors import ContainerNotStarted, MultisniffError, PodSecurityRefused
from multisniff.kube.model import Cluster

log = logging.getLogger(__name__)

# A widely used troubleshooting image with tcpdump, a POSIX sh and timeout, multi-arch (amd64
# and arm64); pinned so that every capture runs the same tcpdump. Override with image=.
DEFAULT_IMAGE = "docker.io/nicolaka/netshoot:v0.13"
SLEEPER_PID_FILE = "/tmp/msnf-sleeper.pid"
DONE_FILE = "/tmp/msnf-done"
CAPTURE_PID_FILE = "/tmp/msnf-capture.pid"
RUN_DIRECTORY_PREFIX = "/tmp/msnf-run-"
REVIEW_SECONDS = 60.0
"""How long an access review's answer is used for further pods of the same namespace."""
START_MARGIN = 120.0
"""Seconds the sleeper lives beyond the capture's lifetime: time to start and to flush."""


class EphemeralError(MultisniffError):
    """The ephemeral container could not be added or did not start."""


def sleeper_command(lifetime: float) -> list[str]:
    seconds = int(lifetime + START_MARGIN)
    # "$$": Kubernetes expands $(VAR) in a container's command and turns $$ into $. The trap
    # runs once the current `sleep 1` is over.
    return ["sh", "-c", f"trap 'exit 143' TERM; echo $$$$ > {SLEEPER_PID_FILE}; i=0; "
                        f"while [ ! -e {DONE_FILE} ] && [ $$i -lt {seconds} ]; do "
                        f"sleep 1; i=$$((i+1)); done"]


def run_pidfile(directory: str) -> str:
    """Where the watchdog of a run directory writes its PID."""
    return f"{directory}/capture.pid"


def watched_script(spec: CaptureSpec, directory: str, size: int) -> str:
    """Receive the watchdog (``size`` bytes on stdin) into ``directory`` and run tcpdump
    under it; the watchdog removes ``directory`` at the end."""
    d = shlex.quote(directory)
    watchdog = shlex.join(watchdog_arguments(spec, remove=directory,
                                             pidfile=run_pidfile(directory)))
    tcpdump = shlex.join(["tcpdump", "-Z", "root", *capture_arguments(spec)])
    # The shell outlives head, which reads stdin (containerd#13934: see the upload mode).
    return (
        f'd={d}; w="$d/{WATCHDOG_NAME}"; '
        f'if mkdir -p "$d" && head -c {size} > "$w" && [ "$(wc -c < "$w")" -eq {size} ] && '
        f'chmod 700 "$w"; then "$w" {watchdog} -- {tcpdump}; s=$?; else '
        f'echo "multisniff: the watchdog did not arrive whole in $d" >&2; rm -rf "$d"; '
        f's=125; fi; touch {DONE_FILE}; exit $s'
    )


def capture_script(spec: CaptureSpec) -> str:
    """The shell watchdog around tcpdump, where no watchdog program can be had."""
    tcpdump = shlex.join(["tcpdump", "-Z", "root", *capture_arguments(spec)])
    lifetime = max(1, int(spec.lifetime))
    return (
        "exec 3<&0; "
        # A background job of a non-interactive shell ignores SIGINT: tcpdump is sent SIGTERM.
        f"if command -v timeout >/dev/null 2>&1; then timeout {lifetime} {tcpdump} & "
        f"else {tcpdump} & fi; "
        f"p=$!; echo $p > {CAPTURE_PID_FILE}; "
        '( read -r _ <&3; kill -TERM "$p" ) >/dev/null 2>&1 & w=$!; '
        'wait "$p"; s=$?; kill "$w" 2>/dev/null; '
        f"rm -f {CAPTURE_PID_FILE}; touch {DONE_FILE}; exit $s"
    )


class EphemeralMode:
    """Runs tcpdump in an ephemeral container next to the target container."""

    name = "ephemeral"

    def __init__(self, cluster: Cluster, *, image: str = DEFAULT_IMAGE,
                 start_timeout: float = 120.0, cleanup_timeout: float = 10.0,
                 watchdogs: Callable[[str], bytes] = watchdog_for,
                 leftovers: Leftovers | None = None) -> None:
        self._cluster = cluster
        self._leftovers = leftovers or Leftovers()
        self._image = image
        self._start_timeout = start_timeout
        self._cleanup_timeout = cleanup_timeout
        self._watchdogs = PerArchitecture(cluster, lambda arch: self._make_watchdog(watchdogs,
                                                                                   arch))
        self._reviews: dict[tuple[str, str, str], tuple[float, bool]] = {}
        self._admissions: dict[str, tuple[float, str | None]] = {}
        """Namespace -> (when, why its Pod Security refuses our container, or None)."""
        self._no_image: dict[str, str] = {}
        """Nodes where the image could not be pulled in this session -> the kubelet's reason."""

    @classmethod
    def from_options(cls, cluster: Cluster, options: ModeOptions) -> EphemeralMode:
        if options.ephemeral_image:
            return cls(cluster, image=options.ephemeral_image, leftovers=options.leftovers)
        return cls(cluster, leftovers=options.leftovers)

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        return set(namespaces)

    async def aclose(self) -> None:
        """Nothing lives for the session: each capture ends its own container's processes."""

    async def _can_i(self, verb: str, namespace: str, subresource: str) -> bool:
        """Access reviews of pods' subresources, asked once a minute per namespace: every pod
        of a namespace gets the same answer, and each review is a request."""
        key = (verb, namespace, subresource)
        now = time.monotonic()
        known = self._reviews.get(key)
        if known is None or now - known[0] > REVIEW_SECONDS:
            allowed = await self._cluster.can_i(verb, "pods", namespace=namespace,
                                                subresource=subresource)
            known = self._reviews[key] = (now, allowed)
        return known[1]

    async def _pod_security_refusal(self, target: Target) -> str | None:
        """Why the namespace's Pod Security refuses our ephemeral container (None: it admits
        it), from a server-side dry run of the patch that adds it, which adds nothing. Asked
        once a minute per namespace: the level is the namespace's, the container the same.
        Any other failure of the dry run raises, and is not remembered."""
        namespace = target.pod.ref.namespace
        now = time.monotonic()
        known = self._admissions.get(namespace)
        if known is not None and now - known[0] <= REVIEW_SECONDS:
            return known[1]
        spec = self.container_spec(f"msnf-{secrets.token_hex(3)}", target, CaptureSpec())
        refusal: str | None = None
        try:
            await self._cluster.add_ephemeral_container(target.pod.ref, spec, dry_run=True)
        except PodSecurityRefused as exc:
            refusal = (f"namespace {namespace} enforces Pod Security level {exc.level!r}, "
                       f"which refuses the ephemeral container's NET_ADMIN and NET_RAW "
                       f"({exc.why})")
        self._admissions[namespace] = (now, refusal)
        return refusal

    @staticmethod
    def _make_watchdog(make: Callable[[str], bytes], arch: str) -> bytes | None:
        """The watchdog program for nodes of ``arch``, or None (the shell does its work)."""
        try:
            return make(arch)
        except MultisniffError as exc:
            log.warning("Ephemeral captures on %s nodes stop tcpdump by a shell and send each "
                        "packet alone, which costs more CPU: %s", arch, exc)
            return None

    async def assess(self, target: Target) -> Assessment:
        pod, name = target.pod, target.container
        container = pod.container(name)
        if container is None:
            return Assessment(False, f"pod {target.label} has no container {name}")
        if pod.phase != "Running" or not container.running:
            return Assessment(False, f"container {name} is not running")
        node = pod.node or ""
        if node in self._no_image:
            return Assessment(False, f"the image {self._image} could not be pulled on node "
                                     f"{node} ({self._no_image[node]})")
        namespace = pod.ref.namespace
        if not await self._can_i("patch", namespace, "ephemeralcontainers"):
            return Assessment(False, f"you may not add ephemeral containers to pods in "
                                     f"namespace {namespace} (patch pods/ephemeralcontainers)",
                              refused=True)
        if not await self._can_i("create", namespace, "exec"):
            return Assessment(False, f"you may not exec into pods in namespace {namespace}",
                              refused=True)
        try:
            refusal = await self._pod_security_refusal(target)
        except MultisniffError as exc:
            return Assessment(False, f"a dry run of adding the ephemeral container failed "
                                     f"({str(exc).strip().rstrip('.')})")
        if refusal is not None:
            return Assessment(False, refusal, refused=True)
        return Assessment(
            True,
            f"may add an ephemeral container with {self._image} next to container {name} "
            f"(a dry run shows namespace {namespace}'s Pod Security admits its NET_ADMIN "
            f"and NET_RAW)",
            creates=(f"ephemeral container msnf-<random6> in pod {target.label} "
                     f"(stays listed, terminated, until the pod is deleted)",),
        )

    def container_spec(self, name: str, target: Target, spec: CaptureSpec) -> dict[str, Any]:
        return {
            "name": name,
            "image": self._image,
            "imagePullPolicy": "IfNotPresent",
            "command": sleeper_command(spec.lifetime),
            "stdin": False,
            "tty": False,
            "securityContext": {
                "privileged": False,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
            },
        }

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[ExecCapture]:
        ref = target.pod.ref
        name = f"msnf-{secrets.token_hex(3)}"
        container_spec: Mapping[str, Any] = self.container_spec(name, target, spec)
        await self._cluster.add_ephemeral_container(ref, container_spec)
        capture: ExecCapture | None = None
        sleeper_runs = True
        try:
            program = await self._watchdogs.for_pod(target.pod)
            try:
                await self._cluster.wait_container_running(ref, name,
                                                           timeout=self._start_timeout)
            except ContainerNotStarted as exc:
                sleeper_runs = not (exc.image_unavailable or exc.state == "terminated")
                if exc.image_unavailable:
                    raise self._image_error(target, exc) from exc
                raise
            stderr = StderrLog()
            if program is None:
                script = capture_script(spec)
                stop = signal_by_pidfile(CAPTURE_PID_FILE, "TERM")
            else:
                directory = f"{RUN_DIRECTORY_PREFIX}{secrets.token_hex(4)}"
                script = watched_script(spec, directory, len(program))
                stop = signal_by_pidfile(run_pidfile(directory), "INT")
            async with self._cluster.exec(ref, name, ["sh", "-c", script], stdin=True,
                                          on_stderr=stderr,
                                          linger=spec.read_linger) as channel:
                if program is not None:
                    await channel.write(program)
                capture = ExecCapture(self._cluster, ref, name, channel, stderr,
                                      stop_command=stop, bound_to_container=False,
                                      spec=spec)
                yield capture
        finally:
            # An exit status means the shell got to its end and left the file the sleeper
            # waits for: it ends within a second by itself.
            if sleeper_runs and (capture is None or capture.exit_code is None):
                await self._end_sleeper(target, name)

    def _image_error(self, target: Target, exc: ContainerNotStarted) -> EphemeralError:
        """Said in full once per session, in the log; each pod's own error is short."""
        node = target.pod.node or ""
        if not self._no_image:
            log.error("The image %s of the ephemeral containers could not be pulled on node %s "
                      "(%s); pass --ephemeral-image with an image that has tcpdump and that the "
                      "nodes can pull.", self._image, node or "of the pod", exc.reason)
        if exc.detail:
            log.debug("Pulling %s on node %s: %s", self._image, node, exc.detail)
        self._no_image[node] = exc.reason
        return EphemeralError(f"its ephemeral container's image {self._image} could not be "
                              f"pulled ({exc.reason})")

    async def _end_sleeper(self, target: Target, name: str) -> None:
        ref = target.pod.ref
        script = (f'read -r p < {SLEEPER_PID_FILE} || exit 3; '
                  'case "$p" in ""|*[!0-9]*) exit 3;; esac; '
                  f'grep -q {DONE_FILE} "/proc/$p/cmdline" || exit 3; kill -TERM "$p"')
        try:
            with anyio.fail_after(self._cleanup_timeout, shield=True):
                code, _, message = await run_to_end(self._cluster, ref, name,
                                                    ["sh", "-c", script])
            if code != 0:
                raise EphemeralError(message or f"exit {code}")
        except Exception as exc:
            command = (f"kubectl exec -n {ref.namespace} {ref.name} -c {name} -- sh -c "
                       f"{shlex.quote(script)}")
            log.warning("Could not end ephemeral container %s of pod %s (%s); it ends by "
                        "itself at its lifetime, or now with: %s", name, ref, exc, command)
            self._leftovers.add(f"the running ephemeral container {name} of pod {ref} (it "
                                f"ends by itself at its lifetime)", command)
