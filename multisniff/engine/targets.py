"""From pods to capture targets: one capture per network namespace.

The containers of a pod share its network namespace, so a pod is one target, entered through
the container named with -c or else its first running container. Pods with hostNetwork share
their node's network namespace: all of them on one node are one target (captured once).
A target's `key` tells captures apart across pod churn: the same pod with a restarted container
(a new container ID) is a new capture and a new interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from multisniff.capture.model import Target
from multisniff.kube.model import PodInfo


@dataclass(frozen=True, slots=True)
class Candidate:
    """A matched pod and what becomes of it: a target, or the reason it is not captured."""

    pod: PodInfo
    target: Target | None
    reason: str
    key: tuple[str, ...] = ()
    shared_with: tuple[str, ...] = ()
    """Other hostNetwork pods whose (node) network this target captures too."""


def pick_container(pod: PodInfo, wanted: str | None) -> tuple[str | None, str]:
    """(container, "") or (None, why not)."""
    if wanted is not None:
        container = pod.container(wanted)
        if container is None:
            names = ", ".join(c.name for c in pod.containers) or "none"
            return None, f"it has no container {wanted!r} (it has {names})"
        if not container.running:
            return None, f"its container {wanted} is not running"
        return wanted, ""
    for container in pod.containers:
        if container.running:
            return container.name, ""
    return None, "none of its containers is running"


def capture_key(pod: PodInfo, container: str) -> tuple[str, ...]:
    if pod.host_network:
        return ("node", pod.node or "")
    info = pod.container(container)
    return ("pod", pod.uid, container, (info.container_id if info else None) or "")


def candidate(pod: PodInfo, wanted_container: str | None) -> Candidate:
    if pod.deleting:
        return Candidate(pod, None, "it is being deleted")
    if pod.phase != "Running":
        return Candidate(pod, None, f"it is {pod.phase}, not Running")
    if not pod.host_network and not pod.ip:
        return Candidate(pod, None, "it has no IP yet")
    container, why = pick_container(pod, wanted_container)
    if container is None:
        return Candidate(pod, None, why)
    return Candidate(pod, Target(pod=pod, container=container), "",
                     key=capture_key(pod, container))


def covered(pod: PodInfo, owner: str) -> Candidate:
    """A hostNetwork pod whose node network the capture of pod `owner` already carries."""
    return Candidate(pod, None, f"it uses the host network of node {pod.node or '?'}, "
                     f"captured once with {owner}", key=capture_key(pod, ""))


def plan(pods: list[PodInfo] | tuple[PodInfo, ...],
         wanted_container: str | None) -> list[Candidate]:
    """Candidates for pods, in the order given; hostNetwork pods of one node become one target
    (the first of them), the others say whose capture covers them."""
    result: list[Candidate] = []
    by_node: dict[str, int] = {}
    for pod in pods:
        item = candidate(pod, wanted_container)
        if item.target is not None and pod.host_network:
            node = pod.node or ""
            first = by_node.get(node)
            if first is not None:
                owner = result[first]
                result[first] = Candidate(owner.pod, owner.target, owner.reason, owner.key,
                                          (*owner.shared_with, str(pod.ref)))
                result.append(covered(pod, str(owner.pod.ref)))
                continue
            by_node[node] = len(result)
        result.append(item)
    return result
