"""The engine's entry point on the real cluster: a capture started and awaited from Python
(`multisniff.capture`), and auto falling back on a client that cannot make an upload bundle
(no gcc, apt or dpkg on PATH, an empty bundle cache). tshark counts the packets."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, tshark_markers, wait_for, workload_pod

import multisniff

pytestmark = pytest.mark.cluster

TOOLS_IMAGE = "multisniff.local/tools:1"
COREDNS_IMAGE = "multisniff.local/coredns:1"
PORT = 9431


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def coredns_pod(name: str, namespace: str, label: str) -> dict[str, Any]:
    """CoreDNS: no shell, so only the ephemeral mode can capture it."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {label: "x"}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "dnsPolicy": "None", "dnsConfig": {"nameservers": ["127.0.0.1"]},
                 "containers": [{"name": "coredns", "image": COREDNS_IMAGE,
                                 "imagePullPolicy": "Never",
                                 "args": ["-conf", "/etc/coredns/Corefile"]}]},
    }


def send(cluster: Any, namespace: str, ips: list[str], count: int) -> None:
    """`count` marked datagrams to each of `ips` (the sender takes them in turn)."""
    cluster.kubectl("exec", "sender", "-n", namespace, "--", "workload", "udp", "-targets",
                    ",".join(f"{ip}:{PORT}" for ip in ips), "-count", str(count * len(ips)),
                    "-rate", "100", "-pod", "sender", "-report", "0", timeout=90)


@pytest.fixture
def workload(cluster: Any) -> Any:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    label = f"msnf-api-{secrets.token_hex(3)}"
    with throwaway_namespace(cluster, "msx-api") as namespace:
        listen = ["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"]
        ips = apply_and_wait(cluster, [
            workload_pod("sink", namespace, labels={label: "x"}, command=listen),
            coredns_pod("dns", namespace, label),
            workload_pod("sender", namespace, labels={"role": "sender"},
                         command=["sleep", "3600"]),
        ])
        yield {"namespace": namespace, "label": label, "sink": ips[f"{namespace}/sink"],
               "dns": ips[f"{namespace}/dns"]}


@pytest.mark.anyio
async def test_a_capture_started_and_awaited_from_python(cluster: Any, workload: Any,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTISNIFF_BUNDLES", str(tmp_path / "bundles"))
    namespace, out = workload["namespace"], tmp_path / "api.pcapng"
    async with multisniff.capture(f"{workload['label']}=x", namespace=namespace, output=out,
                                  kubeconfig=str(cluster.kubeconfig),
                                  ephemeral_image=TOOLS_IMAGE, filter=f"udp port {PORT}",
                                  stop_grace=30) as cap:
        with anyio.fail_after(180):
            await cap.ready(timeout=150)
        assert {run.label: run.state for run in cap.pods} == {
            f"{namespace}/sink": "capturing", f"{namespace}/dns": "capturing"}
        await anyio.to_thread.run_sync(send, cluster, namespace,
                                       [workload["sink"], workload["dns"]], 30)
        await anyio.sleep(2)
        cap.stop("sent everything")
        result = await cap.wait()

    assert result.exit_code == 0, result
    assert result.stop_reason == "sent everything"
    modes = {run.label: run.mode for run in result.runs}
    assert modes == {f"{namespace}/sink": "upload", f"{namespace}/dns": "ephemeral"}
    rows = tshark_markers(out, PORT)
    for pod in ("sink", "dns"):
        markers = [marker for interface, marker in rows if interface == f"{namespace}/{pod}"]
        assert len(markers) == len(set(markers)) == 30, (pod, markers)
    assert {run.label: run.packets for run in result.runs} == {
        f"{namespace}/sink": 30, f"{namespace}/dns": 30}


NO_SHIPPED_BUNDLES = (
    "import pathlib, sys\n"
    "from multisniff.capture import bundlestore\n"
    "bundlestore.SHIPPED_DIR = pathlib.Path(sys.argv[1])\n"
    "from multisniff.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n")


def test_auto_falls_back_on_a_client_that_cannot_make_a_bundle(cluster: Any, workload: Any,
                                                               tmp_path: Path) -> None:
    """No gcc, apt or dpkg on PATH and an empty bundle cache: --dry-run and a capture still
    work, every pod with a mode and the reason for it."""
    namespace = workload["namespace"]
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "MULTISNIFF_BUNDLES": str(tmp_path / "bundles")}
    # As installed from a wheel built where no bundle could be made: no shipped bundles either.
    common = [sys.executable, "-c", NO_SHIPPED_BUNDLES, str(empty), "-l",
              f"{workload['label']}=x", "-n",
              namespace, "--kubeconfig", str(cluster.kubeconfig), "--ephemeral-image",
              TOOLS_IMAGE]
    dry = subprocess.run([*common, "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr
    lines = {line.split(":")[0].strip(): line for line in dry.stdout.splitlines()}
    sink, dns = lines[f"{namespace}/sink"], lines[f"{namespace}/dns"]
    assert "would capture with mode ephemeral" in sink
    assert "container main could take tcpdump, but" in sink and "gcc" in sink
    assert "would capture with mode ephemeral" in dns
    assert "container coredns has no shell (sh)" in dns

    out, summary = tmp_path / "fallback.pcapng", tmp_path / "summary.json"
    with (tmp_path / "stderr.log").open("wb") as stderr:
        capture = subprocess.Popen(
            [*common, "-o", str(out), "-f", f"udp port {PORT}", "--summary-json",
             str(summary)], env=env, stderr=stderr)
        try:
            log = tmp_path / "stderr.log"
            wait_for(log, f"Capturing {namespace}/sink", capture, 180)
            wait_for(log, f"Capturing {namespace}/dns", capture, 180)
            send(cluster, namespace, [workload["sink"], workload["dns"]], 20)
            time.sleep(2)  # tcpdump gets what the kernel holds back at most a second later
        finally:
            capture.send_signal(2)
            code = capture.wait(timeout=120)
    assert code == 130, (tmp_path / "stderr.log").read_text()
    data = json.loads(summary.read_text())
    pods = {f"{p['namespace']}/{p['pod']}": p for p in data["pods"]}
    assert {name: p["mode"] for name, p in pods.items()} == {
        f"{namespace}/sink": "ephemeral", f"{namespace}/dns": "ephemeral"}
    assert all(p["reason"] and p["state"] == "done" for p in pods.values()), pods
    rows = tshark_markers(out, PORT)
    for pod in ("sink", "dns"):
        assert len({m for interface, m in rows if interface == f"{namespace}/{pod}"}) == 20


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_example_runs(cluster: Any, tmp_path: Path) -> None:
    """The Python example of the README, as a user would paste it, against the demo's web
    pods; capinfos reads what it wrote."""
    text = README.read_text()
    start = text.index("<!-- api-example -->")
    block = text[start:text.index("<!-- /api-example -->")]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    webs = cluster.kubectl("get", "pods", "-n", "demo", "-l", "app=web", "-o",
                           "jsonpath={.items[*].metadata.name}").stdout.decode().split()
    assert webs, "the cluster runs the demo workload (clusterctl demo)"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "MULTISNIFF_BUNDLES": str(tmp_path / "bundles")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("capturing demo/web-"), run.stdout
    for name in webs:
        assert f"demo/{name}: " in run.stdout and "mode upload" in run.stdout, run.stdout
    info = subprocess.run(["capinfos", "-c", "-I", str(tmp_path / "web.pcapng")],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert all(f"demo/{name}" in info.stdout for name in webs), info.stdout
