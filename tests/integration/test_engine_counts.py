"""Every datagram once, under the right pod: the real `multisniff -A` over pods in two
namespaces, in upload mode, while a sender gives each pod exactly N marked datagrams. tshark
reads the file back; the per-pod counts of --summary-json must agree with it."""

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
from workloads import apply_and_wait, tshark_markers, wait_for, workload_pod

pytestmark = pytest.mark.cluster

MULTISNIFF = Path(sys.executable).parent / "multisniff"
PORT = 9417
COUNT = 25


def test_all_namespaces_capture_has_every_datagram_once_under_its_pod(
        cluster: Any, tmp_path: Path) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    label = f"msnf-counts-{secrets.token_hex(3)}"
    with throwaway_namespace(cluster, "msx-counts-a") as ns_a, \
            throwaway_namespace(cluster, "msx-counts-b") as ns_b:
        listen = ["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"]
        targets = [(ns_a, "target-1"), (ns_a, "target-2"), (ns_b, "target-3")]
        docs = [workload_pod(name, ns, labels={label: "x"}, command=listen)
                for ns, name in targets]
        docs.append(workload_pod("sender", ns_b, labels={"role": "sender"},
                                 command=["sleep", "3600"]))
        every_ip = apply_and_wait(cluster, docs)
        ips = {f"{ns}/{name}": every_ip[f"{ns}/{name}"] for ns, name in targets}

        output, summary, log = (tmp_path / "out.pcapng", tmp_path / "summary.json",
                                tmp_path / "stderr.log")
        env = {**os.environ, "MULTISNIFF_BUNDLES": str(tmp_path / "bundles")}
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [str(MULTISNIFF), "--kubeconfig", str(cluster.kubeconfig), "-A",
                 "-l", f"{label}=x", "--mode", "upload", "--duration", "15", "--no-follow",
                 "-o", str(output), "--summary-json", str(summary)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                cwd=tmp_path)
        try:
            # The duration timer starts once every capture has started: then all of them see
            # everything sent from now on.
            wait_for(log, "Capturing for", process, 90)
            for interface, ip in ips.items():
                # The marker names the pod the datagrams are meant for; sequence numbers start at 1.
                cluster.kubectl("exec", "sender", "-n", ns_b, "--", "workload", "udp",
                                "-targets", f"{ip}:{PORT}", "-count", str(COUNT),
                                "-rate", "100", "-pod", interface, "-report", "0",
                                timeout=60)
            assert process.wait(timeout=90) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    rows = tshark_markers(output, PORT)
    per_marker = collections.Counter(rows)
    assert all(seen == 1 for seen in per_marker.values()), \
        [row for row, seen in per_marker.items() if seen > 1]
    for interface in ips:
        expected = {(interface, f"MSNF {interface} {seq}") for seq in range(1, COUNT + 1)}
        got = {row for row in per_marker if row[1].startswith(f"MSNF {interface} ")}
        assert got == expected, (interface, sorted(expected - got), sorted(got - expected))

    report = json.loads(summary.read_text())
    assert report["exit_code"] == 0 and report["totals"]["captured"] == len(ips), report
    packets_per_interface = collections.Counter(
        line for line in subprocess.run(
            ["tshark", "-r", str(output), "-T", "fields", "-e", "frame.interface_name"],
            capture_output=True, text=True, check=True, timeout=60).stdout.splitlines())
    by_interface = {pod["interface"]: pod for pod in report["pods"]}
    assert set(by_interface) == set(ips), report["pods"]
    for interface, pod in by_interface.items():
        assert pod["state"] == "done" and pod["mode"] == "upload", pod
        assert pod["packets"] == packets_per_interface[interface] >= COUNT, \
            (interface, pod, packets_per_interface)
