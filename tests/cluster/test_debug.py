"""The two ways multisniff gets next to a pod without changing it: an ephemeral container that
targets the pod's container, and a privileged host pod that enters the pod's network namespace."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def _wait_ephemeral_running(cluster, namespace, pod, container, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cluster.kubectl_json("get", "pod", pod, "-n", namespace)["status"]
        for s in status.get("ephemeralContainerStatuses", []):
            if s["name"] == container and "running" in s.get("state", {}):
                return
        time.sleep(0.5)
    raise AssertionError(f"ephemeral container {container} of {pod} not running: {status}")


def test_debug_target_adds_a_container_that_sees_the_target(cluster, namespace, run_pod,
                                                           tools_image):
    pod = run_pod("target", namespace=namespace, image=tools_image,
                  command=["sleep", "3601"])
    pod_ip = pod["status"]["podIP"]

    cluster.kubectl("debug", "target", "-n", namespace, "--image", tools_image,
                    "--image-pull-policy=Never", "--target=main", "--container=sniff",
                    "--profile=netadmin", "--", "sleep", "3600")
    _wait_ephemeral_running(cluster, namespace, "target", "sniff")

    addresses = cluster.kubectl("exec", "target", "-n", namespace, "-c", "sniff", "--",
                                "ip", "-o", "-4", "addr", "show").stdout.decode()
    assert f"inet {pod_ip}/" in addresses
    # --target shares the target container's process namespace: its sleep is visible.
    processes = cluster.kubectl("exec", "target", "-n", namespace, "-c", "sniff", "--", "sh",
                                "-c", "for f in /proc/[0-9]*/cmdline; do cat $f; echo; done")
    assert b"sleep\x003601\x00" in processes.stdout
    spec = cluster.kubectl_json("get", "pod", "target", "-n", namespace)["spec"]
    assert [(c["name"], c.get("targetContainerName")) for c in spec["ephemeralContainers"]] == [
        ("sniff", "main")]


def _host_pid_of(marker: str, timeout: float = 10.0) -> int:
    """The host pid of the process whose command line is exactly ``marker`` (split on spaces)."""
    wanted = marker.encode().split()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
                except OSError:
                    continue
                if args == wanted:
                    return int(entry)
        time.sleep(0.2)
    raise AssertionError(f"no process {marker!r} on the host")


def test_privileged_host_pod_enters_another_pods_network(cluster, namespace, run_pod,
                                                        tools_image):
    marker = f"sleep {3600 + uuid.uuid4().int % 1000}"
    target = run_pod("target", namespace=namespace, image=tools_image, command=marker.split())
    helper = run_pod("helper", namespace=namespace, image=tools_image,
                     command=["sleep", "3600"], privileged=True, host_pid=True,
                     host_network=True)
    assert helper["status"]["podIP"] == cluster.node_ip  # host network
    pid = _host_pid_of(marker)  # the host's pid namespace is the helper's

    inside = cluster.kubectl("exec", "helper", "-n", namespace, "--", "nsenter", "-t", str(pid),
                             "-n", "ip", "-o", "-4", "addr", "show").stdout.decode()
    outside = cluster.kubectl("exec", "helper", "-n", namespace, "--",
                              "ip", "-o", "-4", "addr", "show").stdout.decode()

    assert f"inet {target['status']['podIP']}/" in inside
    assert f"inet {cluster.node_ip}/" not in inside
    assert f"inet {cluster.node_ip}/" in outside


def test_ephemeral_container_api_accepts_a_patch(cluster, namespace, run_pod):
    # The raw subresource multisniff will use, without kubectl debug in between.
    run_pod("target", namespace=namespace, image="multisniff.local/pause:1")
    patch = {"spec": {"ephemeralContainers": [{
        "name": "raw", "image": "multisniff.local/pause:1", "imagePullPolicy": "Never",
        "targetContainerName": "main"}]}}
    cluster.kubectl("patch", "pod", "target", "-n", namespace, "--subresource=ephemeralcontainers",
                    "--type=strategic", "-p", json.dumps(patch))
    _wait_ephemeral_running(cluster, namespace, "target", "raw")
