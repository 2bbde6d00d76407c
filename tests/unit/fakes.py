"""A fake `multisniff.kube.model.Cluster` for unit tests of everything above `kube/`.

Pods, nodes and permissions are plain data given to the constructor; `exec` runs the command as
a local subprocess (optionally rewritten by `rewrite`, e.g. to stand in for a tool the host
lacks), with a real stdin pipe whose EOF the process sees on `close_stdin`, stdout as the byte
stream and stderr to `on_stderr`. Every call is recorded so tests can assert what was asked of
the cluster: `execs` (with the bytes written to stdin), `ephemeral_specs`, `created`, `deleted`.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import Process

from multisniff.errors import ApiRequest, ContainerNotStarted, Forbidden, PodSecurityRefused
from multisniff.kube.model import (
    JOB_NAME_LABEL,
    ContainerInfo,
    ExecResult,
    JobInfo,
    NodeInfo,
    PodEvent,
    PodInfo,
    PodList,
    PodRef,
    PodSelector,
)

Rewrite = Callable[[PodRef, str, Sequence[str]], Sequence[str]]


@dataclass
class ExecRecord:
    pod: PodRef
    container: str
    command: tuple[str, ...]
    stdin: bool
    written: bytearray = field(default_factory=bytearray)
    result: ExecResult | None = None
    linger: float | None = None


class FakeExecChannel:
    """An ExecChannel over a local process."""

    def __init__(self, process: Process, record: ExecRecord, *, can_close_stdin: bool) -> None:
        self._process = process
        self._record = record
        self._can_close_stdin = can_close_stdin
        self._stdout_done = False

    async def read(self) -> bytes:
        if self._stdout_done or self._process.stdout is None:
            return b""
        try:
            return await self._process.stdout.receive(65536)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._stdout_done = True
            return b""

    async def write(self, data: bytes) -> None:
        if self._process.stdin is None:
            raise RuntimeError("this exec was opened without stdin")
        self._record.written += data
        await self._process.stdin.send(data)

    async def close_stdin(self) -> bool:
        if not self._can_close_stdin:
            return False
        if self._process.stdin is not None:
            await self._process.stdin.aclose()
        return True

    async def wait(self) -> ExecResult:
        code = await self._process.wait()
        result = ExecResult(code) if code >= 0 else ExecResult(None, f"killed by signal {-code}")
        self._record.result = result
        return result


@dataclass
class FakeCluster:
    pods: dict[PodRef, PodInfo] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    allowed: set[tuple[str, str, str]] | None = None
    """(verb, resource, subresource) that `can_i` grants; None grants everything."""
    may_list_nodes: bool = True
    unpullable: set[str] = field(default_factory=set)
    """Images the nodes cannot pull: an ephemeral container with one never starts."""
    rewrite: Rewrite | None = None
    can_close_stdin: bool = True
    """False behaves like a v4 exec server: stdin ends only with the whole stream."""
    events: list[PodEvent] = field(default_factory=list)
    execs: list[ExecRecord] = field(default_factory=list)
    ephemeral_specs: list[tuple[PodRef, dict[str, Any]]] = field(default_factory=list)
    dry_runs: list[tuple[PodRef, dict[str, Any]]] = field(default_factory=list)
    """Every dry run of adding an ephemeral container, admitted or not."""
    access_reviews: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    """Every can_i asked: (verb, resource, namespace, subresource)."""
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[PodRef] = field(default_factory=list)
    jobs: dict[PodRef, JobInfo] = field(default_factory=dict)
    deleted_jobs: list[PodRef] = field(default_factory=list)
    resource_version: int = 1
    default_namespace: str = "default"
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    """Labels of namespaces by name; a namespace not listed reads as unreadable (None)."""

    def add_pod(self, pod: PodInfo) -> PodInfo:
        self.pods[pod.ref] = pod
        return pod

    async def list_pods(self, selector: PodSelector) -> PodList:
        pods = tuple(p for p in self.pods.values() if _selected(p, selector))
        return PodList(pods, str(self.resource_version))

    async def watch_pods(self, selector: PodSelector,
                         resource_version: str) -> AsyncIterator[PodEvent]:
        for event in self.events:
            if _selected(event.pod, selector):
                yield event

    async def label_summary(self, namespace: str | None) -> list[str]:
        counts: dict[str, int] = {}
        for pod in self.pods.values():
            if namespace is None or pod.ref.namespace == namespace:
                for key, value in pod.labels.items():
                    counts[f"{key}={value}"] = counts.get(f"{key}={value}", 0) + 1
        return sorted(counts, key=lambda label: (-counts[label], label))

    async def namespace_exists(self, name: str) -> bool:
        return any(ref.namespace == name for ref in self.pods)

    async def namespace_labels(self, name: str) -> Mapping[str, str] | None:
        return self.namespaces.get(name)

    async def node(self, name: str) -> NodeInfo:
        return self.nodes.get(name) or NodeInfo(name=name, architecture="amd64")

    async def list_nodes(self) -> tuple[NodeInfo, ...]:
        if not self.may_list_nodes:
            raise Forbidden(ApiRequest("list", "nodes"))
        return tuple(self.nodes.values())

    async def can_i(self, verb: str, resource: str, *, namespace: str | None,
                    subresource: str = "", group: str = "") -> bool:
        self.access_reviews.append((verb, resource, namespace, subresource))
        return self.allowed is None or (verb, resource, subresource) in self.allowed

    @asynccontextmanager
    async def exec(
        self,
        pod: PodRef,
        container: str,
        command: Sequence[str],
        *,
        stdin: bool = False,
        on_stderr: Callable[[bytes], None] | None = None,
        linger: float | None = None,
    ) -> AsyncIterator[FakeExecChannel]:
        record = ExecRecord(pod, container, tuple(command), stdin, linger=linger)
        self.execs.append(record)
        argv = list(self.rewrite(pod, container, command) if self.rewrite else command)
        process = await anyio.open_process(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL
        )
        async with anyio.create_task_group() as tg:
            if process.stderr is not None:
                tg.start_soon(_pump_stderr, process.stderr, on_stderr)
            try:
                yield FakeExecChannel(process, record, can_close_stdin=self.can_close_stdin)
            finally:
                with anyio.CancelScope(shield=True):
                    # Leaving the context closes the stream: stdin and stdout go away.
                    if process.stdin is not None:
                        await process.stdin.aclose()
                    if process.stdout is not None:
                        await process.stdout.aclose()
                    with anyio.move_on_after(10):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                    if record.result is None:
                        record.result = ExecResult(process.returncode)

    async def add_ephemeral_container(self, pod: PodRef, spec: Mapping[str, Any], *,
                                      dry_run: bool = False) -> None:
        """Pod Security of the namespace (its enforce label) refuses added capabilities below
        privileged, as the admission plugin does; a dry run stops after that."""
        if dry_run:
            self.dry_runs.append((pod, dict(spec)))
        level = (self.namespaces.get(pod.namespace) or {}).get(
            "pod-security.kubernetes.io/enforce", "privileged")
        added = ((spec.get("securityContext") or {}).get("capabilities") or {}).get("add")
        if level != "privileged" and added:
            raise PodSecurityRefused(
                ApiRequest("patch", "pods/ephemeralcontainers", pod.namespace, pod.name),
                level=level, why=f'non-default capabilities (container "{spec["name"]}" must '
                                 f'not include {", ".join(map(repr, added))} in '
                                 f'securityContext.capabilities.add)')
        if dry_run:
            return
        self.ephemeral_specs.append((pod, dict(spec)))
        info = self.pods[pod]
        container = ContainerInfo(name=str(spec["name"]), image=str(spec["image"]),
                                  running=spec["image"] not in self.unpullable)
        self.pods[pod] = replace(info, ephemeral_containers=(*info.ephemeral_containers,
                                                             container))

    async def wait_container_running(self, pod: PodRef, container: str, *,
                                     timeout: float) -> PodInfo:
        info = self.pods[pod]
        names = [c.name for c in (*info.containers, *info.ephemeral_containers)]
        if container not in names:
            raise LookupError(f"{pod} has no container {container}")
        for ephemeral in info.ephemeral_containers:
            if ephemeral.name == container and ephemeral.image in self.unpullable:
                raise ContainerNotStarted(
                    f"Container {container} of pod {pod} cannot start (ErrImagePull).",
                    pod=str(pod), container=container, state="waiting", reason="ErrImagePull",
                    detail=f"failed to pull image {ephemeral.image}")
        return info

    async def create_pod(self, manifest: Mapping[str, Any]) -> PodRef:
        self.created.append(dict(manifest))
        meta = manifest["metadata"]
        return PodRef(meta.get("namespace", "default"), meta["name"])

    async def delete_pod(self, pod: PodRef, *, grace_seconds: int = 0) -> None:
        self.deleted.append(pod)
        self.pods.pop(pod, None)

    async def create_job(self, manifest: Mapping[str, Any]) -> None:
        """Records the Job and makes its pod at once, running every container of it."""
        self.created.append(dict(manifest))
        meta, template = manifest["metadata"], manifest["spec"]["template"]
        namespace = meta.get("namespace", "default")
        self.jobs[PodRef(namespace, meta["name"])] = JobInfo(namespace, meta["name"], "Active")
        containers = [ContainerInfo(c["name"], c["image"], running=True)
                      for c in template["spec"]["containers"]]
        self.add_pod(make_pod(f"{meta['name']}-x1y2z", namespace=namespace,
                              node=template["spec"].get("nodeName", "node-1"),
                              containers=containers,
                              labels={**template["metadata"].get("labels", {}),
                                      JOB_NAME_LABEL: meta["name"]}))

    async def delete_job(self, namespace: str, name: str) -> None:
        """Deletes the Job and its pods, as the garbage collector does."""
        self.deleted_jobs.append(PodRef(namespace, name))
        self.jobs.pop(PodRef(namespace, name), None)
        for ref, pod in list(self.pods.items()):
            if ref.namespace == namespace and pod.labels.get(JOB_NAME_LABEL) == name:
                del self.pods[ref]

    async def list_jobs(self, namespace: str | None, labels: str) -> tuple[JobInfo, ...]:
        """Every Job here is one of multisniff's agents: the labels are not looked at."""
        return tuple(job for job in self.jobs.values()
                     if namespace is None or job.namespace == namespace)


async def _pump_stderr(stream: Any, on_stderr: Callable[[bytes], None] | None) -> None:
    try:
        async for chunk in stream:
            if on_stderr is not None:
                on_stderr(chunk)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass


def _selected(pod: PodInfo, selector: PodSelector) -> bool:
    if selector.namespace is not None and pod.ref.namespace != selector.namespace:
        return False
    for term in filter(None, (t.strip() for t in selector.labels.split(","))):
        key, _, value = term.partition("=")
        if pod.labels.get(key) != value:
            return False
    return True


def make_pod(name: str = "app-0", *, namespace: str = "default", node: str = "node-1",
             containers: Sequence[ContainerInfo] | None = None,
             labels: Mapping[str, str] | None = None, ip: str = "10.0.0.2") -> PodInfo:
    """A running pod with one running container `app` unless told otherwise."""
    return PodInfo(
        ref=PodRef(namespace, name),
        uid=f"uid-{namespace}-{name}",
        phase="Running",
        node=node,
        ip=ip,
        ips=(ip,),
        labels=dict(labels or {}),
        containers=tuple(containers or (ContainerInfo("app", "app:1", running=True,
                                                      ready=True),)),
    )


__all__ = ["ExecRecord", "FakeCluster", "FakeExecChannel", "make_pod"]
