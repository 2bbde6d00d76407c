"""The contract between the engine and the capture modes.

A mode (upload, ephemeral; see `registry`) knows how a tcpdump comes to run next to one target
and hands back its pcap byte stream; the engine knows nothing of bundles or debug containers.
A mode lives as long as the capture session: the engine makes it when the session starts and
calls its `aclose()` once when the session ends (shielded, bounded in time), so that whatever
the mode created for the session (per-node pods, say) is sure to be removed. Per target it
assesses (`assess`) and opens (`open`). The engine's unit tests use fakes of `CaptureMode` and
`RemoteCapture`.

Every remote tcpdump runs under a watchdog that ends it when its stdin reaches EOF (the exec
stream closed) and in any case after `CaptureSpec.lifetime` seconds, so nothing outlives a
capture, even one whose client was killed with -9.
"""

from __future__ import annotations

import getpass
import secrets
import socket
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from multisniff.kube.model import PodInfo


@dataclass(frozen=True, slots=True)
class Target:
    """One capture: a pod's network namespace, entered through one of its containers."""

    pod: PodInfo
    container: str

    @property
    def label(self) -> str:
        return f"{self.pod.ref.namespace}/{self.pod.ref.name}"


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What every remote tcpdump is asked to do."""

    interface: str = "any"
    bpf_filter: str = ""
    snaplen: int = 262144
    lifetime: float = 3600.0
    """Hard bound in seconds: the watchdog ends tcpdump then, whatever happens to the stream."""
    packet_count: int | None = None
    """tcpdump -c: stop after this many packets (per target)."""
    flush_delay: float = 0.05
    """Seconds the watchdog may hold tcpdump's output to pass it on in batches (0: at once)."""
    read_linger: float | None = None
    """Seconds the client lets a capture's small frames gather before it reads them (None: the
    client's default): see `Cluster.exec`."""


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "multisniff"
SESSION_LABEL = "multisniff/session"
HOST_ANNOTATION = "multisniff/client-host"
USER_ANNOTATION = "multisniff/client-user"
STARTED_ANNOTATION = "multisniff/started"


@dataclass(frozen=True, slots=True)
class SessionMark:
    """Who created what, for everything a session creates in the cluster: the labels find it
    again (`multisniff cleanup`), the annotations tell a person whose it is."""

    session_id: str
    host: str
    user: str
    started: str
    """UTC, ISO 8601."""

    @classmethod
    def new(cls) -> SessionMark:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return cls(session_id=secrets.token_hex(4), host=socket.gethostname(), user=user,
                   started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def labels(self) -> dict[str, str]:
        return {MANAGED_BY_LABEL: MANAGED_BY, SESSION_LABEL: self.session_id}

    def annotations(self) -> dict[str, str]:
        return {HOST_ANNOTATION: self.host, USER_ANNOTATION: self.user,
                STARTED_ANNOTATION: self.started}


@dataclass
class Leftovers:
    """What a session's modes could not remove, each with the command that removes it: the
    summary lists them."""

    entries: list[str] = field(default_factory=list)

    def add(self, what: str, command: str) -> None:
        self.entries.append(f"{what}; remove it with: {command}")


@dataclass(frozen=True, slots=True)
class ModeOptions:
    """What the user said about the modes themselves (flags, profile keys), and the session
    they serve."""

    ephemeral_image: str | None = None
    """Image with tcpdump for the ephemeral mode's debug container (None: its default)."""
    agent_image: str | None = None
    """Image of the privileged mode's per-node agent pods (None: the mode's default)."""
    agent_namespace: str | None = None
    """Namespace of the agent pods (None: the namespace of the node's first target)."""
    allow_privileged: bool = False
    """Whether auto may use the privileged mode, as its last resort."""
    by_auto: bool = False
    """The mode is made for auto, which asks modes that act only on consent to check it."""
    remote_lifetime: float = 3600.0
    """Seconds a remote tcpdump lives at most (CaptureSettings.remote_lifetime): what a
    session's pods may live, plus a margin."""
    session: SessionMark = field(default_factory=SessionMark.new)
    leftovers: Leftovers = field(default_factory=Leftovers)


@dataclass(frozen=True, slots=True)
class Assessment:
    """Whether a mode can capture a target, and why (shown by --dry-run and auto)."""

    usable: bool
    reason: str
    creates: Sequence[str] = ()
    """What the mode would create or change, in words: "ephemeral container msnf-1a2b in ..."."""
    mode: str = ""
    """The mode this assessment is for: the one auto chose, when it is auto's."""
    refused: bool = False
    """The cluster itself said no (RBAC, Pod Security), not the pod: a capture that every mode
    was refused for in this way ends the session as refused (exit code 4)."""


@dataclass(frozen=True, slots=True)
class CaptureReport:
    """How a remote capture ended: tcpdump's exit and its own closing statistics."""

    exit_code: int | None
    captured: int | None = None
    """tcpdump's "N packets captured"."""
    received: int | None = None
    """"N packets received by filter"."""
    dropped_by_kernel: int | None = None
    """"N packets dropped by kernel"."""
    message: str = ""
    """The last lines of stderr or the server's message, for the log when it failed."""
    unasked: bool = False
    """It ended although nobody asked it to and no bound of its own (-c, the lifetime) ended
    it: its stream was closed under it (the API server or the kubelet went away), and its
    watchdog, seeing stdin end, stopped tcpdump."""


class RemoteCapture(Protocol):
    """A tcpdump running next to a target, writing pcap to us."""

    bound_to_container: bool
    """True when tcpdump runs in the target container and ends with it (upload); False when
    it holds only the pod's network namespace, which outlives the container's restarts, and
    goes on across them (ephemeral)."""

    async def read(self) -> bytes:
        """Next chunk of the pcap stream; b"" at its end. Not reading pauses tcpdump."""
        ...

    async def listening(self) -> None:
        """Returns once tcpdump captures (it said "listening on") or its stream has ended.
        Only while someone reads: what tcpdump says arrives with the stream."""
        ...

    async def stop(self) -> None:
        """Ask tcpdump to end now (it flushes and prints its statistics); returns at once."""
        ...

    async def wait(self) -> CaptureReport:
        """After the stream ended: how tcpdump ended."""
        ...


class CaptureMode(Protocol):
    name: str

    async def assess(self, target: Target) -> Assessment:
        """Whether this mode can capture the target, and why. Never raises for a failure to
        prepare (no bundle, no access): that is an Assessment that says no, and why."""
        ...

    def open(self, target: Target, spec: CaptureSpec) -> AbstractAsyncContextManager[RemoteCapture]:
        """Start tcpdump next to the target. Leaving the context ends it and removes whatever
        this mode created there (shielded and bounded; failures are logged with what is left)."""
        ...

    async def aclose(self) -> None:
        """The session ends: remove whatever the mode created for it. Called once, shielded
        and bounded in time by the engine; failures are logged with what is left."""
        ...

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        """The namespaces this mode execs into to capture targets in `namespaces` (those
        themselves, or its agents'): where the session checks, before anything starts, that
        exec is allowed."""
        ...
