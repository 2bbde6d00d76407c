"""The Kubernetes API as multisniff needs it: `connect()` gives a `multisniff.kube.model.Cluster`.

This is the one place that talks to kubernetes-asyncio and aiohttp. Requests go through the
generated client with `_preload_content=False`, and responses are read as plain JSON: pods become
`PodInfo` by pure functions (`pod_info`), and every failed request becomes the
`multisniff.errors.ApiError` class of its status (`api_error`; a client exception is chained):
callers catch `NotFound`, `Forbidden`, ... and never see ApiException or aiohttp.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from multisniff.errors import (
    ApiError,
    ApiRequest,
    ClusterError,
    ContainerNotStarted,
    Forbidden,
    Gone,
    MultisniffError,
    NamespaceNotFound,
    NotFound,
    PodSecurityRefused,
    Unreachable,
    UsageError,
    api_error_class,
)
from multisniff.kube.execstream import LINGER, ExecStream, open_exec
from multisniff.kube.k8sclient import ApiException, WsApiClient, k8s, k8s_config
from multisniff.kube.model import (
    ContainerInfo,
    JobInfo,
    NodeInfo,
    PodEvent,
    PodEventType,
    PodInfo,
    PodList,
    PodRef,
    PodSelector,
)

logger = logging.getLogger(__name__)

WATCH_SECONDS = 290
"""Server-side bound of one watch request; the watch is then resumed from the last version."""
EXEC_TOKEN_MARGIN = datetime.timedelta(seconds=10)
"""An exec credential plugin is asked for a new token when the one it gave has this little left."""
NOISE_LABELS = frozenset({"pod-template-hash", "controller-revision-hash",
                          "pod-template-generation"})
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
FAILED_WAITING_REASONS = frozenset({
    "ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
    "CreateContainerError", "CreateContainerConfigError", "RunContainerError",
    "CrashLoopBackOff", "PreCreateHookError", "PreStartHookError", "PostStartHookError",
})


# --- pure conversions -------------------------------------------------------------------------

def _container_info(spec: Mapping[str, Any], status: Mapping[str, Any] | None,
                    pod_security: Mapping[str, Any]) -> ContainerInfo:
    security = spec.get("securityContext") or {}
    capabilities = security.get("capabilities") or {}
    run_as_user = security.get("runAsUser", pod_security.get("runAsUser"))
    run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
    status = status or {}
    return ContainerInfo(
        name=str(spec.get("name", "")),
        image=str(spec.get("image", "")),
        running="running" in (status.get("state") or {}),
        ready=bool(status.get("ready", False)),
        restart_count=int(status.get("restartCount", 0)),
        container_id=status.get("containerID") or None,
        run_as_user=int(run_as_user) if run_as_user is not None else None,
        run_as_non_root=bool(run_as_non_root),
        privileged=bool(security.get("privileged", False)),
        added_capabilities=tuple(capabilities.get("add") or ()),
        dropped_capabilities=tuple(capabilities.get("drop") or ()),
    )


def _containers(specs: Iterable[Mapping[str, Any]], statuses: Iterable[Mapping[str, Any]],
                pod_security: Mapping[str, Any]) -> tuple[ContainerInfo, ...]:
    by_name = {s.get("name"): s for s in statuses}
    return tuple(_container_info(spec, by_name.get(spec.get("name")), pod_security)
                 for spec in specs)


def pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """A pod as the API returns it in JSON (camelCase) -> `PodInfo`."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    pod_security = spec.get("securityContext") or {}
    return PodInfo(
        ref=PodRef(str(meta.get("namespace", "")), str(meta.get("name", ""))),
        uid=str(meta.get("uid", "")),
        phase=str(status.get("phase") or "Unknown"),
        node=spec.get("nodeName") or None,
        ip=status.get("podIP") or None,
        ips=tuple(str(entry["ip"]) for entry in status.get("podIPs") or () if entry.get("ip")),
        host_network=bool(spec.get("hostNetwork", False)),
        labels=dict(meta.get("labels") or {}),
        containers=_containers(spec.get("containers") or (),
                               status.get("containerStatuses") or (), pod_security),
        ephemeral_containers=_containers(spec.get("ephemeralContainers") or (),
                                         status.get("ephemeralContainerStatuses") or (),
                                         pod_security),
        deleting=meta.get("deletionTimestamp") is not None,
    )


@dataclass(frozen=True, slots=True)
class ContainerState:
    """Where a container is in its life, with the kubelet's reason (from containerStatuses)."""

    state: str
    """running, waiting, terminated, or absent (no status yet)."""
    reason: str = ""
    message: str = ""
    exit_code: int | None = None


def container_state(pod: Mapping[str, Any], container: str) -> ContainerState:
    status = pod.get("status") or {}
    for entry in (*(status.get("containerStatuses") or ()),
                  *(status.get("ephemeralContainerStatuses") or ())):
        if entry.get("name") != container:
            continue
        state = entry.get("state") or {}
        for name in ("running", "terminated", "waiting"):
            if name in state:
                detail = state[name] or {}
                code = detail.get("exitCode")
                return ContainerState(name, str(detail.get("reason") or ""),
                                      str(detail.get("message") or ""),
                                      int(code) if code is not None else None)
    return ContainerState("absent")


def pod_changes(known: Mapping[PodRef, PodInfo],
                current: Iterable[PodInfo]) -> list[PodEvent]:
    """The events that turn `known` into `current` (after a watch expired and we re-listed)."""
    events: list[PodEvent] = []
    seen: set[PodRef] = set()
    for pod in current:
        seen.add(pod.ref)
        before = known.get(pod.ref)
        if before is None:
            events.append(PodEvent(PodEventType.ADDED, pod))
        elif before.uid != pod.uid:
            events.append(PodEvent(PodEventType.DELETED, before))
            events.append(PodEvent(PodEventType.ADDED, pod))
        elif before != pod:
            events.append(PodEvent(PodEventType.MODIFIED, pod))
    events.extend(PodEvent(PodEventType.DELETED, pod)
                  for ref, pod in known.items() if ref not in seen)
    return events


def top_labels(label_sets: Iterable[Mapping[str, str]]) -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    for labels in label_sets:
        counts.update(f"{k}={v}" for k, v in labels.items() if k not in NOISE_LABELS)
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


NODE_IP_TYPES = ("InternalIP", "ExternalIP")


def node_info(node: Mapping[str, Any]) -> NodeInfo:
    """A node as the API returns it in JSON -> `NodeInfo`."""
    meta = node.get("metadata") or {}
    status = node.get("status") or {}
    info = status.get("nodeInfo") or {}
    addresses = status.get("addresses") or ()
    internal = [str(a.get("address")) for a in addresses if a.get("type") == "InternalIP"]
    ready = [c.get("status") for c in status.get("conditions") or () if c.get("type") == "Ready"]
    ips = [str(a.get("address")) for t in NODE_IP_TYPES for a in addresses if a.get("type") == t]
    spec = node.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    ips.extend(_gateway(str(cidr)) for cidr in cidrs)
    return NodeInfo(name=str(meta.get("name", "")),
                    architecture=str(info.get("architecture", "")),
                    os=str(info.get("operatingSystem") or "linux"),
                    internal_ip=internal[0] if internal else None,
                    addresses=tuple(dict.fromkeys(ip for ip in ips if _is_ip(ip))),
                    ready=ready == ["True"])


def _gateway(cidr: str) -> str:
    """The first address of a pod CIDR, where bridge CNIs (bridge, flannel, kubenet) put the
    node's own side of the pod network; "" when there is none."""
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return ""
    return str(network.network_address + 1) if network.num_addresses > 2 else ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_POD_SECURITY = re.compile(r'violates PodSecurity "([^":]+)(?::[^"]*)?":\s*(.*)', re.DOTALL)


def api_error(status: int, body: Mapping[str, Any], request: ApiRequest) -> ApiError:
    """A failed request (HTTP status and metav1.Status body) -> the error of its status."""
    message = str(body.get("message") or body.get("reason") or "").strip()
    if status == 403:
        security = _POD_SECURITY.search(message)
        if security:
            return PodSecurityRefused(request, level=security.group(1), why=security.group(2),
                                      detail=message)
    if status == 404 and request.resource == "pods/ephemeralcontainers" and \
            not (body.get("details") or {}).get("name"):
        # A missing subresource (not a missing pod) has no name in its details.
        return NotFound(request, detail=message, message=(
            "This cluster does not serve pods/ephemeralcontainers (Kubernetes before 1.23, or "
            "ephemeral containers are turned off); use --mode upload."))
    return api_error_class(status)(request, status=status, detail=message)


def _status_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"message": raw.decode("utf-8", errors="replace")[:300]}
    return body if isinstance(body, dict) else {}


# --- loading the configuration ----------------------------------------------------------------

def kubeconfig_paths(kubeconfig: str | None, environ: Mapping[str, str]) -> list[Path]:
    """The files kubectl would read: --kubeconfig, else every path of KUBECONFIG, else
    ~/.kube/config; only those that exist (an explicit --kubeconfig must exist)."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise UsageError(f"The kubeconfig {kubeconfig} does not exist; pass an existing "
                             "file to --kubeconfig.")
        return [path]
    listed = environ.get("KUBECONFIG", "")
    candidates = ([Path(p).expanduser() for p in listed.split(os.pathsep) if p] if listed
                  else [Path.home() / ".kube" / "config"])
    return [path for path in candidates if path.is_file()]


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def context_namespace(context: Mapping[str, Any] | None) -> str:
    """The namespace of a kubeconfig context entry ({"name": ..., "context": {...}}), else
    "default", as kubectl picks it."""
    body = (context or {}).get("context") or {}
    return str(body.get("namespace") or "default")


async def _load_configuration(kubeconfig: str | None,
                              context: str | None) -> tuple[k8s.Configuration, str]:
    """The client configuration and the namespace that commands without -n use."""
    configuration = k8s.Configuration()
    paths = kubeconfig_paths(kubeconfig, os.environ)
    if not paths:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration)
            except k8s_config.ConfigException as exc:
                raise UsageError(f"Cannot use the in-cluster configuration: {exc}; pass "
                                 "--kubeconfig.") from exc
            try:
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            except OSError:
                namespace = ""
            return configuration, namespace or "default"
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise UsageError(f"No kubeconfig found at {where}; pass --kubeconfig or set KUBECONFIG.")
    try:
        loader = await k8s_config.load_kube_config(
            config_file=os.pathsep.join(str(p) for p in paths), context=context,
            client_configuration=configuration, persist_config=False)
    except k8s_config.ConfigException as exc:
        raise UsageError(f"Cannot use the kubeconfig {os.pathsep.join(map(str, paths))}"
                         f"{f' with context {context}' if context else ''}: {exc}; check "
                         "--context (kubectl config get-contexts lists them).") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"Cannot read the kubeconfig {os.pathsep.join(map(str, paths))}: "
                         f"{exc}; check the file or pass another with --kubeconfig.") from exc
    if hasattr(loader, "exec_plugin_expiry"):
        # An exec credential plugin gave a token that expires: ask it again before a request
        # once the token is about to. One at a time: the pods' execs start together, and one
        # plugin run serves them all. (The loader alone would rerun the plugin for every request
        # in the last five minutes of a token, and for every request when tokens are shorter.)
        lock = anyio.Lock()

        async def refresh(config: k8s.Configuration) -> None:
            async with lock:
                left = loader.exec_plugin_expiry - datetime.datetime.now(datetime.timezone.utc)
                if left > EXEC_TOKEN_MARGIN:
                    return
                await loader.load_from_exec_plugin()
                config.api_key["BearerToken"] = loader.token

        configuration.refresh_api_key_hook = refresh
    return configuration, context_namespace(loader.current_context)


# --- the cluster --------------------------------------------------------------------------------

class KubeCluster:
    """`multisniff.kube.model.Cluster` over kubernetes-asyncio. Made by `connect()`."""

    def __init__(self, configuration: k8s.Configuration, *,
                 default_namespace: str = "default") -> None:
        self._configuration = configuration
        self.default_namespace = default_namespace
        self.host = str(configuration.host)
        self._rest = k8s.ApiClient(configuration=configuration)
        # No heartbeat: a stream paused by backpressure answers no pings, and aiohttp would
        # close it ("No PONG received").
        self._ws = WsApiClient(configuration=configuration, heartbeat=None)
        self._core: Any = k8s.CoreV1Api(self._rest)
        self._authz: Any = k8s.AuthorizationV1Api(self._rest)
        self._batch: Any = k8s.BatchV1Api(self._rest)
        self._listed: dict[PodSelector, PodList] = {}

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._ws.close()
            await self._rest.close()

    # -- requests --

    async def _send(self, request: ApiRequest, call: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
        try:
            return await call(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise api_error(exc.status or 0, _status_body(exc.body or b"{}"), request) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise Unreachable(request, host=self.host, detail=str(exc)) from exc

    async def _request(self, request: ApiRequest, call: Callable[..., Any], *args: Any,
                       **kwargs: Any) -> dict[str, Any]:
        """Send, read the JSON answer; raise the `ApiError` of any status outside 2xx."""
        response = await self._send(request, call, *args, **kwargs)
        try:
            raw = await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(request, host=self.host, detail=str(exc)) from exc
        finally:
            response.release()
        body = _status_body(raw)
        if 200 <= response.status < 300:
            return body
        details = body.get("details") or {}
        if response.status == 404 and request.namespace and \
                details.get("kind") == "namespaces" and details.get("name") == request.namespace:
            raise await self._no_namespace(request)
        raise api_error(response.status, body, request)

    async def _no_namespace(self, request: ApiRequest) -> NamespaceNotFound:
        try:
            body = await self._request(ApiRequest("list", "namespaces"),
                                       self._core.list_namespace)
        except MultisniffError:
            return NamespaceNotFound(request)
        names = sorted(str(item["metadata"]["name"]) for item in body.get("items") or ())
        return NamespaceNotFound(request, existing=names)

    # -- pods --

    async def list_pods(self, selector: PodSelector) -> PodList:
        request = ApiRequest("list", "pods", selector.namespace)
        query: dict[str, Any] = {"label_selector": selector.labels,
                                 "field_selector": selector.fields}
        if selector.namespace is None:
            body = await self._request(request, self._core.list_pod_for_all_namespaces, **query)
        else:
            body = await self._request(request, self._core.list_namespaced_pod,
                                       selector.namespace, **query)
        listed = PodList(tuple(pod_info(item) for item in body.get("items") or ()),
                         str((body.get("metadata") or {}).get("resourceVersion", "")))
        self._listed[selector] = listed
        return listed

    async def _watch_raw(self, selector: PodSelector, resource_version: str,
                         timeout_seconds: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """One watch request: (type, object) pairs until the server ends it. A 410, as the
        answer or as an ERROR event, raises `Gone`: the version is too old to watch from."""
        request = ApiRequest("watch", "pods", selector.namespace)
        query: dict[str, Any] = {
            "label_selector": selector.labels, "field_selector": selector.fields,
            "watch": True, "allow_watch_bookmarks": True, "resource_version": resource_version,
            "timeout_seconds": timeout_seconds,
        }
        if selector.namespace is None:
            response = await self._send(request, self._core.list_pod_for_all_namespaces, **query)
        else:
            response = await self._send(request, self._core.list_namespaced_pod,
                                        selector.namespace, **query)
        try:
            if not 200 <= response.status < 300:
                raise api_error(response.status, _status_body(await response.read()), request)
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, OSError) as exc:
                    logger.debug("watch of %s broke: %s; resuming", selector, exc)
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = str(event.get("type")), event.get("object") or {}
                if kind == "ERROR":
                    raise api_error(int(obj.get("code") or 500), obj, request)
                yield kind, obj
        finally:
            response.release()

    async def watch_pods(self, selector: PodSelector,
                         resource_version: str) -> AsyncIterator[PodEvent]:
        listed = self._listed.get(selector)
        known: dict[PodRef, PodInfo] = (
            {pod.ref: pod for pod in listed.pods}
            if listed is not None and listed.resource_version == resource_version else {})
        version = resource_version
        while True:
            # Spread the reconnects of many watchers; the server ends each request then.
            seconds = WATCH_SECONDS + random.randint(0, 30)
            try:
                async for kind, obj in self._watch_raw(selector, version, seconds):
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind == "BOOKMARK":
                        continue
                    pod = pod_info(obj)
                    if kind == "DELETED":
                        known.pop(pod.ref, None)
                    else:
                        known[pod.ref] = pod
                    yield PodEvent(PodEventType(kind), pod)
                continue
            except Gone:
                logger.debug("watch of %s: version %s expired; re-listing", selector, version)
            relisted = await self.list_pods(selector)
            for event in pod_changes(known, relisted.pods):
                if event.type is PodEventType.DELETED:
                    known.pop(event.pod.ref, None)
                else:
                    known[event.pod.ref] = event.pod
                yield event
            version = relisted.resource_version

    async def label_summary(self, namespace: str | None) -> list[str]:
        listed = await self.list_pods(PodSelector(namespace))
        return top_labels(pod.labels for pod in listed.pods)

    async def namespace_exists(self, name: str) -> bool:
        """False only when the API says so; True also when we may not ask (the next request
        in that namespace then says what is wrong)."""
        try:
            await self._request(ApiRequest("get", "namespaces", name=name),
                                self._core.read_namespace, name)
        except NotFound:
            return False
        except Forbidden:
            pass
        return True

    async def node(self, name: str) -> NodeInfo:
        return node_info(await self._request(ApiRequest("get", "nodes", name=name),
                                             self._core.read_node, name))

    async def list_nodes(self) -> tuple[NodeInfo, ...]:
        body = await self._request(ApiRequest("list", "nodes"), self._core.list_node)
        return tuple(node_info(item) for item in body.get("items") or ())

    async def namespace_labels(self, name: str) -> Mapping[str, str] | None:
        try:
            body = await self._request(ApiRequest("get", "namespaces", name=name),
                                       self._core.read_namespace, name)
        except (NotFound, Forbidden):
            return None
        return dict((body.get("metadata") or {}).get("labels") or {})

    async def can_i(self, verb: str, resource: str, *, namespace: str | None,
                    subresource: str = "", group: str = "") -> bool:
        attributes: dict[str, str] = {"verb": verb, "resource": resource, "group": group}
        if namespace:
            attributes["namespace"] = namespace
        if subresource:
            attributes["subresource"] = subresource
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}
        body = await self._request(ApiRequest("create", "selfsubjectaccessreviews"),
                                   self._authz.create_self_subject_access_review, review)
        return bool((body.get("status") or {}).get("allowed", False))

    def exec(self, pod: PodRef, container: str, command: Sequence[str], *, stdin: bool = False,
             on_stderr: Callable[[bytes], None] | None = None, linger: float | None = None,
             ) -> AbstractAsyncContextManager[ExecStream]:
        return open_exec(self._ws, pod, container, command, stdin=stdin, on_stderr=on_stderr,
                         host=self.host, linger=LINGER if linger is None else linger)

    async def add_ephemeral_container(self, pod: PodRef, spec: Mapping[str, Any], *,
                                      dry_run: bool = False) -> None:
        # As kubectl debug does: a strategic merge patch of the subresource. The list merges by
        # name, so the server adds the container to those there: no read, no conflict to retry.
        await self._request(
            ApiRequest("patch", "pods/ephemeralcontainers", pod.namespace, pod.name),
            self._core.patch_namespaced_pod_ephemeralcontainers, pod.name, pod.namespace,
            {"spec": {"ephemeralContainers": [dict(spec)]}},
            _content_type=STRATEGIC_MERGE_PATCH, **({"dry_run": "All"} if dry_run else {}))

    async def wait_container_running(self, pod: PodRef, container: str, *,
                                     timeout: float) -> PodInfo:
        request = ApiRequest("get", "pods", pod.namespace, pod.name)
        selector = PodSelector(pod.namespace, fields=f"metadata.name={pod.name}")
        obj: dict[str, Any] = {}
        try:
            with anyio.fail_after(timeout):
                while True:
                    try:
                        obj = await self._request(request, self._core.read_namespaced_pod,
                                                  pod.name, pod.namespace)
                    except NotFound as exc:
                        raise NotFound(request, detail=exc.detail, message=(
                            f"Pod {pod} is gone while we waited for its container "
                            f"{container}.")) from exc
                    version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
                    if _settled(obj, pod, container):
                        return pod_info(obj)
                    with suppress(Gone):  # read the pod again
                        async for kind, event_obj in self._watch_raw(selector, version, 60):
                            if kind == "DELETED":
                                raise ClusterError(f"Pod {pod} was deleted while we waited for "
                                                   f"its container {container}.")
                            if kind != "BOOKMARK":
                                obj = event_obj
                                if _settled(obj, pod, container):
                                    return pod_info(obj)
        except TimeoutError:
            state = container_state(obj, container)
            why = f" (it is {state.state}{f': {state.reason}' if state.reason else ''})"
            raise ContainerNotStarted(
                f"Container {container} of pod {pod} did not start within {timeout:g} s{why}; "
                f"check the node with kubectl describe pod -n {pod.namespace} {pod.name}.",
                pod=str(pod), container=container, state=state.state, reason=state.reason,
                detail=state.message) from None

    async def create_pod(self, manifest: Mapping[str, Any]) -> PodRef:
        namespace = str((manifest.get("metadata") or {}).get("namespace") or "default")
        body = await self._request(ApiRequest("create", "pods", namespace),
                                   self._core.create_namespaced_pod, namespace, dict(manifest))
        meta = body.get("metadata") or {}
        return PodRef(str(meta.get("namespace", namespace)), str(meta.get("name", "")))

    async def delete_pod(self, pod: PodRef, *, grace_seconds: int = 0) -> None:
        with suppress(NotFound):
            await self._request(ApiRequest("delete", "pods", pod.namespace, pod.name),
                                self._core.delete_namespaced_pod, pod.name, pod.namespace,
                                grace_period_seconds=grace_seconds)

    # -- jobs --

    async def create_job(self, manifest: Mapping[str, Any]) -> None:
        namespace = str((manifest.get("metadata") or {}).get("namespace") or "default")
        await self._request(ApiRequest("create", "jobs", namespace),
                            self._batch.create_namespaced_job, namespace, dict(manifest))

    async def delete_job(self, namespace: str, name: str) -> None:
        with suppress(NotFound):
            await self._request(ApiRequest("delete", "jobs", namespace, name),
                                self._batch.delete_namespaced_job, name, namespace,
                                propagation_policy="Background")

    async def list_jobs(self, namespace: str | None, labels: str) -> tuple[JobInfo, ...]:
        request = ApiRequest("list", "jobs", namespace)
        if namespace is None:
            body = await self._request(request, self._batch.list_job_for_all_namespaces,
                                       label_selector=labels)
        else:
            body = await self._request(request, self._batch.list_namespaced_job, namespace,
                                       label_selector=labels)
        return tuple(job_info(item) for item in body.get("items") or ())


def job_info(job: Mapping[str, Any]) -> JobInfo:
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    state = "Active"
    for condition in status.get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            state = str(condition["type"])
    return JobInfo(str(meta.get("namespace", "")), str(meta.get("name", "")), state)


def _settled(obj: Mapping[str, Any], pod: PodRef, container: str) -> bool:
    """True when the container runs; raises when it cannot start or has ended."""
    state = container_state(obj, container)
    if state.state == "running":
        return True
    detail = f": {state.message}" if state.message else ""
    if state.state == "terminated":
        raise ContainerNotStarted(
            f"Container {container} of pod {pod} ended ({state.reason or 'exit'} "
            f"{state.exit_code}){detail}; see kubectl logs -n {pod.namespace} {pod.name} "
            f"-c {container}.",
            pod=str(pod), container=container, state=state.state, reason=state.reason,
            detail=state.message)
    if state.state == "waiting" and state.reason in FAILED_WAITING_REASONS:
        raise ContainerNotStarted(
            f"Container {container} of pod {pod} cannot start ({state.reason}){detail}; "
            "check its image and security settings.",
            pod=str(pod), container=container, state=state.state, reason=state.reason,
            detail=state.message)
    pod_status = obj.get("status") or {}
    if pod_status.get("phase") == "Failed":
        why = pod_status.get("message") or pod_status.get("reason") or "the pod failed"
        raise ClusterError(f"Pod {pod} failed before its container {container} ran: {why}.")
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        raise ClusterError(f"Pod {pod} is being deleted while we waited for its container "
                           f"{container}.")
    return False


@asynccontextmanager
async def connect(kubeconfig: str | None = None,
                  context: str | None = None) -> AsyncIterator[KubeCluster]:
    """Load the configuration the kubectl way and open the clients; leaving closes them."""
    configuration, namespace = await _load_configuration(kubeconfig, context)
    # No bound on the connections to the API server: every open exec holds one.
    configuration.connection_pool_maxsize = 0
    cluster = KubeCluster(configuration, default_namespace=namespace)
    try:
        yield cluster
    finally:
        await cluster.aclose()
