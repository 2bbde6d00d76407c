"""Capture modes on the real cluster: tcpdump uploaded into a container without libc, and run
from an ephemeral container next to one without a shell; what each leaves behind (nothing), and
what auto picks. Packets are counted by tshark, a reader nobody here wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from kubenamespace import throwaway_namespace

from multisniff.capture.auto import AutoMode
from multisniff.capture.ephemeral import EphemeralMode
from multisniff.capture.model import CaptureSpec, Target
from multisniff.capture.upload import UploadMode
from multisniff.kube.api import connect
from multisniff.kube.model import PodSelector

pytestmark = pytest.mark.cluster

WORKLOAD_IMAGE = "multisniff.local/workload:1"
COREDNS_IMAGE = "multisniff.local/coredns:1"
TOOLS_IMAGE = "multisniff.local/tools:1"
PORT = 9999


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pod(name: str, namespace: str, image: str, container: str, *,
         command: list[str] | None = None, args: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": container, "image": image, "imagePullPolicy": "Never"}
    if command:
        spec["command"] = command
    if args:
        spec["args"] = args
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "dnsPolicy": "None", "dnsConfig": {"nameservers": ["127.0.0.1"]},
                 "containers": [spec]},
    }


@pytest.fixture(scope="module")
def pods(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A UDP sink and a sender (workload image, busybox and no libc) and a CoreDNS (no shell)."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    old = os.environ.get("MULTISNIFF_BUNDLES")
    os.environ["MULTISNIFF_BUNDLES"] = str(tmp_path_factory.mktemp("bundles"))
    with throwaway_namespace(cluster, "msx-capture") as namespace:
        docs = [
            _pod("sink", namespace, WORKLOAD_IMAGE, "app",
                 command=["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"]),
            _pod("sender", namespace, WORKLOAD_IMAGE, "app", command=["sleep", "3600"]),
            _pod("dns", namespace, COREDNS_IMAGE, "coredns",
                 args=["-conf", "/etc/coredns/Corefile"]),
        ]
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": docs}).encode())
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s",
                        "pod/sink", "pod/sender", "pod/dns", timeout=90)
        sink = cluster.kubectl_json("get", "pod", "sink", "-n", namespace)
        yield {"namespace": namespace, "sink_ip": sink["status"]["podIP"]}
    if old is None:
        del os.environ["MULTISNIFF_BUNDLES"]
    else:
        os.environ["MULTISNIFF_BUNDLES"] = old


def send_marked(cluster: Any, namespace: str, ip: str, count: int) -> None:
    cluster.kubectl("exec", "sender", "-n", namespace, "--", "workload", "udp",
                    "-targets", f"{ip}:{PORT}", "-count", str(count), "-rate", "50",
                    "-pod", "sender", "-report", "0", timeout=60)


def tshark_markers(pcap: Path) -> list[str]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"udp.dstport == {PORT}", "-T", "fields",
         "-e", "data.data"], capture_output=True, text=True, check=True, timeout=60).stdout
    return [bytes.fromhex(line.strip()).decode() for line in out.splitlines() if line.strip()]


def leftovers(cluster: Any, namespace: str, pod: str, container: str) -> str:
    """tcpdump processes and bundle directories still in the container ("" when none)."""
    out = cluster.kubectl(
        "exec", pod, "-n", namespace, "-c", container, "--", "sh", "-c",
        "ps -o pid,args | grep -e tcpdump -e msnf-watchdog | grep -v grep; "
        "ls -a /tmp | grep multisniff; true").stdout.decode()
    return out.strip()


async def _target(kube: Any, namespace: str, name: str, container: str) -> Target:
    listed = await kube.list_pods(PodSelector(namespace, f"app={name}"))
    (pod,) = listed.pods
    return Target(pod, container)


@pytest.mark.anyio
async def test_upload_captures_exactly_the_marked_datagrams_and_leaves_nothing(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    namespace = pods["namespace"]
    async with connect(str(cluster.kubeconfig)) as kube:
        mode = UploadMode(kube)
        target = await _target(kube, namespace, "sink", "app")
        assessment = await mode.assess(target)
        assert assessment.usable, assessment.reason
        assert assessment.reason == "container app has tar and runs as root"

        idle = CaptureSpec(interface="lo", bpf_filter="tcp port 9", lifetime=120)
        marked = CaptureSpec(interface="any", bpf_filter=f"udp dst port {PORT}",
                             packet_count=7, lifetime=120)
        async with mode.open(target, idle) as first:
            sent_once = mode.bytes_uploaded
            assert sent_once > 1 << 20
            # The second capture finds the first one's bundle and sends nothing.
            async with mode.open(target, marked) as second:
                assert mode.bytes_uploaded == sent_once
                await anyio.sleep(2)
                await anyio.to_thread.run_sync(send_marked, cluster, namespace,
                                               pods["sink_ip"], 7)
                pcap = bytearray()
                with anyio.fail_after(30):
                    while chunk := await second.read():
                        pcap += chunk
                report = await second.wait()
            await first.stop()
            with anyio.fail_after(30):
                while await first.read():
                    pass
            first_report = await first.wait()

    assert report.exit_code == 0, report.message
    assert report.captured == 7
    assert first_report.exit_code == 0 and first_report.captured == 0, first_report
    path = tmp_path / "marked.pcap"
    path.write_bytes(pcap)
    markers = tshark_markers(path)
    assert len(markers) == len(set(markers)) == 7, markers
    assert all(m.startswith("MSNF sender ") for m in markers), markers
    deadline = time.monotonic() + 15
    while (left := leftovers(cluster, namespace, "sink", "app")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == ""


KILLED_CLIENT = textwrap.dedent("""
    import sys, anyio
    from multisniff.capture.model import CaptureSpec, Target
    from multisniff.capture.upload import UploadMode
    from multisniff.kube.api import connect
    from multisniff.kube.model import PodSelector

    async def main(kubeconfig, namespace):
        async with connect(kubeconfig) as kube:
            (pod,) = (await kube.list_pods(PodSelector(namespace, "app=sink"))).pods
            mode = UploadMode(kube)
            spec = CaptureSpec(interface="lo", bpf_filter="tcp port 9", lifetime=10)
            async with mode.open(Target(pod, "app"), spec) as capture:
                print("capturing", flush=True)
                while await capture.read():
                    pass
                await anyio.sleep(3600)

    anyio.run(main, *sys.argv[1:])
""")


def test_a_client_killed_with_sigkill_leaves_nothing_after_the_lifetime(
        cluster: Any, pods: dict[str, Any]) -> None:
    namespace = pods["namespace"]
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(cluster.kubeconfig), namespace],
        stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "capturing"
        assert "tcpdump" in leftovers(cluster, namespace, "sink", "app")
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
        if client.stdout is not None:
            client.stdout.close()
    time.sleep(10 + 5 + 1)  # lifetime + the watchdog's grace + a second
    assert leftovers(cluster, namespace, "sink", "app") == ""


def ephemeral_states(cluster: Any, namespace: str, pod: str) -> dict[str, dict[str, Any]]:
    obj = cluster.kubectl_json("get", "pod", pod, "-n", namespace)
    return {s["name"]: s.get("state", {})
            for s in obj["status"].get("ephemeralContainerStatuses", [])}


def send_queries(cluster: Any, namespace: str, ip: str, count: int) -> None:
    cluster.kubectl("exec", "sender", "-n", namespace, "--", "workload", "dns",
                    "-targets", f"{ip}:53", "-count", str(count), "-rate", "20",
                    "-report", "0", timeout=60, check=False)


@pytest.mark.anyio
async def test_ephemeral_captures_next_to_a_container_without_shell_and_ends(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    namespace = pods["namespace"]
    dns_ip = cluster.kubectl_json("get", "pod", "dns", "-n", namespace)["status"]["podIP"]
    before = set(ephemeral_states(cluster, namespace, "dns"))
    async with connect(str(cluster.kubeconfig)) as kube:
        mode = EphemeralMode(kube, image=TOOLS_IMAGE)
        target = await _target(kube, namespace, "dns", "coredns")
        assessment = await mode.assess(target)
        assert assessment.usable, assessment.reason
        spec = CaptureSpec(interface="any", bpf_filter="udp port 53", packet_count=4,
                           lifetime=120)
        async with mode.open(target, spec) as capture:
            await anyio.sleep(2)
            await anyio.to_thread.run_sync(send_queries, cluster, namespace, dns_ip, 2)
            pcap = bytearray()
            with anyio.fail_after(30):
                while chunk := await capture.read():
                    pcap += chunk
            report = await capture.wait()

    assert report.exit_code == 0, report.message
    assert report.captured == 4
    path = tmp_path / "dns.pcap"
    path.write_bytes(pcap)
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "dns", "-T", "fields",
                          "-e", "dns.flags.response"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert sorted(out) in (["0", "0", "1", "1"], ["False", "False", "True", "True"]), out
    added = set(ephemeral_states(cluster, namespace, "dns")) - before
    assert len(added) == 1
    (name,) = added
    deadline = time.monotonic() + 30
    while "terminated" not in ephemeral_states(cluster, namespace, "dns")[name]:
        assert time.monotonic() < deadline, ephemeral_states(cluster, namespace, "dns")
        time.sleep(0.5)
    # The target container was never signalled.
    status = cluster.kubectl_json("get", "pod", "dns", "-n", namespace)["status"]
    assert status["containerStatuses"][0]["restartCount"] == 0
    assert "running" in status["containerStatuses"][0]["state"]


@pytest.mark.anyio
async def test_auto_picks_upload_for_the_workload_and_ephemeral_for_coredns(
        cluster: Any, pods: dict[str, Any]) -> None:
    namespace = pods["namespace"]
    async with connect(str(cluster.kubeconfig)) as kube:
        auto = AutoMode(UploadMode(kube), EphemeralMode(kube, image=TOOLS_IMAGE))
        sink = await auto.assess(await _target(kube, namespace, "sink", "app"))
        dns = await auto.assess(await _target(kube, namespace, "dns", "coredns"))

    assert sink.reason == "upload: container app has tar and runs as root"
    assert dns.usable
    assert dns.reason == "ephemeral: container coredns has no shell (sh)"


@pytest.mark.anyio
async def test_an_ephemeral_sleeper_left_running_is_ended_in_its_own_pid_namespace(
        cluster: Any, pods: dict[str, Any]) -> None:
    # When a capture's stream broke before its shell left the done file, the sleeper is ended
    # by its PID: PID 1 of the ephemeral container, which traps SIGTERM. The target container,
    # in a PID namespace of its own, is never signalled.
    namespace = pods["namespace"]
    async with connect(str(cluster.kubeconfig)) as kube:
        mode = EphemeralMode(kube, image=TOOLS_IMAGE)
        target = await _target(kube, namespace, "sender", "app")
        await kube.add_ephemeral_container(target.pod.ref, mode.container_spec(
            "msnf-i13end", target, CaptureSpec(lifetime=600)))
        await kube.wait_container_running(target.pod.ref, "msnf-i13end", timeout=60)
        deadline = time.monotonic() + 30
        while cluster.kubectl("exec", "sender", "-n", namespace, "-c", "msnf-i13end", "--",
                              "cat", "/tmp/msnf-sleeper.pid", check=False).returncode != 0:
            assert time.monotonic() < deadline
            await anyio.sleep(0.3)
        sleeper = cluster.kubectl("exec", "sender", "-n", namespace, "-c", "msnf-i13end", "--",
                                  "cat", "/tmp/msnf-sleeper.pid").stdout.decode().strip()

        await mode._end_sleeper(target, "msnf-i13end")

    assert sleeper == "1"
    deadline = time.monotonic() + 30
    while "terminated" not in (state := ephemeral_states(cluster, namespace, "sender"))[
            "msnf-i13end"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    assert state["msnf-i13end"]["terminated"]["exitCode"] == 143
    status = cluster.kubectl_json("get", "pod", "sender", "-n", namespace)["status"]
    assert status["containerStatuses"][0]["restartCount"] == 0
