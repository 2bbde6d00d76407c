"""A kubeconfig whose user is an exec credential plugin (client.authentication.k8s.io/v1) whose
tokens expire every few seconds, on the real cluster: a capture that lasts several expiries and
picks up a pod that appears half-way must ask the plugin again and keep capturing.

The token itself is a ServiceAccount's from the TokenRequest API (`kubectl create token`), bound
to the `admin` ClusterRole in a throwaway namespace; the plugin says it expires two seconds after
each call, so every later request of multisniff has to run the plugin again. The plugin writes a
line per call, with the time, to a counter file."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, wait_for, workload_pod

pytestmark = pytest.mark.cluster

MULTISNIFF = Path(sys.executable).parent / "multisniff"
PORT = 9431
COUNT = 20
LIFETIME = 2  # seconds the plugin says each token lives


def write_plugin(path: Path, token: str, counter: Path) -> None:
    path.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        # An exec credential plugin: one line per call in the counter, a token that "expires"
        # {LIFETIME} seconds from now.
        [ -n "$KUBERNETES_EXEC_INFO" ] || {{ echo "no KUBERNETES_EXEC_INFO" >&2; exit 1; }}
        echo "$(date +%s.%N)" >> '{counter}'
        expires=$(date -u -d "+{LIFETIME} seconds" +%Y-%m-%dT%H:%M:%SZ)
        printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
        printf '"status":{{"token":"%s","expirationTimestamp":"%s"}}}}\\n' '{token}' "$expires"
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def write_kubeconfig(cluster: Any, path: Path, plugin: Path, namespace: str) -> None:
    admin = cluster.kubectl_json("config", "view", "--raw", "--minify")
    server = admin["clusters"][0]["cluster"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": server}],
        "users": [{"name": "plugin-user", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
            "interactiveMode": "Never"}}}],
        "contexts": [{"name": "plugin", "context": {"cluster": "local", "user": "plugin-user",
                                                    "namespace": namespace}}],
        "current-context": "plugin",
    }))


def send(cluster: Any, namespace: str, ip: str, marker: str) -> None:
    cluster.kubectl("exec", "sender", "-n", namespace, "--", "workload", "udp",
                    "-targets", f"{ip}:{PORT}", "-count", str(COUNT), "-rate", "100",
                    "-pod", marker, "-report", "0", timeout=60)


def pod_ip(cluster: Any, namespace: str, name: str) -> str:
    return str(cluster.kubectl_json("get", "pod", name, "-n", namespace)["status"]["podIP"])


def test_capture_through_an_exec_plugin_outlives_its_tokens(
        cluster: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    label = f"msnf-exec-{secrets.token_hex(3)}"
    listen = ["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"]
    with throwaway_namespace(cluster, "msx-exec") as namespace:
        cluster.kubectl("create", "serviceaccount", "capturer", "-n", namespace)
        cluster.kubectl("create", "rolebinding", "capturer", "-n", namespace,
                        "--clusterrole=admin", f"--serviceaccount={namespace}:capturer")
        # The upload mode reads the target's node (its architecture): a cluster-wide read.
        request.addfinalizer(lambda: cluster.kubectl(
            "delete", "clusterrolebinding,clusterrole", label, check=False))
        cluster.kubectl("create", "clusterrole", label, "--verb=get,list", "--resource=nodes")
        cluster.kubectl("create", "clusterrolebinding", label, f"--clusterrole={label}",
                        f"--serviceaccount={namespace}:capturer")
        token = cluster.kubectl("create", "token", "capturer", "-n", namespace,
                                "--duration=10m").stdout.decode().strip()
        counter, plugin, kubeconfig = (tmp_path / "calls", tmp_path / "plugin.sh",
                                       tmp_path / "kubeconfig")
        write_plugin(plugin, token, counter)
        write_kubeconfig(cluster, kubeconfig, plugin, namespace)

        docs = [workload_pod("first", namespace, labels={label: "x"}, command=listen),
                workload_pod("sender", namespace, labels={"role": "sender"},
                             command=["sleep", "3600"])]
        apply_and_wait(cluster, docs)

        output, summary, log = (tmp_path / "out.pcapng", tmp_path / "summary.json",
                                tmp_path / "stderr.log")
        env = {**os.environ, "MULTISNIFF_BUNDLES": str(tmp_path / "bundles")}
        env.pop("KUBECONFIG", None)
        with log.open("wb") as stderr:
            # No -n: the namespace comes from the plugin context, as kubectl would pick it.
            process = subprocess.Popen(
                [str(MULTISNIFF), "--kubeconfig", str(kubeconfig), "-l", f"{label}=x",
                 "--mode", "upload", "--duration", "30", "-o", str(output),
                 "--summary-json", str(summary)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                cwd=tmp_path)
        try:
            wait_for(log, f"Capturing {namespace}/first", process, 90)
            send(cluster, namespace, pod_ip(cluster, namespace, "first"), "first")
            # Let the token that started the capture expire, then make multisniff ask the API
            # again: a pod that joins needs a pod event, an exec, an upload.
            time.sleep(LIFETIME + 1)
            calls_before_join = len(counter.read_text().splitlines())
            joined_at = time.time()
            cluster.kubectl("apply", "-f", "-", input=json.dumps(
                workload_pod("second", namespace, labels={label: "x"}, command=listen)).encode())
            cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready",
                            "--timeout=60s", "pod/second", timeout=90)
            wait_for(log, f"Capturing {namespace}/second", process, 60)
            send(cluster, namespace, pod_ip(cluster, namespace, "second"), "second")
            assert process.wait(timeout=90) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    calls = [float(line) for line in counter.read_text().splitlines()]
    assert len(calls) > calls_before_join >= 1, (calls, log.read_text())
    assert any(at > joined_at for at in calls), (calls, joined_at)

    out = subprocess.run(
        ["tshark", "-r", str(output), "-Y", f"udp.dstport == {PORT}", "-T", "fields",
         "-E", "separator=\t", "-e", "frame.interface_name", "-e", "data.data"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    markers: dict[str, set[str]] = {}
    for line in out.splitlines():
        interface, _, data = line.partition("\t")
        markers.setdefault(interface, set()).add(bytes.fromhex(data.strip()).decode())
    for pod in ("first", "second"):
        expected = {f"MSNF {pod} {seq}" for seq in range(1, COUNT + 1)}
        assert markers.get(f"{namespace}/{pod}") == expected, (pod, markers.keys())
    report = json.loads(summary.read_text())
    assert report["exit_code"] == 0 and report["totals"]["captured"] == 2, report
