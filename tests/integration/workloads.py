"""Pods of the workload image and a multisniff log to wait on, shared by the cluster tests."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

WORKLOAD_IMAGE = "multisniff.local/workload:1"


def workload_pod(name: str, namespace: str, *, labels: dict[str, str] | None = None,
                 args: list[str] | None = None,
                 command: list[str] | None = None) -> dict[str, Any]:
    """A pod of the workload image (busybox and /workload, no libc), labelled app=NAME unless
    told otherwise; `args` go to /workload, `command` replaces it."""
    container: dict[str, Any] = {"name": "main", "image": WORKLOAD_IMAGE,
                                 "imagePullPolicy": "Never"}
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "restartPolicy": "Never", "containers": [container]},
    }


def apply_and_wait(cluster: Any, pods: list[dict[str, Any]]) -> dict[str, str]:
    """Create the pods (each names its namespace), wait until every one is ready; their IPs,
    by "namespace/name"."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": pods}).encode())
    ips = {}
    for pod in pods:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s",
                        f"pod/{name}", timeout=90)
        ips[f"{namespace}/{name}"] = str(
            cluster.kubectl_json("get", "pod", name, "-n", namespace)["status"]["podIP"])
    return ips


def start_pod(cluster: Any, namespace: str, name: str, args: list[str]) -> str:
    """Start a workload pod, wait until it is ready; its IP."""
    return apply_and_wait(cluster, [workload_pod(name, namespace, args=args)])[
        f"{namespace}/{name}"]


def tshark_markers(pcap: Path, port: int) -> list[tuple[str, str]]:
    """(interface name, marker text) of every datagram to `port`, in file order, as tshark
    reads them."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"udp.dstport == {port}", "-T", "fields",
         "-E", "separator=\t", "-e", "frame.interface_name", "-e", "data.data"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        interface, _, data = line.partition("\t")
        rows.append((interface, bytes.fromhex(data.strip()).decode()))
    return rows


def wait_for(path: Path, text: str, process: subprocess.Popen[bytes], seconds: float, *,
             times: int = 1) -> None:
    """Wait until multisniff's log at `path` says `text` (`times` times); fail if it ends
    first."""
    deadline = time.monotonic() + seconds
    while path.read_text().count(text) < times:
        assert process.poll() is None, f"multisniff ended early:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in:\n{path.read_text()}"
        time.sleep(0.2)
