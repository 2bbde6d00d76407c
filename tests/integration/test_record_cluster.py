"""`multisniff record` on the real cluster: the chaos scenario (clients and servers; chaos.sh
deletes and recreates a server and restarts the other's container while the clients send),
judged by tshark and the summary; and a signal to multisniff reaching COMMAND first."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, wait_for, workload_pod

pytestmark = pytest.mark.cluster

PORT = 9433
CHAOS = Path(__file__).resolve().parent / "chaos" / "chaos.sh"
EVENTS = "multisniff/events"


@pytest.fixture(autouse=True)
def _tshark() -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")


def frames(path: Path) -> list[tuple[Decimal, str, str]]:
    """(time, interface, comment) of every frame, in file order."""
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t", "-e",
         "frame.time_epoch", "-e", "frame.interface_name", "-e", "frame.comment"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    rows = []
    for line in out.splitlines():
        epoch, interface, comment = line.split("\t")
        rows.append((Decimal(epoch), interface, comment))
    return rows


def server(name: str, namespace: str, label: str, *, restarts: bool) -> dict[str, Any]:
    listen = f"workload udp-listen -listen :{PORT} -quiet"
    # A shell as PID 1 that ends on SIGTERM, so that `kill -TERM 1` restarts the container.
    command = ["sh", "-c", f"trap 'exit 3' TERM; {listen} & wait"] if restarts else \
        listen.split()
    manifest = workload_pod(name, namespace, labels={label: "x", "role": "server"},
                            command=command)
    if restarts:
        manifest["spec"]["restartPolicy"] = "Always"
    return manifest


def multisniff_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_the_chaos_scenario_is_recorded(cluster: Any, tmp_path: Path) -> None:
    label = f"msnf-chaos-{secrets.token_hex(3)}"
    out = tmp_path / "chaos.pcapng"
    with throwaway_namespace(cluster, "msx-chaos") as namespace:
        manifest = tmp_path / "server-a.json"
        manifest.write_text(json.dumps(server("server-a", namespace, label, restarts=False)))
        ips = apply_and_wait(cluster, [server("server-a", namespace, label, restarts=False),
                                       server("server-b", namespace, label, restarts=True)])
        targets = ",".join(f"{ips[f'{namespace}/{name}']}:{PORT}"
                           for name in ("server-a", "server-b"))
        apply_and_wait(cluster, [workload_pod(
            "client", namespace, labels={label: "x", "role": "client"},
            command=["workload", "udp", "-targets", targets, "-rate", "40", "-pod", "client",
                     "-report", "0"])])
        env = {**multisniff_env(), "KUBECTL": str(cluster.kubectl_path),
               "KUBECONFIG": str(cluster.kubeconfig), "NS": namespace, "PORT": str(PORT),
               "SERVER_MANIFEST": str(manifest), "CHAOS_EXIT": "7",
               "MULTISNIFF": f"{sys.executable} -m multisniff"}
        done = subprocess.run(
            [sys.executable, "-m", "multisniff", "record", "--kubeconfig",
             str(cluster.kubeconfig), "--profile", "chaos-ci", "-l", f"{label}=x", "-n",
             namespace, "-o", str(out), "--require-ready", "--", str(CHAOS)],
            env=env, capture_output=True, text=True, timeout=300)
    log = done.stderr
    assert done.returncode == 7, log
    assert log.rstrip().splitlines()[-2:] == [f"multisniff: kept {out}",
                                               f"multisniff: kept {tmp_path / 'chaos.json'}"]
    summary = json.loads((tmp_path / "chaos.json").read_text())
    assert summary["exit_code"] == 7
    assert summary["command"]["how"] == "exit code 7"
    rows = frames(out)
    events = [(time, comment) for time, interface, comment in rows if interface == EVENTS]
    packets = [(time, interface) for time, interface, _ in rows if interface != EVENTS]
    # Exactly merged: in time order, where a packet earlier than one before it on its own
    # interface (tcpdump on "any" may go back a little) keeps its place behind that one.
    newest: dict[str, Decimal] = {}
    keys = []
    for time, interface, _ in rows:
        newest[interface] = max(time, newest.get(interface, time))
        keys.append(newest[interface])
    assert keys == sorted(keys)

    # Every pod's traffic: a deleted pod's interface ends, its successor's begins.
    a, b, client = (f"{namespace}/{name}" for name in ("server-a", "server-b", "client"))
    per_interface = Counter(interface for _, interface in packets)
    assert set(per_interface) == {a, f"{a}#2", b, f"{b}#2", client}, (per_interface, log)

    # The summary's counts are the file's.
    counted = Counter()
    for pod in summary["pods"]:
        counted[pod["interface"]] += pod["packets"]
    in_file = Counter()
    for interface, count in per_interface.items():
        in_file[interface.split("#")[0]] += count
    assert counted == in_file
    assert summary["totals"]["packets"] == len(packets)

    # The events, in order, and lined up with the interfaces' ends and beginnings.
    def when(prefix: str) -> Decimal:
        found = [time for time, comment in events if comment.startswith(prefix)]
        assert len(found) == 1, (prefix, events)
        return found[0]

    texts = [comment for _, comment in events]
    order = ["command started", "mark: chaos: deleting server-a", f"pod {a} deleted",
             f"pod {a} added", "mark: chaos: restarting server-b",
             f"container main of pod {b} restarted",
             "mark: chaos: done", "command ended, exit code 7"]
    positions = [next(i for i, text in enumerate(texts) if text.startswith(step))
                 for step in order]
    assert positions == sorted(positions), texts

    def times(interface: str) -> list[Decimal]:
        return [time for time, name in packets if name == interface]

    assert max(times(a)) < when(f"pod {a} added")
    assert min(times(f"{a}#2")) > when(f"pod {a} added")
    assert max(times(b)) < when(f"container main of pod {b} restarted")
    assert min(times(f"{b}#2")) > when("mark: chaos: restarting server-b")
    assert min(times(client)) < when("mark: chaos: deleting server-a") < max(times(client))


def test_a_signal_goes_to_the_command_first(cluster: Any, tmp_path: Path) -> None:
    label = f"msnf-sig-{secrets.token_hex(3)}"
    out = tmp_path / "sig.pcapng"
    log_path = tmp_path / "log"
    with throwaway_namespace(cluster, "msx-sig") as namespace:
        apply_and_wait(cluster, [workload_pod("idle", namespace, labels={label: "x"},
                                              command=["sleep", "3600"])])
        command = ["sh", "-c", "trap 'echo got TERM; kill $!; exit 42' TERM; echo started; "
                               "sleep 120 & wait"]
        stdout_path = tmp_path / "stdout"
        with log_path.open("w") as log, stdout_path.open("w") as stdout:
            process = subprocess.Popen(
                [sys.executable, "-m", "multisniff", "record", "--kubeconfig",
                 str(cluster.kubeconfig), "-l", f"{label}=x", "-n", namespace, "-o", str(out),
                 "--tail", "1s", "--keep", "always", "--", *command],
                stdout=stdout, stderr=log, env=multisniff_env())
            try:
                wait_for(stdout_path, "started", process, 120)  # its trap is set
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert process.returncode == 42, log_path.read_text()
    assert stdout_path.read_text().splitlines() == ["started", "got TERM"]  # COMMAND's own
    assert "SIGTERM: passing it on to sh" in log_path.read_text()
    comments = [comment for _, interface, comment in frames(out) if interface == EVENTS]
    assert any(c.startswith("command ended, exit code 42") for c in comments), comments


def test_a_ring_of_files_on_the_cluster(cluster: Any, tmp_path: Path) -> None:
    from multisniff.engine.rotation import ring_files

    label = f"msnf-ring-{secrets.token_hex(3)}"
    out = tmp_path / "ring.pcapng"
    with throwaway_namespace(cluster, "msx-ring") as namespace:
        ips = apply_and_wait(cluster, [workload_pod(
            "sink", namespace, labels={label: "x"},
            command=["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"])])
        apply_and_wait(cluster, [workload_pod(
            "sender", namespace, labels={label: "x"},
            command=["workload", "udp", "-targets", f"{ips[f'{namespace}/sink']}:{PORT}",
                     "-rate", "100", "-pod", "sender", "-size", "200", "-report", "0"])])
        done = subprocess.run(
            [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
             "-l", f"{label}=x", "-n", namespace, "-o", str(out), "--rotate-size", "20k",
             "--keep-files", "3", "--duration", "6s"],
            env=multisniff_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    files = ring_files(str(out))
    assert len(files) == 3, done.stderr
    assert int(files[0].name.split("_")[1]) > 1  # the oldest were removed
    for path in files:
        # Each file on its own: both pods' interfaces, and the names of their addresses.
        rows = subprocess.run(
            ["tshark", "-r", str(path), "-N", "n", "-Y", f"udp.dstport == {PORT}", "-T",
             "fields", "-E", "separator=\t", "-e", "frame.interface_name", "-e",
             "ip.dst_host"], capture_output=True, text=True, check=True,
            timeout=60).stdout.splitlines()
        assert rows, path
        assert {row.split("\t")[1] for row in rows} == {f"{namespace}/sink"}
        info = subprocess.run(["capinfos", "-I", str(path)], capture_output=True, text=True,
                              check=True, timeout=60).stdout
        names = sorted(line.split("=", 1)[1].strip() for line in info.splitlines()
                       if line.strip().startswith("Name ="))
        assert names == [f"{namespace}/sender", f"{namespace}/sink"], info
