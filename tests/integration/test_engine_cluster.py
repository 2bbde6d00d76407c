"""The whole capture command on the local cluster: three CoreDNS pods for a few seconds, to a
file and live to stdout, judged by tshark; nothing keeps running afterwards."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

TOOLS_IMAGE = "multisniff.local/tools:1"


def multisniff(cluster: Any, *args: str,
               timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
         "-l", "app=coredns", "-n", "kube-system", "--ephemeral-image", TOOLS_IMAGE, *args],
        capture_output=True, timeout=timeout)


def coredns_pods(cluster: Any) -> list[str]:
    pods = cluster.kubectl_json("get", "pods", "-n", "kube-system", "-l", "app=coredns")
    return sorted(f"kube-system/{pod['metadata']['name']}" for pod in pods["items"])


def interface_names(capture: Path | bytes) -> dict[str, int]:
    argv = ["tshark", "-r", "-" if isinstance(capture, bytes) else str(capture), "-T", "fields",
            "-e", "frame.interface_name"]
    result = subprocess.run(argv, input=capture if isinstance(capture, bytes) else None,
                            capture_output=True, check=True, timeout=60)
    counts: dict[str, int] = {}
    for name in result.stdout.decode().split():
        counts[name] = counts.get(name, 0) + 1
    return counts


def no_capture_left_running(cluster: Any) -> bool:
    pods = cluster.kubectl_json("get", "pods", "-n", "kube-system", "-l", "app=coredns")
    for pod in pods["items"]:
        for status in pod["status"].get("ephemeralContainerStatuses", []):
            if "terminated" not in status.get("state", {}):
                return False
    return True


def test_three_coredns_pods_to_a_file(cluster: Any, tmp_path: Path) -> None:
    out = tmp_path / "dns.pcapng"
    summary = tmp_path / "summary.json"
    result = multisniff(cluster, "--duration", "4s", "-o", str(out), "--summary-json",
                        str(summary))
    assert result.returncode == 0, result.stderr.decode()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not Path(str(out) + ".parts").exists()
    pods = coredns_pods(cluster)
    assert len(pods) == 3
    counts = interface_names(out)
    assert sorted(counts) == pods
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 0
    assert sorted(f"{p['namespace']}/{p['pod']}" for p in data["pods"]) == pods
    assert all(p["state"] == "done" and p["mode"] in ("upload", "ephemeral")
               for p in data["pods"])
    assert data["totals"]["packets"] == sum(counts.values())
    capinfos = subprocess.run(["capinfos", "-o", str(out)], capture_output=True, text=True,
                              check=True).stdout
    assert "True" in capinfos  # strict time order
    deadline = time.monotonic() + 30
    while not no_capture_left_running(cluster):
        assert time.monotonic() < deadline, "an ephemeral capture container is still running"
        time.sleep(1)


def test_the_nodes_addresses_are_named_in_the_capture(cluster: Any, tmp_path: Path) -> None:
    out = tmp_path / "names.pcapng"
    result = multisniff(cluster, "--duration", "2s", "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()

    hosts = subprocess.run(["tshark", "-r", str(out), "-q", "-z", "hosts"], capture_output=True,
                           text=True, check=True, timeout=60).stdout
    names = dict(line.split("\t", 1) for line in hosts.splitlines()
                 if line and not line.startswith("#"))
    # The kubelet probes pods from the node's side of the pod network (the bridge, first address
    # of the node's pod CIDR); the node's own address is named too.
    bridge = str(ipaddress.ip_network(cluster.node_pod_cidr).network_address + 1)
    assert names.get(cluster.node_ip) == f"node/{cluster.node_name}", hosts
    assert names.get(bridge) == f"node/{cluster.node_name}", hosts
    assert set(coredns_pods(cluster)) <= set(names.values()), hosts


def test_live_stream_on_stdout(cluster: Any) -> None:
    result = multisniff(cluster, "--duration", "3s", "-o", "-")
    assert result.returncode == 0, result.stderr.decode()
    counts = interface_names(result.stdout)
    assert sorted(counts) == coredns_pods(cluster)


def test_follow_churn_and_ctrl_c(cluster: Any, tmp_path: Path) -> None:
    """Pods added and deleted during the capture become and end interfaces; SIGINT ends the
    run with 130 and keeps everything; nothing is left in the pods."""
    import signal

    from kubenamespace import sleeper, throwaway_namespace

    out = tmp_path / "churn.pcapng"
    with throwaway_namespace(cluster, "msnf-engine") as namespace:
        def pod(name: str) -> dict[str, Any]:
            manifest = sleeper(name, namespace)
            manifest["metadata"]["labels"] = {"group": "churn"}
            return manifest

        def apply(name: str) -> None:
            cluster.kubectl("apply", "-f", "-", input=json.dumps(pod(name)).encode())
            cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                            "--timeout=60s")

        apply("first")
        process = subprocess.Popen(
            [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
             "-l", "group=churn", "-n", namespace, "--mode", "upload", "-o", str(out)],
            stderr=subprocess.PIPE)
        try:
            time.sleep(8)
            apply("second")
            time.sleep(8)
            cluster.kubectl("delete", "pod", "first", "-n", namespace, "--wait=true",
                            "--timeout=60s")
            time.sleep(3)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 130, stderr.decode()
        log = stderr.decode()
        assert "went away; ending its capture" in log
        assert "Starting a capture of" in log
        inspect = subprocess.run(
            [sys.executable, "-m", "multisniff", "inspect", "--json", str(out)],
            capture_output=True, text=True, check=True)
        interfaces = [item["name"] for item in json.loads(inspect.stdout)["interfaces"]]
        assert sorted(interfaces) == [f"{namespace}/first", f"{namespace}/second"]
        left = cluster.kubectl("exec", "-n", namespace, "second", "--", "sh", "-c",
                               "ls -a /tmp").stdout.decode()
        assert ".multisniff" not in left
