"""Measure how many packets sent just before a target container is killed reach the capture file.

Why: chaos tests kill containers, and the packets just before a crash are the ones a recording
exists for. Each round creates a pod (tools image: sh, tcpdump; `restartPolicy: Always`), starts
a capture of it, sends --count marked UDP datagrams to it from this host at --rate per second,
kills the container's first process with SIGKILL from the host (as `ctr tasks kill -s SIGKILL`
does) --kill-after seconds after the last one, waits for the restart, stops the capture and
counts the markers in the file with tshark. Sides:

- baseline: what a user would write, `kubectl exec POD -- tcpdump -U -w - -i any FILTER > FILE`;
- upload, ephemeral: `multisniff --mode M -o FILE` (the multisniff next to this Python, or
  --multisniff PATH, e.g. another checkout's, to compare commits).

Needs root (the kill), KUBECONFIG and kubectl on PATH (`eval "$(tests/cluster/clusterctl env)"`),
tshark. `python benchmarks/crash_loss.py --rounds 3` prints one line per side and round and the
totals.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS_IMAGE = "multisniff.local/tools:1"
CTR = ["ctr", "--address", "/run/multisniff-containerd/containerd.sock", "-n", "k8s.io"]
PORT = 9431


def kubectl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, check=True,
                          timeout=180).stdout.decode()


def status(namespace: str, pod: str) -> dict[str, Any]:
    obj = json.loads(kubectl("get", "pod", pod, "-n", namespace, "-o", "json"))
    return dict(obj["status"]["containerStatuses"][0])


def task_pid(container_id: str) -> int:
    out = subprocess.run([*CTR, "tasks", "ls"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    for line in out.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id.removeprefix("containerd://"):
            return int(pid)
    raise SystemExit(f"containerd runs no task {container_id}")


def send(ip: str, count: int, rate: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        began = time.monotonic()
        for seq in range(1, count + 1):
            sock.sendto(f"MSNF before {seq}".encode(), (ip, PORT))
            pause = began + seq / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def counted(path: Path) -> int:
    out = subprocess.run(["tshark", "-r", str(path), "-Y", f"udp.dstport == {PORT}", "-T",
                          "fields", "-e", "data.data"], capture_output=True, text=True,
                         timeout=60).stdout
    return len({line.strip() for line in out.splitlines() if line.strip()})


def wait_log(path: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text!r} in {path}:\n{path.read_text(errors='replace')}")
        time.sleep(0.1)


def round_once(side: str, namespace: str, workdir: Path, args: argparse.Namespace,
               index: int) -> int:
    name = f"crash-{side[:3]}-{index}"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
           "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                    "restartPolicy": "Always",
                    "containers": [{"name": "main", "image": TOOLS_IMAGE,
                                    "imagePullPolicy": "Never",
                                    "command": ["sleep", "3600"]}]}}
    kubectl("apply", "-f", "-", stdin=json.dumps(pod).encode())
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=120s", f"pod/{name}")
    ip = json.loads(kubectl("get", "pod", name, "-n", namespace, "-o", "json"))["status"][
        "podIP"]
    out, log = workdir / f"{name}.pcap", workdir / f"{name}.log"
    if side == "baseline":
        argv = ["kubectl", "exec", "-n", namespace, name, "--", "tcpdump", "-U", "-w", "-",
                "-i", "any", f"udp port {PORT}"]
        listening = "listening on"
    else:
        argv = [args.multisniff, "-n", namespace, "-l", f"app={name}", "--mode", side,
                "--ephemeral-image", TOOLS_IMAGE, "-f", f"udp port {PORT}", "-o", str(out),
                "--no-follow"]
        listening = "Capturing "
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                   stdout=stdout if side == "baseline" else subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        wait_log(log, listening, 120)
        time.sleep(0.5)
        before = status(namespace, name)
        pid = task_pid(before["containerID"])
        send(ip, args.count, args.rate)
        time.sleep(args.kill_after)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while status(namespace, name).get("restartCount", 0) == before.get("restartCount", 0):
            if time.monotonic() > deadline:
                raise SystemExit(f"{namespace}/{name} did not restart")
            time.sleep(0.3)
        time.sleep(1)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    return counted(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", default=["baseline", "upload", "ephemeral"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000.0, help="datagrams per second")
    parser.add_argument("--kill-after", type=float, default=0.1,
                        help="seconds from the last datagram to the kill")
    parser.add_argument("--multisniff", default=str(Path(sys.executable).parent / "multisniff"))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/multisniff-crash-loss"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    namespace = f"msnf-crash-{secrets.token_hex(3)}"
    kubectl("create", "namespace", namespace)
    deadline = time.monotonic() + 30
    while subprocess.run(["kubectl", "get", "serviceaccount", "default", "-n", namespace],
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no default ServiceAccount in {namespace}")
        time.sleep(0.3)
    totals: dict[str, list[int]] = {side: [] for side in args.sides}
    try:
        for index in range(args.rounds):
            for side in args.sides:
                kept = round_once(side, namespace, args.workdir, args, index)
                totals[side].append(kept)
                print(f"{side} round {index + 1}: {kept} of {args.count} sent "
                      f"{args.kill_after * 1000:.0f} ms before the kill are in the file",
                      flush=True)
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")
    for side, got in totals.items():
        print(f"{side}: {sum(got)} of {args.count * len(got)} kept ({got})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
