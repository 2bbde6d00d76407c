"""Helpers for the tests that prove the cluster itself: a namespace per test, pods that are
Running before the test body starts, and the tools image.

The tools image (tests/cluster/images, built by ``clusterctl build``) must have ``sh``, ``cat``,
``ip``, ``nsenter``, ``sleep`` and ``tcpdump``. Tests that need it are skipped, with the reason,
while it is not built; MULTISNIFF_TOOLS_IMAGE names another image with those programs.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Cluster  # tests/conftest.py

TOOLS_IMAGE = os.environ.get("MULTISNIFF_TOOLS_IMAGE", "multisniff.local/tools:1")
PAUSE_IMAGE = "multisniff.local/pause:1"
READY_TIMEOUT = 60


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) when the test ends."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("wait", f"namespace/{name}", "--for=jsonpath={.status.phase}=Active")
    # The ServiceAccount controller makes "default" a moment after the namespace; pods need it.
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name,
                    "--timeout=30s")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def tools_image(cluster: Cluster) -> str:
    listed = subprocess.run(
        ["ctr", "--address", "/run/multisniff-containerd/containerd.sock", "-n", "k8s.io",
         "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    if TOOLS_IMAGE not in listed:
        pytest.skip(f"{TOOLS_IMAGE} is not in the cluster's containerd (it has "
                    f"{', '.join(listed)}); build it with tests/cluster/images/build, then "
                    "clusterctl down && clusterctl up.")
    return TOOLS_IMAGE


def pod_manifest(
    name: str,
    *,
    namespace: str,
    image: str,
    command: list[str] | None = None,
    labels: dict[str, str] | None = None,
    privileged: bool = False,
    host_pid: bool = False,
    host_network: bool = False,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never"}
    if command:
        container["command"] = command
    if privileged:
        container["securityContext"] = {"privileged": True}
    spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
    }
    if host_pid:
        spec["hostPID"] = True
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }


@pytest.fixture
def run_pod(cluster: Cluster) -> Callable[..., dict[str, Any]]:
    """Create pods from pod_manifest(...) arguments, wait until all are Ready, return the last
    one as the API shows it. Several names at once start in parallel."""

    def run(*names: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
        docs = [pod_manifest(n, namespace=namespace, **kwargs) for n in names]
        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "List", "items": docs}).encode())
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready",
                        f"--timeout={READY_TIMEOUT}s", *(f"pod/{n}" for n in names),
                        timeout=READY_TIMEOUT + 10)
        return cluster.kubectl_json("get", "pod", names[-1], "-n", namespace)

    return run
