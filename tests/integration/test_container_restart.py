"""A target container killed mid-capture, in each mode, on the real cluster: the datagrams sent
just before the kill must be in the file, and those sent after the restart too.

100 marked datagrams go to the pod at 1,000/s, its container's first process is killed with
SIGKILL from the host (as `ctr tasks kill -s SIGKILL` does) 100 ms after the last one, the
kubelet restarts it, and 100 more go once it runs again. The upload mode's tcpdump dies with the
container: its capture ends "by a container restart" and a new one starts on a new interface.
The ephemeral mode's tcpdump runs in a PID namespace of its own: one interface throughout.
tshark counts the markers per interface."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, wait_for, workload_pod

pytestmark = pytest.mark.cluster

MULTISNIFF = Path(sys.executable).parent / "multisniff"
TOOLS_IMAGE = "multisniff.local/tools:1"
CTR = ["ctr", "--address", "/run/multisniff-containerd/containerd.sock", "-n", "k8s.io"]
PORT = 9431
COUNT = 100
RATE = 1000.0
KILL_AFTER = 0.1


def send(ip: str, phase: str) -> None:
    """COUNT datagrams "MSNF <phase> <seq>" to the pod at RATE per second, from the host."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        began = time.monotonic()
        for seq in range(1, COUNT + 1):
            sock.sendto(f"MSNF {phase} {seq}".encode(), (ip, PORT))
            pause = began + seq / RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def container_status(cluster: Any, namespace: str, pod: str) -> dict[str, Any]:
    status = cluster.kubectl_json("get", "pod", pod, "-n", namespace)["status"]
    (container,) = status["containerStatuses"]
    return dict(container)


def task_pid(container_id: str) -> int:
    """The host PID of a container's first process, as containerd knows it."""
    for line in subprocess.run([*CTR, "tasks", "ls"], capture_output=True, text=True,
                               check=True, timeout=30).stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"containerd runs no task {container_id}")


def markers(pcap: Path) -> collections.Counter[tuple[str, str]]:
    """(interface name, phase) -> datagrams to PORT, each marker counted once."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"udp.dstport == {PORT}", "-T", "fields",
         "-E", "separator=\t", "-e", "frame.interface_name", "-e", "data.data"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    seen: set[tuple[str, str]] = set()
    for line in out.splitlines():
        interface, _, data = line.partition("\t")
        seen.add((interface, bytes.fromhex(data.strip()).decode()))
    return collections.Counter((interface, text.split()[1]) for interface, text in seen)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["upload", "ephemeral"])
def test_the_datagrams_before_a_container_is_killed_are_kept(
        cluster: Any, tmp_path: Path, mode: str) -> None:
    with throwaway_namespace(cluster, f"msx-restart-{mode[:3]}") as namespace:
        pod = workload_pod("sink", namespace,
                           command=["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"])
        pod["spec"]["restartPolicy"] = "Always"
        ip = apply_and_wait(cluster, [pod])[f"{namespace}/sink"]
        label = f"{namespace}/sink"

        output, summary, log = (tmp_path / "out.pcapng", tmp_path / "summary.json",
                                tmp_path / "stderr.log")
        argv = [str(MULTISNIFF), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
                "-l", "app=sink", "--mode", mode, "-f", f"udp port {PORT}", "-o", str(output),
                "--summary-json", str(summary)]
        if mode == "ephemeral":
            argv += ["--ephemeral-image", TOOLS_IMAGE]
        with log.open("wb") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path)
        try:
            wait_for(log, f"Capturing {label}", process, 120)
            before = container_status(cluster, namespace, "sink")
            pid = task_pid(before["containerID"].removeprefix("containerd://"))

            send(ip, "before")
            time.sleep(KILL_AFTER)
            os.kill(pid, signal.SIGKILL)

            deadline = time.monotonic() + 120
            while True:
                now = container_status(cluster, namespace, "sink")
                if now.get("restartCount", 0) > before.get("restartCount", 0) and \
                        now["containerID"] != before["containerID"] and "running" in now["state"]:
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.3)
            if mode == "upload":  # a new capture, once its tcpdump listens in the new container
                wait_for(log, f"Capturing {label}", process, 120, times=2)
            send(ip, "after")
            time.sleep(2)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    counts = markers(output)
    report = json.loads(summary.read_text())
    runs = [(run["interface"], run["state"], run["ended_by"], run["restarts"])
            for run in report["pods"]]
    print(f"\n{mode}: markers per (interface, phase) {dict(counts)}; runs {runs}")
    assert report["totals"]["failed"] == 0, report["pods"]
    if mode == "upload":
        assert counts == {(label, "before"): COUNT, (f"{label}#2", "after"): COUNT}, counts
        assert runs == [(label, "ended", "a container restart", 0), (label, "done", "", 0)]
    else:
        assert counts == {(label, "before"): COUNT, (label, "after"): COUNT}, counts
        assert runs == [(label, "done", "", 1)]
