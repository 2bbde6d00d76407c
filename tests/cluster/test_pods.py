"""The cluster runs labelled pods, selects them by label, and streams exec output byte for byte."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

import pytest
from conftest import PAUSE_IMAGE

pytestmark = pytest.mark.cluster


def test_labelled_pods_run_with_pod_ips_and_are_selected(cluster, namespace, run_pod):
    run_pod("web-1", "web-2", "web-3", namespace=namespace, image=PAUSE_IMAGE,
            labels={"app": "web", "tier": "front"})
    run_pod("db-1", namespace=namespace, image=PAUSE_IMAGE, labels={"app": "db"})

    selected = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]

    assert sorted(p["metadata"]["name"] for p in selected) == ["web-1", "web-2", "web-3"]
    node_range = ipaddress.ip_network(cluster.node_pod_cidr)
    ips = [p["status"]["podIP"] for p in selected]
    assert all(p["status"]["phase"] == "Running" for p in selected)
    assert all(ipaddress.ip_address(ip) in node_range for ip in ips), ips
    assert len(set(ips)) == 3
    assert {p["spec"]["nodeName"] for p in selected} == {cluster.node_name}
    node = cluster.kubectl_json("get", "node", cluster.node_name)
    assert node["spec"]["podCIDR"] == cluster.node_pod_cidr


def test_exec_streams_every_byte_value_both_ways(cluster, namespace, run_pod, tools_image):
    run_pod("shell", namespace=namespace, image=tools_image, command=["sleep", "3600"])
    # Every byte value, then 1 MiB of noise: NULs, CRs, invalid UTF-8, frame-sized runs.
    payload = bytes(range(256)) * 16 + os.urandom(1 << 20)

    cluster.kubectl("exec", "-i", "shell", "-n", namespace, "--",
                    "sh", "-c", "cat > /tmp/payload", input=payload)
    echoed = cluster.kubectl("exec", "shell", "-n", namespace, "--", "cat", "/tmp/payload")

    assert len(echoed.stdout) == len(payload)
    assert echoed.stdout == payload


def test_exec_reports_the_remote_exit_status(cluster, namespace, run_pod, tools_image):
    run_pod("shell", namespace=namespace, image=tools_image, command=["sleep", "3600"])

    result = cluster.kubectl("exec", "shell", "-n", namespace, "--", "sh", "-c", "exit 7",
                             check=False)

    assert result.returncode == 7


def test_tcpdump_over_exec_is_a_capture_tshark_reads(cluster, namespace, run_pod, tools_image,
                                                     tmp_path):
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    run_pod("shell", namespace=namespace, image=tools_image, command=["sleep", "3600"])
    has_tcpdump = cluster.kubectl("exec", "shell", "-n", namespace, "--", "sh", "-c",
                                  "command -v tcpdump", check=False)
    if has_tcpdump.returncode != 0:
        pytest.skip(f"{tools_image} has no tcpdump")

    # Traffic on the pod's own loopback only: nothing leaves the pod, let alone the node.
    capture = cluster.kubectl(
        "exec", "shell", "-n", namespace, "--", "sh", "-c",
        "(sleep 1; ping -c 5 -i 0.2 127.0.0.1 >/dev/null) & "
        "exec tcpdump -Z root -i lo -U -w - -c 10 icmp 2>/dev/null",
        timeout=60,
    ).stdout
    pcap = tmp_path / "lo.pcap"
    pcap.write_bytes(capture)

    read = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "icmp.type"],
                          capture_output=True, text=True, check=True)
    assert sorted(read.stdout.split()) == ["0"] * 5 + ["8"] * 5
