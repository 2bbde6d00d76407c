"""What multisniff knows of a cluster, in its own words, and the one interface it talks through.

`Cluster` is the contract between the Kubernetes client (`multisniff.kube.api`, the only module
that imports kubernetes_asyncio) and everybody above it: the capture modes and the engine depend
on this Protocol, and their unit tests use fakes of it. Nothing here imports the client, so these
types are cheap to import and free of library objects (no V1Pod above `kube/`).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""The label the Job controller puts on each pod of a Job: the Job's name."""


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A container of a pod: spec and status merged."""

    name: str
    image: str
    running: bool = False
    ready: bool = False
    restart_count: int = 0
    container_id: str | None = None
    """The runtime's ID (`containerd://...`) of the current instance; changes on restart."""
    run_as_user: int | None = None
    """Effective runAsUser (container's, else the pod's); None when the image decides."""
    run_as_non_root: bool = False
    privileged: bool = False
    added_capabilities: tuple[str, ...] = ()
    dropped_capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A pod as the engine sees it. `phase` is the API's (Pending, Running, Succeeded, ...)."""

    ref: PodRef
    uid: str
    phase: str
    node: str | None
    ip: str | None
    ips: tuple[str, ...] = ()
    host_network: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    containers: tuple[ContainerInfo, ...] = ()
    ephemeral_containers: tuple[ContainerInfo, ...] = ()
    deleting: bool = False
    """metadata.deletionTimestamp is set: the pod is going away."""

    def container(self, name: str) -> ContainerInfo | None:
        for container in self.containers:
            if container.name == name:
                return container
        return None


class PodEventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


@dataclass(frozen=True, slots=True)
class PodEvent:
    type: PodEventType
    pod: PodInfo


@dataclass(frozen=True, slots=True)
class PodSelector:
    """Which pods: label and field selectors (kubectl syntax) in one namespace or all (None)."""

    namespace: str | None
    labels: str = ""
    fields: str = ""


@dataclass(frozen=True, slots=True)
class PodList:
    pods: tuple[PodInfo, ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    architecture: str
    """GOARCH spelling, as the node reports it: amd64, arm64, ..."""
    os: str = "linux"
    internal_ip: str | None = None
    addresses: tuple[str, ...] = ()
    """The addresses the node's own traffic (the kubelet's probes) comes from: those it reports
    (InternalIP, then ExternalIP) and the first address of each of its pod CIDRs (the node's
    side of a bridge CNI's pod network)."""
    ready: bool = True
    """Its Ready condition is True: its kubelet runs pods."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A batch/v1 Job, as far as multisniff asks."""

    namespace: str
    name: str
    state: str
    """"Complete", "Failed", or "Active" (not finished yet)."""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How an exec ended, from its status channel.

    `exit_code` is 0 on Success, the code for NonZeroExitCode, and None when the server gave no
    status (stream cut, v4 server that closed early) or a failure that is not an exit code, which
    `message` then carries as the server's text.
    """

    exit_code: int | None
    message: str = ""


class ExecChannel(Protocol):
    """One running exec: its stdout as a byte stream, its stdin, its end.

    Not calling `read()` is backpressure: the client stops reading the socket once its small
    buffer is full, and the remote process blocks on write.
    """

    async def read(self) -> bytes:
        """The next chunk of stdout; b"" once stdout has ended."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes to the process's stdin (only if opened with stdin=True)."""
        ...

    async def close_stdin(self) -> bool:
        """Half-close stdin so the process sees EOF. False when the server's protocol (v4)
        cannot, in which case only closing the whole stream ends it."""
        ...

    async def wait(self) -> ExecResult:
        """Wait for the status channel (after stdout ended) and return how the process ended."""
        ...


class Cluster(Protocol):
    """Everything multisniff asks of Kubernetes. A failed request raises the
    `multisniff.errors.ApiError` class of its answer (`Forbidden`, `NotFound`, `Unreachable`,
    ...), whose message names the verb, resource and namespace refused and the way out;
    nobody above `kube/` sees ApiException or aiohttp."""

    default_namespace: str
    """The namespace of the kubeconfig's (or --context's) context, else "default": where a
    command without -n or -A looks, as kubectl does."""

    async def list_pods(self, selector: PodSelector) -> PodList: ...

    def watch_pods(self, selector: PodSelector, resource_version: str) -> AsyncIterator[PodEvent]:
        """Events after `resource_version`; on 410 Gone it re-lists and goes on, yielding the
        differences as events, so a caller never sees the expiry."""
        ...

    async def label_summary(self, namespace: str | None) -> list[str]:
        """`key=value` labels that pods there do carry, most common first (for the
        "no pod matches" message)."""
        ...

    async def namespace_exists(self, name: str) -> bool: ...

    async def namespace_labels(self, name: str) -> Mapping[str, str] | None:
        """The namespace's labels (its Pod Security levels among them); None when we may not
        read it or it does not exist."""
        ...

    async def node(self, name: str) -> NodeInfo: ...

    async def list_nodes(self) -> tuple[NodeInfo, ...]:
        """Every node. Nodes are cluster-scoped: many users may not list them (`Forbidden`)."""
        ...

    async def can_i(self, verb: str, resource: str, *, namespace: str | None,
                    subresource: str = "", group: str = "") -> bool:
        """SelfSubjectAccessReview: may the current user do this? (`group`: the resource's
        API group, "" for the core group, "batch" for jobs.)"""
        ...

    def exec(
        self,
        pod: PodRef,
        container: str,
        command: Sequence[str],
        *,
        stdin: bool = False,
        on_stderr: Callable[[bytes], None] | None = None,
        linger: float | None = None,
    ) -> AbstractAsyncContextManager[ExecChannel]:
        """Open an exec; leaving the context closes the stream (and with it stdin). `linger`:
        seconds a read of small frames waits for more to gather (None: the client's default);
        frames that reached the client are safe from the remote side, so a capture lets its
        small batches gather here rather than on the pod's side."""
        ...

    async def add_ephemeral_container(self, pod: PodRef, spec: Mapping[str, Any], *,
                                      dry_run: bool = False) -> None:
        """Add one container (a V1EphemeralContainer as a plain dict, camelCase keys) by a
        `patch` of the pod's ephemeralcontainers subresource, as kubectl debug does. With
        `dry_run` the server checks the patch, admission (Pod Security) included, and keeps
        nothing."""
        ...

    async def wait_container_running(self, pod: PodRef, container: str, *,
                                     timeout: float) -> PodInfo:
        """Wait until the (ephemeral or regular) container runs. Raise
        `multisniff.errors.ContainerNotStarted`, with the kubelet's state and reason, when it
        terminates, cannot start (an image that cannot be pulled) or does not start in time."""
        ...

    async def create_pod(self, manifest: Mapping[str, Any]) -> PodRef: ...

    async def delete_pod(self, pod: PodRef, *, grace_seconds: int = 0) -> None:
        """Delete; a pod that is already gone is not an error."""
        ...

    async def create_job(self, manifest: Mapping[str, Any]) -> None:
        """Create a batch/v1 Job; its controller makes its pod (labelled `JOB_NAME_LABEL`)."""
        ...

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete the Job and, in the background, its pods; a Job already gone is not an
        error."""
        ...

    async def list_jobs(self, namespace: str | None, labels: str) -> tuple[JobInfo, ...]:
        """Jobs with these labels in `namespace` (None: every namespace)."""
        ...
