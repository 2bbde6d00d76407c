"""hostNetwork pods on the real cluster: two of them on the one node share the node's network, so
multisniff captures it once, says so, and names the pods it carries in the interface's
description; what one pod sends is in the capture of the other's interface. A third one that
appears during the capture is covered by it too, and said so."""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import WORKLOAD_IMAGE, apply_and_wait, wait_for

pytestmark = pytest.mark.cluster

MULTISNIFF = Path(sys.executable).parent / "multisniff"
PORT = 9443
COUNT = 10


def host_network_pod(name: str, namespace: str, label: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {label: "x"}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "hostNetwork": True,
                 "containers": [{"name": "main", "image": WORKLOAD_IMAGE,
                                 "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]},
    }


def test_two_host_network_pods_are_one_capture_of_the_node(cluster: Any, tmp_path: Path) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    label = f"msnf-hostnet-{secrets.token_hex(3)}"
    with throwaway_namespace(cluster, "msx-hostnet") as namespace:
        docs = [host_network_pod(name, namespace, label) for name in ("alpha", "beta")]
        apply_and_wait(cluster, docs)

        output, summary, log = (tmp_path / "out.pcapng", tmp_path / "summary.json",
                                tmp_path / "stderr.log")
        env = {**os.environ, "MULTISNIFF_BUNDLES": str(tmp_path / "bundles")}
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [str(MULTISNIFF), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
                 "-l", f"{label}=x", "--mode", "upload", "--duration", "15",
                 "-f", f"udp port {PORT}", "-o", str(output), "--summary-json", str(summary)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                cwd=tmp_path)
        try:
            wait_for(log, "Capturing for", process, 90)
            # gamma joins the node's network later: still the same one capture.
            cluster.kubectl("apply", "-f", "-", input=json.dumps(
                host_network_pod("gamma", namespace, label)).encode())
            wait_for(log, f"Not capturing {namespace}/gamma", process, 60)
            # beta sends on the node's loopback; the one capture (through alpha) must see it.
            cluster.kubectl("exec", "beta", "-n", namespace, "--", "workload", "udp",
                            "-targets", f"127.0.0.1:{PORT}", "-count", str(COUNT),
                            "-rate", "100", "-pod", "beta", "-report", "0", timeout=60)
            assert process.wait(timeout=90) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        messages = log.read_text()

    alpha, beta = f"{namespace}/alpha", f"{namespace}/beta"
    assert f"host network of node {cluster.node_name}: capturing that network once" in messages, \
        messages
    assert f"Not capturing {beta}: it uses the host network of node {cluster.node_name}, " \
        f"captured once with {alpha}." in messages, messages
    assert messages.count("Capturing ") == 2, messages  # alpha's, and "Capturing for"

    report = json.loads(summary.read_text())
    assert [pod["interface"] for pod in report["pods"]] == [alpha], report["pods"]
    assert sorted((s["pod"], s["reason"]) for s in report["skipped"]) == [
        (name, f"it uses the host network of node {cluster.node_name}, captured once with "
               f"{alpha}") for name in ("beta", "gamma")], report["skipped"]

    rows = subprocess.run(
        ["tshark", "-r", str(output), "-Y", f"udp.dstport == {PORT}", "-T", "fields",
         "-E", "separator=\t", "-e", "frame.interface_name", "-e", "frame.interface_description",
         "-e", "data.data"], capture_output=True, text=True, check=True, timeout=60).stdout
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    descriptions = set()
    for line in rows.splitlines():
        interface, description, data = line.split("\t")
        descriptions.add(description)
        seen[(interface, bytes.fromhex(data).decode())] += 1
    expected = {(alpha, f"MSNF beta {seq}") for seq in range(1, COUNT + 1)}
    # "any" on the node sees a loopback datagram once (lo is one interface).
    assert set(seen) == expected and set(seen.values()) == {1}, seen
    (description,) = descriptions
    assert f"node {cluster.node_name}" in description and \
        f"host network (shared with {beta})" in description, description
