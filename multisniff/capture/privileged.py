"""Privileged mode: one agent pod per node enters each target's network namespace.

For pods neither other mode can capture (non-root, no CAP_NET_RAW, no shell, no tar, a Pod
Security level that forbids an ephemeral container's capabilities), tcpdump runs outside the
pod: in an agent pod on the target's node that is privileged and shares the host's PID
namespace. The agent's image needs only ``sh``, ``tar``, ``head`` and ``sleep`` (busybox has
them): tcpdump, nsenter and the watchdog come in the agent bundle (see `bundlecache`), sent
once per agent over exec stdin.

One agent serves every target on its node. It is created when the node gets its first target
(in the agent namespace, else the namespace of that target), pinned with ``nodeName``,
tolerating every taint, with small requests and limits and no service account token, and
deleted when the node's last capture ends and in any case when the session ends (`aclose`).
The agent pod is the one pod of a batch/v1 Job (``backoffLimit: 0``): its
``activeDeadlineSeconds`` is the remote bound plus `DEADLINE_MARGIN`, and its own process
sleeps no longer; once the Job has finished, the cluster's TTL-after-finished controller
deletes it and its pod `TTL_AFTER_FINISHED` seconds later. So a client killed with -9 leaves
nothing once the deadline and the TTL have passed (before that, `multisniff cleanup` removes
the Job and its pod).

Per target, a process of the target container is found by scanning the host's
``/proc/*/cgroup`` for the container ID from the pod's status (`lookup_script`,
`choose_pid`): it does not depend on one container runtime or its socket. Then one exec per
target runs ``nsenter -t PID -n -- tcpdump ...`` under the watchdog, which stops it when the
exec stream closes or at the lifetime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from multisniff.capture.bundle import MANIFEST_NAME, Bundle
from multisniff.capture.bundlecache import WATCHDOG_NAME, PerArchitecture, agent_bundle_for
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
    SessionMark,
    Target,
)
from multisniff.capture.upload import capture_arguments, watchdog_arguments
from multisniff.errors import MultisniffError, RefusedError
from multisniff.kube.model import JOB_NAME_LABEL, Cluster, PodRef, PodSelector

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "docker.io/library/busybox:1.36.1"
"""A small public image with sh, tar, head and sleep; everything else comes in the bundle."""
AGENT_CONTAINER = "agent"
AGENT_DIRECTORY = "/tmp/.multisniff-agent"
AGENT_NAME_LABEL = "app.kubernetes.io/name"
AGENT_NAME = "multisniff-agent"
NODE_ANNOTATION = "multisniff/node"
DEADLINE_MARGIN = 30.0
"""Seconds an agent pod may outlive the remote bound: time to start, stop and flush."""
TTL_AFTER_FINISHED = 5
"""Seconds a finished agent Job (and its pod) stays before the cluster deletes it."""
RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"},
             "limits": {"cpu": "1", "memory": "512Mi"}}
"""The agent's own share: a sleeping shell, plus the tcpdumps and watchdogs of its node's
targets, which run in its cgroup."""
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
RUNTIME_PREFIXES = ("containerd://", "cri-o://", "docker://")
_HEX_ID = re.compile(r"[0-9a-f]{12,128}")
_SCOPED = re.compile(r"^(?:cri-containerd|crio|docker)-([0-9a-f]{12,128})(?:\.scope)?$")


class PrivilegedError(MultisniffError):
    """An agent could not be made ready, or a target's process not found on its node."""


# --- finding a process in the target's network namespace --------------------------------------


def runtime_container_id(container_id: str | None) -> str | None:
    """The runtime's ID from a pod status's ``containerID`` (``containerd://ID``,
    ``cri-o://ID``, ``docker://ID``); None for another runtime or no ID."""
    for prefix in RUNTIME_PREFIXES:
        if container_id and container_id.startswith(prefix):
            rest = container_id[len(prefix):]
            return rest if _HEX_ID.fullmatch(rest) else None
    return None


def path_names_container(path: str, container_id: str) -> bool:
    """Whether a cgroup path is that of the container's processes: a component is the ID
    (cgroupfs driver: ``/kubepods/burstable/pod<UID>/<ID>``) or the runtime's unit for it
    (systemd driver: ``cri-containerd-<ID>.scope``, ``crio-<ID>.scope``, ``docker-<ID>.scope``;
    cri-o with cgroupfs: ``crio-<ID>``). cri-o's ``crio-conmon-<ID>.scope`` is its monitor,
    which lives in the host's network namespace: it does not count."""
    for part in path.split("/"):
        if part == container_id:
            return True
        scoped = _SCOPED.match(part)
        if scoped is not None and scoped.group(1) == container_id:
            return True
    return False


def lookup_script(container_id: str, *, proc: str = "/proc") -> str:
    """Shell (POSIX sh, builtins only) that prints ``PID LINE`` for the first line of each
    ``/proc/PID/cgroup`` naming the container ID. Processes come and go while it reads:
    a file that vanished is skipped."""
    if not _HEX_ID.fullmatch(container_id):
        raise ValueError(f"{container_id!r} is not a container ID")
    return (f'id={container_id}; for f in {shlex.quote(proc)}/[0-9]*/cgroup; do '
            'while IFS= read -r l; do case $l in *"$id"*) p=${f%/cgroup}; '
            'echo "${p##*/} $l"; break;; esac; done < "$f"; done 2>/dev/null; true')


def choose_pid(listing: str, container_id: str) -> int | None:
    """From `lookup_script`'s output, the lowest PID (the container's first process, the
    longest-lived) whose cgroup path names the container; None when there is none.
    Lines are ``PID hierarchy-ID:controllers:path``, cgroup v1 or v2 (``0::path``)."""
    pids = []
    for line in listing.splitlines():
        pid, _, entry = line.strip().partition(" ")
        parts = entry.split(":", 2)
        if pid.isdigit() and len(parts) == 3 and path_names_container(parts[2], container_id):
            pids.append(int(pid))
    return min(pids) if pids else None


# --- the agent pod -----------------------------------------------------------------------------


def agent_name(session_id: str, node: str) -> str:
    """One name per session and node; the node's name is hashed (it may be 253 long)."""
    return f"msnf-agent-{session_id}-{hashlib.sha256(node.encode()).hexdigest()[:8]}"


def agent_manifest(*, name: str, namespace: str, node: str, image: str, deadline: int,
                   session: SessionMark) -> dict[str, Any]:
    """The agent's Job: one pod, never retried, ended at `deadline` and deleted by the cluster
    `TTL_AFTER_FINISHED` seconds after it finished. Job and pod carry the same labels and
    annotations, so `multisniff cleanup` finds either."""
    metadata = {
        "labels": {**session.labels(), AGENT_NAME_LABEL: AGENT_NAME},
        "annotations": {**session.annotations(), NODE_ANNOTATION: node},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED,
            "template": {"metadata": metadata, "spec": _agent_pod_spec(node, image, deadline)},
        },
    }


def _agent_pod_spec(node: str, image: str, deadline: int) -> dict[str, Any]:
    return {
        "nodeName": node,
        "hostPID": True,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 0,
        "activeDeadlineSeconds": deadline,
        "tolerations": [{"operator": "Exists"}],
        "containers": [{
            "name": AGENT_CONTAINER,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", str(deadline)],
            "securityContext": {"privileged": True},
            "resources": RESOURCES,
        }],
    }


def unpack_script(directory: str, size: int) -> str:
    """Receive ``size`` bytes of bundle on stdin and unpack them into ``directory``. The shell
    outlives head, the reader of its stdin (containerd#13934: see the upload mode)."""
    d = shlex.quote(directory)
    return (f'd={d}; t="$d.part"; rm -rf "$t" && mkdir -p "$t" || exit 125; '
            f'if head -c {size} | tar -xzf - -C "$t" && [ -f "$t"/{MANIFEST_NAME} ]; then '
            f'rm -rf "$d"; mv "$t" "$d" || exit 125; else rm -rf "$t"; '
            f'echo "multisniff: the bundle did not unpack whole" >&2; exit 125; fi')


@dataclass(eq=False)
class Agent:
    """One agent pod and the captures that use it."""

    node: str
    job: str
    """The name of its Job, in the pod's namespace."""
    ref: PodRef
    bundle: Bundle
    ends_at: float
    """time.monotonic() when its deadline ends it."""
    users: int = 0
    broken: bool = False
    """An exec into it failed: the next target on its node gets a new agent."""
    deleted: bool = False

    @property
    def directory(self) -> str:
        return AGENT_DIRECTORY

    def command(self) -> str:
        return f"kubectl delete job -n {self.ref.namespace} {self.job}"


@dataclass
class _Review:
    refusal: str | None
    at: float = field(default_factory=time.monotonic)


class PrivilegedMode:
    """Captures through a privileged agent pod per node, entering each target's network."""

    name = "privileged"

    def __init__(self, cluster: Cluster, *, image: str = DEFAULT_IMAGE,
                 namespace: str | None = None, consented: bool = True,
                 session: SessionMark | None = None, leftovers: Leftovers | None = None,
                 remote_lifetime: float = 3600.0,
                 bundles: Callable[[str], Bundle] = agent_bundle_for,
                 start_timeout: float = 120.0, cleanup_timeout: float = 10.0) -> None:
        self._cluster = cluster
        self._image = image
        self._namespace = namespace
        self._consented = consented
        self.session = session or SessionMark.new()
        self.leftovers = leftovers or Leftovers()
        self._deadline = int(remote_lifetime + DEADLINE_MARGIN)
        self._bundles = PerArchitecture(cluster, bundles)
        self._start_timeout = start_timeout
        self._cleanup_timeout = cleanup_timeout
        self._agents: dict[str, Agent] = {}
        """The current agent of each node."""
        self._all: list[Agent] = []
        """Every agent made, until deleted."""
        self._locks: dict[str, anyio.Lock] = {}
        self._reviews: dict[str, _Review] = {}

    @classmethod
    def from_options(cls, cluster: Cluster, options: ModeOptions) -> PrivilegedMode:
        return cls(cluster, image=options.agent_image or DEFAULT_IMAGE,
                   namespace=options.agent_namespace,
                   consented=options.allow_privileged or not options.by_auto,
                   session=options.session, leftovers=options.leftovers,
                   remote_lifetime=options.remote_lifetime)

    @property
    def agents(self) -> tuple[PodRef, ...]:
        """The agent pods that exist now."""
        return tuple(agent.ref for agent in self._all if not agent.deleted)

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        """The agent namespace's, or each target's own; none where auto may not use it."""
        if not self._consented:
            return set()
        return {self._namespace} if self._namespace else set(namespaces)

    def _agent_namespace(self, target: Target) -> str:
        node = target.pod.node or ""
        current = self._agents.get(node)
        if current is not None and not current.broken:
            return current.ref.namespace
        return self._namespace or target.pod.ref.namespace

    # --- assessment ---------------------------------------------------------------------------

    async def _refusal(self, namespace: str) -> str | None:
        """Why agent pods cannot be made in `namespace` (RBAC, Pod Security), or None; asked
        once a minute per namespace."""
        known = self._reviews.get(namespace)
        if known is not None and time.monotonic() - known.at < 60:
            return known.refusal
        refusal: str | None = None
        way_out = ("give --agent-namespace with a namespace where you may, or use another "
                   "--mode")
        if not await self._cluster.can_i("create", "jobs", namespace=namespace, group="batch"):
            refusal = (f"you may not create jobs in namespace {namespace} (RBAC), which the "
                       f"agent pod's Job needs; {way_out}")
        elif not await self._cluster.can_i("create", "pods", namespace=namespace,
                                           subresource="exec"):
            refusal = (f"you may not create pods/exec in namespace {namespace} (RBAC), which "
                       f"the agent pod needs; {way_out}")
        else:
            labels = await self._cluster.namespace_labels(namespace)
            level = (labels or {}).get(ENFORCE_LABEL, "privileged")
            if labels is None and not await self._cluster.namespace_exists(namespace):
                refusal = (f"the agent namespace {namespace} does not exist; give "
                           f"--agent-namespace with one that does")
            elif level != "privileged":
                refusal = (f"namespace {namespace} enforces Pod Security level {level!r}, "
                           f"which refuses the privileged agent pod; give --agent-namespace "
                           f"with a namespace labelled {ENFORCE_LABEL}=privileged, or use "
                           f"another --mode")
        self._reviews[namespace] = _Review(refusal)
        return refusal

    async def assess(self, target: Target) -> Assessment:
        pod, name = target.pod, target.container
        container = pod.container(name)
        if container is None:
            return Assessment(False, f"pod {target.label} has no container {name}")
        if pod.phase != "Running" or not container.running:
            return Assessment(False, f"container {name} is not running")
        if runtime_container_id(container.container_id) is None:
            return Assessment(False, f"container {name} has no container ID of a runtime "
                                     f"this mode knows ({container.container_id or 'none'}; "
                                     f"it knows {', '.join(RUNTIME_PREFIXES)})")
        if not pod.node:
            return Assessment(False, f"pod {target.label} is on no node")
        try:
            node = await self._cluster.node(pod.node)
        except MultisniffError as exc:
            return Assessment(False, f"node {pod.node} cannot be read ({_clause(exc)})")
        if not node.ready:
            return Assessment(False, f"node {pod.node} is not Ready, so no agent pod can run "
                                     f"there")
        if node.os != "linux":
            return Assessment(False, f"node {pod.node} runs {node.os}, not linux")
        namespace = self._agent_namespace(target)
        refusal = await self._refusal(namespace)
        if refusal is not None:
            return Assessment(False, refusal, refused=True)
        try:
            await self._bundles.for_pod(pod)
        except MultisniffError as exc:
            return Assessment(False, _clause(exc))
        where = (f"privileged agent pod of job {agent_name('<session>', pod.node)} in "
                 f"namespace {namespace} on node {pod.node}")
        if not self._consented:
            return Assessment(False, f"only the privileged mode could, through a {where}; "
                                     f"auto uses it only where a profile sets "
                                     f"allow_privileged = true, or give --mode privileged")
        return Assessment(
            True, f"a privileged agent pod on node {pod.node} enters the pod's network "
                  f"namespace (container {name} needs no shell, tools or capabilities)",
            creates=(f"{where} (hostPID, shared by the node's targets; deleted when they end, "
                     f"and by the cluster {TTL_AFTER_FINISHED} s after activeDeadlineSeconds "
                     f"{self._deadline})",))

    # --- agents -------------------------------------------------------------------------------

    async def _acquire(self, target: Target) -> Agent:
        node = target.pod.node
        if not node:
            raise PrivilegedError(f"Pod {target.label} is on no node; it cannot be captured "
                                  f"by the privileged mode yet.")
        async with self._locks.setdefault(node, anyio.Lock()):
            agent = self._agents.get(node)
            if agent is None or agent.broken or agent.deleted or \
                    agent.ends_at - time.monotonic() < 30:
                agent = await self._create(target, node)
                self._agents[node] = agent
            agent.users += 1
            return agent

    async def _create(self, target: Target, node: str) -> Agent:
        bundle = await self._bundles.for_pod(target.pod)
        namespace = self._agent_namespace(target)
        name = agent_name(self.session.session_id, node)
        if any(a.job == name and a.ref.namespace == namespace for a in self._all):
            name = f"{name}-{secrets.token_hex(2)}"
        manifest = agent_manifest(name=name, namespace=namespace, node=node, image=self._image,
                                  deadline=self._deadline, session=self.session)
        try:
            await self._cluster.create_job(manifest)
        except RefusedError as exc:
            raise RefusedError(
                f"Creating the agent pod's Job {name} in namespace {namespace} was refused "
                f"({_clause(exc)}); give --agent-namespace with a namespace where privileged "
                f"pods are allowed, or use another --mode.") from exc
        agent = Agent(node=node, job=name, ref=PodRef(namespace, name), bundle=bundle,
                      ends_at=time.monotonic() + self._deadline)
        self._all.append(agent)
        try:
            agent.ref = await self._job_pod(agent)
            log.info("Created agent pod %s (job %s) on node %s (session %s; `multisniff "
                     "cleanup --session %s -A` removes what a killed run leaves).", agent.ref,
                     name, node, self.session.session_id, self.session.session_id)
            ref = agent.ref
            try:
                await self._cluster.wait_container_running(ref, AGENT_CONTAINER,
                                                           timeout=self._start_timeout)
            except MultisniffError as exc:
                raise PrivilegedError(
                    f"The agent pod {ref} cannot run on node {node} ({_clause(exc)}); check "
                    f"the node's capacity and the image {self._image}, or use another "
                    f"--mode.") from exc
            await self._send_bundle(agent)
        except BaseException:
            await self._delete(agent)
            raise
        return agent

    async def _job_pod(self, agent: Agent) -> PodRef:
        """The pod the Job controller made for the agent's Job (asked twice a second)."""
        selector = PodSelector(agent.ref.namespace, labels=f"{JOB_NAME_LABEL}={agent.job}")
        with anyio.move_on_after(self._start_timeout):
            while True:
                pods = (await self._cluster.list_pods(selector)).pods
                if pods:
                    return pods[0].ref
                await anyio.sleep(0.5)
        raise PrivilegedError(
            f"The agent Job {agent.job} in namespace {agent.ref.namespace} made no pod within "
            f"{self._start_timeout:g} s; kubectl describe job -n {agent.ref.namespace} "
            f"{agent.job} says why (Pod Security, a quota), or use another --mode.")

    async def _send_bundle(self, agent: Agent) -> None:
        data = agent.bundle.targz
        stderr = StderrLog()
        script = unpack_script(agent.directory, len(data))
        try:
            with anyio.fail_after(self._start_timeout):
                async with self._cluster.exec(agent.ref, AGENT_CONTAINER, ["sh", "-c", script],
                                              stdin=True, on_stderr=stderr) as channel:
                    for start in range(0, len(data), 64 * 1024):
                        await channel.write(data[start:start + 64 * 1024])
                    while await channel.read():
                        pass
                    result = await channel.wait()
        except TimeoutError:
            raise PrivilegedError(f"Sending the agent bundle to {agent.ref} took over "
                                  f"{self._start_timeout:g} s; retry, or use another "
                                  f"--mode.") from None
        if result.exit_code != 0:
            said = bytes(stderr.data).decode(errors="replace").strip() or result.message
            raise PrivilegedError(f"Unpacking the agent bundle in {agent.ref} failed ({said}); "
                                  f"its image {self._image} needs sh, tar and head.")

    async def _release(self, agent: Agent) -> None:
        node_lock = self._locks.setdefault(agent.node, anyio.Lock())
        with anyio.CancelScope(shield=True):
            async with node_lock:
                agent.users -= 1
                if agent.users <= 0:
                    await self._delete(agent)

    async def _delete(self, agent: Agent) -> None:
        """Delete the agent's Job and with it its pod, shielded and bounded; what fails is left
        for the summary."""
        if agent.deleted:
            return
        agent.deleted = True
        if self._agents.get(agent.node) is agent:
            del self._agents[agent.node]
        try:
            with anyio.fail_after(self._cleanup_timeout, shield=True):
                await self._cluster.delete_job(agent.ref.namespace, agent.job)
            log.debug("Deleted agent job %s/%s and its pod %s.", agent.ref.namespace,
                      agent.job, agent.ref)
        except Exception as exc:
            log.warning("Could not delete agent pod %s (%s); it ends by its deadline, or now "
                        "with: %s", agent.ref, _clause(exc), agent.command())
            self.leftovers.add(f"agent pod {agent.ref} on node {agent.node}", agent.command())

    async def aclose(self) -> None:
        """Every agent still there goes, in parallel, also when captures are still using it."""
        async with anyio.create_task_group() as tg:
            for agent in self._all:
                if not agent.deleted:
                    tg.start_soon(self._delete, agent)

    # --- one capture --------------------------------------------------------------------------

    async def _find_pid(self, agent: Agent, target: Target) -> int:
        container = target.pod.container(target.container)
        container_id = runtime_container_id(container.container_id if container else None)
        if container_id is None:
            raise PrivilegedError(f"Container {target.container} of pod {target.label} has no "
                                  f"container ID of a known runtime; it cannot be captured "
                                  f"by the privileged mode.")
        code, out, message = await run_to_end(self._cluster, agent.ref, AGENT_CONTAINER,
                                              ["sh", "-c", lookup_script(container_id)])
        if code != 0:
            raise PrivilegedError(f"Looking for the processes of {target.label} in the agent "
                                  f"pod {agent.ref} failed ({message or f'exit {code}'}).")
        pid = choose_pid(out.decode(errors="replace"), container_id)
        if pid is None:
            raise PrivilegedError(
                f"No process of container {target.container} of pod {target.label} (ID "
                f"{container_id[:12]}) is in /proc/*/cgroup of node {agent.node}; it may have "
                f"just ended, or its runtime keeps cgroups where this mode does not look.")
        return pid

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[ExecCapture]:
        agent = await self._acquire(target)
        try:
            try:
                pid = await self._find_pid(agent, target)
            except MultisniffError:
                agent.broken = agent.broken or not await self._alive(agent)
                raise
            # A target that starts late in an agent's life ends with the agent, not after it.
            left = agent.ends_at - time.monotonic() - DEADLINE_MARGIN / 2
            spec = dataclasses.replace(spec, lifetime=max(1.0, min(spec.lifetime, left)))
            directory = agent.directory
            pidfile = posixpath.join(directory, f"run-{secrets.token_hex(4)}.pid")
            tcpdump = agent.bundle.command("tcpdump", capture_arguments(spec), root=directory)
            argv = [posixpath.join(directory, WATCHDOG_NAME),
                    *watchdog_arguments(spec, pidfile=pidfile), "--",
                    *agent.bundle.command("nsenter", ["-t", str(pid), "-n", "--", *tcpdump],
                                          root=directory)]
            # The shell outlives the watchdog, which reads its stdin (containerd#13934).
            script = f"{shlex.join(argv)}; s=$?; exit $s"
            stderr = StderrLog()
            async with AsyncExitStack() as stack:
                try:
                    channel = await stack.enter_async_context(self._cluster.exec(
                        agent.ref, AGENT_CONTAINER, ["sh", "-c", script], stdin=True,
                        on_stderr=stderr, linger=spec.read_linger))
                except MultisniffError:
                    agent.broken = agent.broken or not await self._alive(agent)
                    raise
                # In the pod's network namespace, which outlives its containers: a restart of
                # the target container does not end this capture.
                yield ExecCapture(self._cluster, agent.ref, AGENT_CONTAINER, channel, stderr,
                                  stop_command=signal_by_pidfile(pidfile, "INT"),
                                  bound_to_container=False, spec=spec)
        finally:
            await self._release(agent)

    async def _alive(self, agent: Agent) -> bool:
        try:
            with anyio.fail_after(self._cleanup_timeout):
                code, _, _ = await run_to_end(self._cluster, agent.ref, AGENT_CONTAINER,
                                              ["true"])
        except (MultisniffError, TimeoutError):
            return False
        return code == 0


def _clause(exc: BaseException | str) -> str:
    text = str(exc).strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text

