"""The demo workload on the real cluster: CoreDNS answers the clients and nobody upstream, the
tools image captures, and the workload image runs (and runs the upload bundle) without a libc.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from multisniff.capture.bundle import build_bundle

if TYPE_CHECKING:
    from conftest import Cluster  # tests/conftest.py

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MANIFEST = Path(__file__).resolve().parent / "manifests" / "demo.yaml"
WORKLOAD = "multisniff.local/workload:1"
TOOLS = "multisniff.local/tools:1"
DEMO = "demo"
REPORT = re.compile(r"dns: (\d+) sent, (\d+) answered, (\d+) failed")


@pytest.fixture(scope="module")
def demo(cluster: Cluster) -> Cluster:
    """The demo applied (clusterctl up applies it too; applying again changes nothing) and Ready."""
    cluster.kubectl("apply", "-f", str(MANIFEST))
    for namespace, selector in [
        ("kube-system", "app=coredns"),
        (DEMO, "app=dns-client"),
        (DEMO, "app=web"),
        (DEMO, "app=http-client"),
        (DEMO, "app=udp-sink"),
    ]:
        cluster.kubectl(
            "rollout",
            "status",
            "deployment",
            "-n",
            namespace,
            "-l",
            selector,
            "--timeout=120s",
            timeout=130,
        )
    return cluster


def running(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and p["status"].get("podIP")
        and not p["metadata"].get("deletionTimestamp")
    ]


def exec_in(
    cluster: Cluster,
    pod: dict[str, Any],
    *argv: str,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    meta = pod["metadata"]
    flags = ["-i"] if input is not None else []
    return cluster.kubectl(
        "exec",
        *flags,
        meta["name"],
        "-n",
        meta["namespace"],
        "-c",
        pod["spec"]["containers"][0]["name"],
        "--",
        *argv,
        check=check,
        input=input,
        timeout=90,
    )


def text(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture
def scratch_pod(demo: Cluster) -> Iterator[Any]:
    """Start pods in the demo namespace for one test; delete them, and wait, at its end."""
    names: list[str] = []

    def start(image: str, args: list[str], *, command: list[str] | None = None) -> dict[str, Any]:
        name = f"check-{uuid.uuid4().hex[:8]}"
        container: dict[str, Any] = {
            "name": "main",
            "image": image,
            "imagePullPolicy": "Never",
            "args": args,
        }
        if command:
            container["command"] = command
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": DEMO, "labels": {"app": "workload-check"}},
            "spec": {
                "containers": [container],
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "dnsPolicy": "None",
                "dnsConfig": {"nameservers": ["127.0.0.1"]},
                "terminationGracePeriodSeconds": 0,
            },
        }
        names.append(name)
        demo.kubectl("apply", "-f", "-", input=json.dumps(pod).encode())
        demo.kubectl(
            "wait", f"pod/{name}", "-n", DEMO, "--for=condition=Ready", "--timeout=60s", timeout=70
        )
        return demo.kubectl_json("get", "pod", name, "-n", DEMO)

    yield start
    for name in names:
        demo.kubectl(
            "delete",
            "pod",
            name,
            "-n",
            DEMO,
            "--grace-period=0",
            "--wait=true",
            check=False,
            timeout=60,
        )
    leftover = demo.kubectl_json("get", "pods", "-n", DEMO, "-l", "app=workload-check")["items"]
    assert not [p["metadata"]["name"] for p in leftover if p["metadata"]["name"] in names]


def wait_for_log(cluster: Cluster, pod: dict[str, Any], pattern: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = cluster.kubectl(
            "logs", pod["metadata"]["name"], "-n", pod["metadata"]["namespace"], check=False
        ).stdout.decode(errors="replace")
        if re.search(pattern, logs):
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in the log of {pod['metadata']['name']}:\n{logs}")
        time.sleep(0.5)


# --- DNS ----------------------------------------------------------------------------------------


def test_every_coredns_pod_answers_a_client(demo: Cluster) -> None:
    coredns = running(demo, "kube-system", "app=coredns")
    assert len(coredns) >= 3
    client = running(demo, DEMO, "app=dns-client")[0]
    for server in coredns:
        ip = server["status"]["podIP"]
        result = exec_in(
            demo,
            client,
            "workload",
            "dns",
            "-targets",
            ip,
            "-count",
            "2",
            "-rate",
            "20",
            "-report",
            "0",
            "-pod",
            "check",
        )
        assert "2 sent, 2 answered, 0 failed" in text(result), text(result)


def test_a_client_finds_the_coredns_pods_through_the_api(demo: Cluster) -> None:
    client = running(demo, DEMO, "app=dns-client")[0]
    result = exec_in(
        demo,
        client,
        "workload",
        "dns",
        "-selector",
        "app=coredns",
        "-namespace",
        "kube-system",
        "-count",
        "6",
        "-rate",
        "20",
        "-report",
        "0",
        "-pod",
        "check",
    )
    out = text(result)
    assert "6 sent, 6 answered, 0 failed" in out, out
    ips = sorted(f"{p['status']['podIP']}:53" for p in running(demo, "kube-system", "app=coredns"))
    assert f"targets [{' '.join(ips)}]" in out


def test_the_running_clients_are_answered_continuously(demo: Cluster) -> None:
    clients = running(demo, DEMO, "app=dns-client")
    assert len(clients) >= 2
    for client in clients:
        logs = wait_for_log(demo, client, r"dns: \d+ sent, [1-9]\d* answered", timeout=40)
        sent, answered, failed = map(int, REPORT.findall(logs)[-1])
        assert answered > 0 and failed <= sent // 10, logs[-2000:]
    http_client = running(demo, DEMO, "app=http-client")[0]
    wait_for_log(demo, http_client, r"http: \d+ sent, [1-9]\d* ok", timeout=40)


def test_coredns_asks_nobody_upstream(demo: Cluster) -> None:
    client = running(demo, DEMO, "app=dns-client")[0]
    for server in running(demo, "kube-system", "app=coredns"):
        spec = server["spec"]["containers"][0]
        assert spec["args"] == ["-conf", "/etc/coredns/Corefile"]
        assert not spec.get("volumeMounts"), "the Corefile must be the image's own"
        # A name outside demo.test. is refused, not looked up elsewhere.
        refused = exec_in(
            demo,
            client,
            "workload",
            "dns",
            "-targets",
            server["status"]["podIP"],
            "-zone",
            "example.com",
            "-count",
            "1",
            "-report",
            "0",
            "-pod",
            "check",
            check=False,
        )
        assert refused.returncode == 1 and "rcode 5" in text(refused), text(refused)
        plugins = set(exec_in(demo, server, "/coredns", "-plugins").stdout.decode().split())
        assert "file" in plugins and not plugins & {"forward", "grpc", "etcd", "kubernetes"}


# --- images -------------------------------------------------------------------------------------


def test_tcpdump_from_the_tools_image_captures_marked_datagrams(
    demo: Cluster, scratch_pod: Any
) -> None:
    # No -Z: the image has the user tcpdump that Debian's tcpdump switches to.
    capture = scratch_pod(TOOLS, ["tcpdump", "-i", "eth0", "-n", "-l", "-c", "3", "udp port 9999"])
    wait_for_log(demo, capture, "listening on eth0")
    client = running(demo, DEMO, "app=dns-client")[0]
    exec_in(
        demo,
        client,
        "workload",
        "udp",
        "-targets",
        f"{capture['status']['podIP']}:9999",
        "-count",
        "3",
        "-rate",
        "20",
        "-report",
        "0",
        "-pod",
        "tools-check",
    )
    demo.kubectl(
        "wait",
        f"pod/{capture['metadata']['name']}",
        "-n",
        DEMO,
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout=30s",
        timeout=40,
    )
    logs = wait_for_log(demo, capture, "3 packets captured")
    length = len("MSNF tools-check 1")
    assert len(re.findall(rf" > [\d.]+\.9999: UDP, length {length}\b", logs)) == 3, logs


def test_the_workload_image_has_no_libc_yet_runs_the_bundle(
    demo: Cluster, scratch_pod: Any
) -> None:
    """The upload mode by hand: tar over exec stdin into a container without libc, then the
    bundled tcpdump, started through its own loader, captures what is sent to that pod."""
    target = scratch_pod(WORKLOAD, ["udp-listen", "-listen", ":9999", "-quiet"])
    found = exec_in(
        demo,
        target,
        "sh",
        "-c",
        "find / -xdev \\( -name 'libc.so*' -o -name 'ld-linux*' -o -name '*.so' \\) -print",
    )
    assert found.stdout.decode().split() == [], "the workload image carries a libc"

    bundle = build_bundle()
    root = f"/tmp/{bundle.directory_name}"
    exec_in(
        demo, target, "sh", "-c", f"mkdir -p {root} && tar -xzf - -C {root}", input=bundle.targz
    )
    argv = bundle.command(
        "tcpdump", ["-i", "eth0", "-n", "-l", "-c", "4", "udp port 9999"], root=root
    )
    meta = target["metadata"]
    capture = subprocess.Popen(
        [
            str(demo.kubectl_path),
            f"--kubeconfig={demo.kubeconfig}",
            "exec",
            meta["name"],
            "-n",
            DEMO,
            "--",
            *argv,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(3)  # tcpdump opens eth0; nothing is sent before it listens
        client = running(demo, DEMO, "app=dns-client")[0]
        exec_in(
            demo,
            client,
            "workload",
            "udp",
            "-targets",
            f"{target['status']['podIP']}:9999",
            "-count",
            "4",
            "-rate",
            "20",
            "-report",
            "0",
            "-pod",
            "upload-check",
        )
        out, err = capture.communicate(timeout=60)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    assert capture.returncode == 0, err.decode(errors="replace")
    assert b"4 packets captured" in err
    length = len("MSNF upload-check 1")
    assert len(re.findall(rf" > [\d.]+\.9999: UDP, length {length}\b".encode(), out)) == 4, out
