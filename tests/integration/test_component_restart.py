"""The API server stopped and started again, and the kubelet restarted, mid-capture, on the real
cluster (issue 10's faults): the capture's exec stream breaks, multisniff reconnects, resumes the
capture under an interface of the same name, marks the gap, and does not exit; afterwards no pod
labelled by multisniff exists, no tcpdump, watchdog or bundle is left in the target, the output
holds every datagram sent before the fault and after the resume, and the summary tells it.

These tests stop cluster components: run them alone, under the cluster's exclusive lock
(`flock -x /tmp/msnf-cluster.lock pytest tests/integration/test_component_restart.py`). The
component is started again whatever happens (`finally`)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, tshark_markers, wait_for, workload_pod

pytestmark = pytest.mark.cluster

CLUSTERCTL = Path(__file__).resolve().parents[1] / "cluster" / "clusterctl"
MANAGED = "app.kubernetes.io/managed-by=multisniff"
PORT = 9432
COUNT = 50
DOWN_FOR = 5.0
"""Seconds the API server stays down."""

# What the upload mode may leave in a target: its watchdog, tcpdump, the bundle directory.
LEFT = ("me=$$; for d in /proc/[0-9]*; do [ ${d#/proc/} = $me ] && continue; c=; "
        "IFS= read -r c < $d/cmdline; case $c in *msnf-watchdog*|*tcpdump*) echo ${d#/proc/};; "
        "esac; done 2>/dev/null; for f in /tmp/.multisniff-* /tmp/msnf-run-*; do "
        "[ -e \"$f\" ] && echo \"$f\"; done; true")


def clusterctl(*args: str) -> None:
    result = subprocess.run([str(CLUSTERCTL), *args], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr


def send(ip: str, phase: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seq in range(1, COUNT + 1):
            sock.sendto(f"MSNF {phase} {seq}".encode(), (ip, PORT))
            time.sleep(0.002)


def fault(component: str) -> None:
    """The fault, and the component back whatever happens."""
    try:
        if component == "kube-apiserver":
            clusterctl("stop", component)
            time.sleep(DOWN_FOR)
        else:
            clusterctl("stop", component)
    finally:
        clusterctl("start", component)


def left_in(cluster: Any, namespace: str, pod: str) -> list[str]:
    return cluster.kubectl("exec", pod, "-n", namespace, "--", "sh", "-c",
                           LEFT).stdout.decode().split()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("component", ["kube-apiserver", "kubelet"])
def test_a_restarted_component_breaks_the_stream_and_the_capture_resumes(
        cluster: Any, tmp_path: Path, component: str) -> None:
    with throwaway_namespace(cluster, f"msx-fault-{component[5:8]}") as namespace:
        pod = workload_pod("sink", namespace,
                           command=["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"])
        ip = apply_and_wait(cluster, [pod])[f"{namespace}/sink"]
        label = f"{namespace}/sink"
        output, summary, log = (tmp_path / "out.pcapng", tmp_path / "summary.json",
                                tmp_path / "stderr.log")
        argv = [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
                "-n", namespace, "-l", "app=sink", "--mode", "upload", "--events",
                "-f", f"udp port {PORT}", "-o", str(output), "--summary-json", str(summary)]
        with log.open("wb") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
        try:
            wait_for(log, f"Capturing {label}", process, 120)
            send(ip, "before")
            time.sleep(1.5)
            fault(component)
            wait_for(log, f"Capturing {label}", process, 180, times=2)
            send(ip, "after")
            time.sleep(2)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text()
        left = left_in(cluster, namespace, "sink")
        labelled = cluster.kubectl_json("get", "pods", "-A", "-l", MANAGED)["items"]

    counts = Counter((interface, marker.split()[1])
                     for interface, marker in set(tshark_markers(output, PORT)))
    report = json.loads(summary.read_text())
    runs = [(run["interface"], run["state"]) for run in report["pods"]]
    gaps = [event["text"] for event in report["events"] if event["kind"] == "gap"]
    print(f"\n{component}: markers {dict(counts)}; runs {runs}; gaps {gaps}; "
          f"left {left}; labelled {len(labelled)}")
    assert left == [], left
    assert [p["metadata"]["name"] for p in labelled] == []
    assert counts == {(label, "before"): COUNT, (f"{label}#2", "after"): COUNT}, counts
    assert runs == [(label, "interrupted"), (label, "done")], (runs, text)
    assert report["pods"][0]["ended_by"].startswith("a broken stream")
    assert report["pods"][1]["resumed"].startswith("after a gap of ")
    assert report["totals"]["failed"] == 0
    assert len(gaps) == 1 and gaps[0].startswith(f"gap in the capture of {label}: "), gaps
    assert "reconnecting for up to 120 s" in text
    if component == "kube-apiserver":  # the pod watch broke too, and went on
        assert "Following pods broke: Cannot reach the Kubernetes API" in text, text
        assert "Following pods again (1 match)." in text, text
