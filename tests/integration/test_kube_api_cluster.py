"""The Kubernetes client against the real cluster: listing, watching (410 included), refusals
as sentences and types, ephemeral containers, nodes, and an unreachable API."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from kubenamespace import TOOLS_IMAGE, run_sleeper, sleeper, throwaway_namespace

from multisniff.errors import (
    ClusterError,
    ContainerNotStarted,
    Forbidden,
    NamespaceNotFound,
    RefusedError,
    Unreachable,
)
from multisniff.kube.api import connect
from multisniff.kube.model import PodEvent, PodEventType, PodRef, PodSelector

pytestmark = pytest.mark.cluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def namespace(cluster) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with throwaway_namespace(cluster, "msx-api") as name:
        run_sleeper(cluster, name, "target")
        yield name


@pytest.mark.anyio
async def test_list_with_label_and_field_selectors(cluster) -> None:  # type: ignore[no-untyped-def]
    async with connect(str(cluster.kubeconfig)) as kube:
        coredns = await kube.list_pods(PodSelector("kube-system", "app=coredns"))
        one = await kube.list_pods(PodSelector(
            "kube-system", "app=coredns", f"metadata.name={coredns.pods[0].ref.name}"))
        everywhere = await kube.list_pods(PodSelector(None, "app=coredns"))
        node = await kube.node(str(coredns.pods[0].node))

    assert len(coredns.pods) == 3 and coredns.resource_version
    assert all(p.labels["app"] == "coredns" and p.phase == "Running" and p.ip
               and p.containers[0].running for p in coredns.pods)
    assert all((p.containers[0].container_id or "").startswith("containerd://")
               for p in coredns.pods)
    assert [p.ref for p in one.pods] == [coredns.pods[0].ref]
    assert {p.ref for p in everywhere.pods} == {p.ref for p in coredns.pods}
    assert node.architecture == "amd64" and node.internal_ip == cluster.node_ip


@pytest.mark.anyio
async def test_watch_sees_a_pod_come_and_go(cluster, namespace) -> None:  # type: ignore[no-untyped-def]
    selector = PodSelector(namespace, "app=comer")
    events: list[PodEvent] = []
    async with connect(str(cluster.kubeconfig)) as kube:
        listed = await kube.list_pods(selector)
        with anyio.fail_after(60):
            watch = kube.watch_pods(selector, listed.resource_version)
            ref = await kube.create_pod(sleeper("comer", namespace))
            async for event in watch:
                events.append(event)
                if event.type is PodEventType.ADDED:
                    await kube.delete_pod(ref)
                    await kube.delete_pod(ref)  # already going: not an error
                if event.type is PodEventType.DELETED:
                    break
            await watch.aclose()  # type: ignore[attr-defined]

    assert ref == PodRef(namespace, "comer")
    assert events[0].type is PodEventType.ADDED and events[-1].type is PodEventType.DELETED
    assert {e.pod.ref for e in events} == {ref}


@pytest.mark.anyio
async def test_an_expired_resource_version_relists_and_yields_the_current_pods(
        cluster, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger="multisniff.kube.api")
    selector = PodSelector("kube-system", "app=coredns")
    async with connect(str(cluster.kubeconfig)) as kube:
        current = await kube.list_pods(selector)
        watch = kube.watch_pods(selector, "1")
        with anyio.fail_after(30):
            events = [await watch.__anext__() for _ in current.pods]  # type: ignore[attr-defined]
        await watch.aclose()  # type: ignore[attr-defined]

    assert {(e.type, e.pod.ref) for e in events} == {
        (PodEventType.ADDED, p.ref) for p in current.pods}
    assert "expired; re-listing" in caplog.text  # the API server did answer 410 Gone


@pytest.mark.anyio
async def test_rbac_refusal_is_a_sentence(cluster, namespace) -> None:  # type: ignore[no-untyped-def]
    async with connect(str(cluster.viewer_kubeconfig)) as kube:
        assert not await kube.can_i("create", "pods", namespace=namespace)
        assert await kube.can_i("list", "pods", namespace=namespace)
        assert await kube.namespace_exists(namespace)  # may not ask: assumed to exist
        with pytest.raises(RefusedError) as refused:
            await kube.create_pod(sleeper("nope", namespace))

    assert str(refused.value) == (
        f"You may not create pods in namespace {namespace} (RBAC): ask for `create` on `pods` "
        "there, or use a kubeconfig that has it.")
    assert isinstance(refused.value, Forbidden) and refused.value.status == 403


@pytest.mark.anyio
async def test_nodes_are_listed_with_their_addresses_unless_rbac_refuses(cluster) -> None:  # type: ignore[no-untyped-def]
    async with connect(str(cluster.kubeconfig)) as kube:
        nodes = await kube.list_nodes()
    async with connect(str(cluster.viewer_kubeconfig)) as kube:
        with pytest.raises(Forbidden) as refused:
            await kube.list_nodes()

    (node,) = nodes
    bridge = cluster.node_pod_cidr.split("/")[0].rsplit(".", 1)[0] + ".1"
    assert node.name == cluster.node_name
    assert node.addresses == (cluster.node_ip, bridge)
    assert str(refused.value) == ("You may not list nodes cluster-wide (RBAC): ask for `list` "
                                  "on `nodes` there, or use a kubeconfig that has it.")


@pytest.mark.anyio
async def test_a_user_without_patch_may_not_add_ephemeral_containers(cluster, namespace) -> None:  # type: ignore[no-untyped-def]
    spec = {"name": "msx-never", "image": TOOLS_IMAGE, "imagePullPolicy": "Never",
            "command": ["sleep", "600"], "targetContainerName": "main"}
    async with connect(str(cluster.viewer_kubeconfig)) as kube:
        assert not await kube.can_i("patch", "pods", namespace=namespace,
                                    subresource="ephemeralcontainers")
        with pytest.raises(Forbidden) as refused:
            await kube.add_ephemeral_container(PodRef(namespace, "target"), spec)

    assert str(refused.value) == (
        f"You may not patch pods/ephemeralcontainers in namespace {namespace} (RBAC): ask for "
        "`patch` on `pods/ephemeralcontainers` there, or use a kubeconfig that has it.")


@pytest.mark.anyio
async def test_pod_security_refusal_names_the_level(cluster) -> None:  # type: ignore[no-untyped-def]
    manifest = sleeper("privileged", cluster.restricted_namespace)
    manifest["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    async with connect(str(cluster.kubeconfig)) as kube:
        with pytest.raises(RefusedError) as refused:
            await kube.create_pod(manifest)

    message = str(refused.value)
    assert message.startswith(f"Namespace {cluster.restricted_namespace} enforces Pod Security "
                              "level 'restricted', which refuses this (")
    assert "privileged" in message and "enforce=privileged" in message


@pytest.mark.anyio
async def test_a_missing_namespace_lists_the_ones_there(cluster) -> None:  # type: ignore[no-untyped-def]
    async with connect(str(cluster.kubeconfig)) as kube:
        assert not await kube.namespace_exists("msx-missing")
        with pytest.raises(RefusedError) as refused:
            await kube.create_pod(sleeper("x", "msx-missing"))

    assert isinstance(refused.value, NamespaceNotFound)
    assert re.fullmatch(r"Namespace msx-missing does not exist; namespaces here: .*\bdemo\b.*\.",
                        str(refused.value))


@pytest.mark.anyio
async def test_ephemeral_container_is_added_and_runs(cluster, namespace) -> None:  # type: ignore[no-untyped-def]
    target = PodRef(namespace, "target")
    spec = {"name": "msx-dbg", "image": TOOLS_IMAGE, "imagePullPolicy": "Never",
            "command": ["sleep", "600"], "targetContainerName": "main"}
    async with connect(str(cluster.kubeconfig)) as kube:
        await kube.add_ephemeral_container(target, spec)
        pod = await kube.wait_container_running(target, "msx-dbg", timeout=60)
        async with kube.exec(target, "msx-dbg", ["sh", "-c", "echo hi"]) as channel:
            out = await channel.read()
            result = await channel.wait()
        # The patch merges by name: a second container joins the first, replacing nothing
        # (the merged list starts with the patch's items; the order means nothing).
        await kube.add_ephemeral_container(target, {**spec, "name": "msx-dbg2"})
        again = await kube.wait_container_running(target, "msx-dbg2", timeout=60)

    assert [(c.name, c.running) for c in pod.ephemeral_containers] == [("msx-dbg", True)]
    assert (out, result.exit_code) == (b"hi\n", 0)
    assert sorted(c.name for c in again.ephemeral_containers) == ["msx-dbg", "msx-dbg2"]


@pytest.mark.anyio
async def test_a_container_that_cannot_start_says_why(cluster, namespace) -> None:  # type: ignore[no-untyped-def]
    target = PodRef(namespace, "target")
    spec = {"name": "msx-missing-image", "image": "multisniff.local/absent:1",
            "imagePullPolicy": "Never", "targetContainerName": "main"}
    async with connect(str(cluster.kubeconfig)) as kube:
        await kube.add_ephemeral_container(target, spec)
        with pytest.raises(ClusterError, match="ErrImageNeverPull") as never:
            await kube.wait_container_running(target, "msx-missing-image", timeout=60)
        # IfNotPresent: the node tries to pull, and cannot (this cluster reaches no registry).
        await kube.add_ephemeral_container(target, {**spec, "name": "msx-unpullable",
                                                    "imagePullPolicy": "IfNotPresent"})
        with pytest.raises(ContainerNotStarted) as unpullable:
            await kube.wait_container_running(target, "msx-unpullable", timeout=60)

    assert isinstance(never.value, ContainerNotStarted) and never.value.image_unavailable
    assert unpullable.value.image_unavailable
    assert unpullable.value.reason in ("ErrImagePull", "ImagePullBackOff")
    assert "multisniff.local/absent:1" in unpullable.value.detail


@pytest.mark.anyio
async def test_an_unreachable_api_server_is_a_sentence(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = json.loads(cluster.kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = "https://127.0.0.1:1"
    (tmp_path / "config").write_text(json.dumps(config))
    async with connect(str(tmp_path / "config")) as kube:
        with pytest.raises(ClusterError, match=r"^Cannot reach the Kubernetes API at "
                                               r"https://127\.0\.0\.1:1: .*; check ") as caught:
            await kube.list_pods(PodSelector("default"))

    assert isinstance(caught.value, Unreachable) and caught.value.status is None
    assert isinstance(caught.value.__cause__, (aiohttp.ClientError, OSError))
