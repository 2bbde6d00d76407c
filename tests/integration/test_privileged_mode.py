"""The privileged mode on the real cluster: pods that neither other mode can capture (a
non-root container without any capability, CoreDNS without a shell) in a namespace whose
Pod Security level (baseline) refuses an ephemeral container's capabilities, several on one
node through one agent pod in an agent namespace, with exact counts of the datagrams sent to
each (tshark). After every way out (the end, SIGINT, SIGTERM, kill -9 after the agent's
deadline and the TTL of its Job, the agent pod deleted by someone else, a target pod deleted)
no pod labelled by multisniff is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, wait_for

import multisniff
from multisniff import api
from multisniff.capture.privileged import TTL_AFTER_FINISHED

pytestmark = pytest.mark.cluster

WORKLOAD_IMAGE = "multisniff.local/workload:1"
COREDNS_IMAGE = "multisniff.local/coredns:1"
TOOLS_IMAGE = "multisniff.local/tools:1"
PORT = 9999
MANAGED = "app.kubernetes.io/managed-by=multisniff"
SENT = {"sink-a": 7, "sink-b": 5, "dns": 3}


def non_root_sink(name: str, namespace: str) -> dict[str, Any]:
    """The workload's UDP sink as uid 1000 with every capability dropped: upload cannot run
    tcpdump in it."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name,
                                                                      "captured": "yes"}},
        "spec": {
            "terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
            "containers": [{
                "name": "app", "image": WORKLOAD_IMAGE, "imagePullPolicy": "Never",
                "command": ["workload", "udp-listen", "-listen", f":{PORT}", "-quiet"],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}}]},
    }


def coredns(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "dns", "namespace": namespace,
                     "labels": {"app": "dns", "captured": "yes"}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "dnsPolicy": "None", "dnsConfig": {"nameservers": ["127.0.0.1"]},
                 "containers": [{"name": "coredns", "image": COREDNS_IMAGE,
                                 "imagePullPolicy": "Never",
                                 "args": ["-conf", "/etc/coredns/Corefile"]}]},
    }


def sender(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "sender", "namespace": namespace, "labels": {"app": "sender"}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "containers": [{"name": "app", "image": WORKLOAD_IMAGE,
                                 "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]},
    }


@pytest.fixture(scope="module")
def pods(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    bundles = tmp_path_factory.mktemp("bundles")
    with throwaway_namespace(cluster, "msx-priv") as namespace, \
            throwaway_namespace(cluster, "msx-agent") as agents:
        cluster.kubectl("label", "namespace", namespace,
                        "pod-security.kubernetes.io/enforce=baseline")
        ips = apply_and_wait(cluster, [non_root_sink("sink-a", namespace),
                                       non_root_sink("sink-b", namespace),
                                       coredns(namespace), sender(namespace)])
        yield {"namespace": namespace, "agents": agents, "bundles": str(bundles),
               "ips": {key.split("/")[1]: ip for key, ip in ips.items()}}


def labelled(cluster: Any, *namespaces: str) -> list[dict[str, Any]]:
    """Pods labelled by multisniff in these namespaces."""
    found = []
    for namespace in namespaces:
        found += cluster.kubectl_json("get", "pods", "-n", namespace, "-l", MANAGED)["items"]
    return found


def wait_none_labelled(cluster: Any, *namespaces: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (left := labelled(cluster, *namespaces)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p["metadata"]["name"] for p in left] == []


def start(cluster: Any, pods: dict[str, Any], tmp_path: Path, *extra: str,
          agent_image: str = WORKLOAD_IMAGE, selector: str = "captured=yes",
          ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, log = tmp_path / "out.pcapng", tmp_path / "log.txt"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
             "-l", selector, "-n", pods["namespace"], "--mode", "privileged",
             "--agent-namespace", pods["agents"], "--agent-image", agent_image,
             "-f", f"udp dst port {PORT}", "-o", str(out),
             "--summary-json", str(tmp_path / "summary.json"), *extra],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]})
    return process, out, log


def wait_capturing(process: subprocess.Popen[bytes], log: Path, names: list[str]) -> None:
    for name in names:
        wait_for(log, f"/{name} (container", process, 120)


def send(cluster: Any, pods: dict[str, Any], counts: dict[str, int]) -> None:
    for name, count in counts.items():
        cluster.kubectl("exec", "sender", "-n", pods["namespace"], "--", "workload", "udp",
                        "-targets", f"{pods['ips'][name]}:{PORT}", "-count", str(count),
                        "-rate", "100", "-pod", "sender", "-report", "0", timeout=60)


def per_interface(pcap: Path) -> Counter[str]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", f"udp.dstport == {PORT}", "-T", "fields",
         "-e", "frame.interface_name"], capture_output=True, text=True, check=True,
        timeout=60).stdout
    return Counter(line.strip() for line in out.splitlines() if line.strip())


def the_agent(cluster: Any, pods: dict[str, Any]) -> dict[str, Any]:
    (agent,) = labelled(cluster, pods["agents"])
    assert labelled(cluster, pods["namespace"]) == []
    return agent


@pytest.mark.parametrize("agent_image", [WORKLOAD_IMAGE, TOOLS_IMAGE],
                         ids=["busybox-no-libc-agent", "tools-agent"])
def test_pods_no_other_mode_can_capture_through_one_agent_with_exact_counts(
        cluster: Any, pods: dict[str, Any], tmp_path: Path, agent_image: str) -> None:
    process, out, log = start(cluster, pods, tmp_path, "--duration", "15s",
                              agent_image=agent_image)
    try:
        wait_capturing(process, log, list(SENT))
        agent = the_agent(cluster, pods)
        spec = agent["spec"]
        assert spec["hostPID"] is True and spec["nodeName"] == cluster.node_name
        assert spec["containers"][0]["securityContext"] == {"privileged": True}
        assert spec["tolerations"] == [{"operator": "Exists"}]
        assert spec["automountServiceAccountToken"] is False
        # --duration 15 + startup_timeout 120 + lifetime_margin 60, plus the agent's 30.
        assert spec["activeDeadlineSeconds"] == 15 + 120 + 60 + 30
        annotations = agent["metadata"]["annotations"]
        assert {"multisniff/client-host", "multisniff/client-user",
                "multisniff/started"} <= set(annotations)
        assert agent["metadata"]["labels"]["multisniff/session"]
        send(cluster, pods, SENT)
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    stopped = text.index("Stopping:")
    assert text.count("Created agent pod") == 1, text
    assert per_interface(out) == {f"{pods['namespace']}/{name}": count
                                  for name, count in SENT.items()}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {p["mode"] for p in summary["pods"]} == {"privileged"}
    assert summary["left_behind"] == []
    assert "mode privileged" in text[:stopped]
    wait_none_labelled(cluster, pods["agents"], pods["namespace"], seconds=5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_ends_the_capture_and_removes_the_agent(
        cluster: Any, pods: dict[str, Any], tmp_path: Path, sig: signal.Signals) -> None:
    process, out, log = start(cluster, pods, tmp_path)
    try:
        wait_capturing(process, log, list(SENT))
        the_agent(cluster, pods)
        send(cluster, pods, {"sink-a": 4})
        time.sleep(2)  # the watchdog's batch
        stopping = time.monotonic()
        process.send_signal(sig)
        assert process.wait(timeout=60) == 130, log.read_text()
        teardown = time.monotonic() - stopping
    finally:
        if process.poll() is None:
            process.kill()
    print(f"teardown of {len(SENT)} targets after {sig.name}: {teardown:.1f} s")
    wait_none_labelled(cluster, pods["agents"], pods["namespace"], seconds=5)
    assert per_interface(out) == {f"{pods['namespace']}/sink-a": 4}


def processes_of_pod(uid: str) -> list[int]:
    """PIDs on this machine (the cluster's one node) in the cgroup of the pod `uid`."""
    found = []
    for cgroup in Path("/proc").glob("[0-9]*/cgroup"):
        try:
            if f"pod{uid}" in cgroup.read_text():
                found.append(int(cgroup.parent.name))
        except OSError:
            continue
    return found


def test_kill_9_leaves_no_labelled_pod_or_job_after_its_deadline_and_ttl(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    profile = tmp_path / "short.toml"
    profile.write_text("startup_timeout = 5\nlifetime_margin = 5\n")
    process, _, log = start(cluster, pods, tmp_path, "--profile", str(profile),
                            "--duration", "10s", selector="app=sink-a")
    try:
        wait_capturing(process, log, ["sink-a"])
        agent = the_agent(cluster, pods)
        deadline = agent["spec"]["activeDeadlineSeconds"]
        assert deadline == 10 + 5 + 5 + 30
        session = agent["metadata"]["labels"]["multisniff/session"]
        created = time.monotonic()
        # Its sleeper, and the watchdog, nsenter's tcpdump and their shell.
        assert len(processes_of_pod(agent["metadata"]["uid"])) >= 3
    finally:
        process.kill()
        process.wait(timeout=10)
    time.sleep(max(0.0, deadline - (time.monotonic() - created)))
    # The cluster ends the agent at its deadline and deletes its Job and pod the TTL after:
    # nobody runs cleanup here.
    wait_none_labelled(cluster, pods["agents"], pods["namespace"],
                       seconds=TTL_AFTER_FINISHED + 30)
    assert processes_of_pod(agent["metadata"]["uid"]) == []
    until = time.monotonic() + TTL_AFTER_FINISHED + 30
    while (jobs := cluster.kubectl_json("get", "jobs", "-n", pods["agents"], "-l",
                                        MANAGED)["items"]) and time.monotonic() < until:
        time.sleep(0.5)
    assert [(job["metadata"]["name"], job["status"]) for job in jobs] == []
    cleanup = subprocess.run(
        [sys.executable, "-m", "multisniff", "cleanup", "--kubeconfig", str(cluster.kubeconfig),
         "-A", "--session", session], capture_output=True, text=True, timeout=120)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "Nothing was left behind." in cleanup.stdout


def test_the_agent_deleted_by_someone_else_ends_its_captures_and_nothing_is_left(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    process, out, log = start(cluster, pods, tmp_path)
    try:
        wait_capturing(process, log, list(SENT))
        agent = the_agent(cluster, pods)
        send(cluster, pods, {"sink-b": 3})
        time.sleep(2)
        cluster.kubectl("delete", "pod", "-n", pods["agents"], agent["metadata"]["name"],
                        "--grace-period=0", "--force")
        for name in SENT:
            wait_for(log, f"{pods['namespace']}/{name}: ", process, 60)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert code in (1, 3, 130), text
    wait_none_labelled(cluster, pods["agents"], pods["namespace"], seconds=10)
    # What the agent passed on before it went is in the file.
    assert per_interface(out) == {f"{pods['namespace']}/sink-b": 3}


def test_a_target_pod_deleted_ends_its_capture_only(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    namespace = pods["namespace"]
    victim = non_root_sink("victim", namespace)
    apply_and_wait(cluster, [victim])
    process, out, log = start(cluster, pods, tmp_path,
                              selector="app in (sink-a,victim)")
    try:
        wait_capturing(process, log, ["sink-a", "victim"])
        cluster.kubectl("delete", "pod", "victim", "-n", namespace, "--grace-period=0",
                        "--force")
        wait_for(log, f"{namespace}/victim went away", process, 60)
        wait_for(log, f"{namespace}/victim: ", process, 60)
        the_agent(cluster, pods)  # still there for sink-a
        send(cluster, pods, {"sink-a": 6})
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    wait_none_labelled(cluster, pods["agents"], namespace, seconds=5)
    assert per_interface(out) == {f"{namespace}/sink-a": 6}


def test_the_agent_namespaces_pod_security_is_refused_in_one_sentence(
        cluster: Any, pods: dict[str, Any]) -> None:
    namespace = pods["namespace"]
    result = subprocess.run(
        [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
         "-l", "app=sink-a", "-n", namespace, "--mode", "privileged", "--no-follow",
         "-o", "/dev/null"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]})
    assert result.returncode == 4, result.stderr  # the cluster refused: ExitCode.REFUSED
    assert "Traceback" not in result.stderr
    assert (f"namespace {namespace} enforces Pod Security level 'baseline', which refuses "
            f"the privileged agent pod; give --agent-namespace") in result.stderr
    assert labelled(cluster, namespace) == []


def test_dry_run_says_what_would_be_created_where_and_creates_nothing(
        cluster: Any, pods: dict[str, Any]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
         "-l", "captured=yes", "-n", pods["namespace"], "--mode", "privileged",
         "--agent-namespace", pods["agents"], "--dry-run"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "would create:" in line]
    assert len(lines) == len(SENT), result.stdout
    assert all(f"in namespace {pods['agents']} on node {cluster.node_name}" in line
               for line in lines), lines
    assert labelled(cluster, pods["agents"], pods["namespace"]) == []


PLANT = r"""
set -e
mkdir -p /tmp/.multisniff-planted /tmp/msnf-run-planted
for f in /tmp/.multisniff-planted/msnf-watchdog /tmp/msnf-run-planted/tcpdump; do
  printf '#!/bin/sh\ntrap %s INT TERM\nsleep 600 & wait\n' "'kill \$!; exit 0'" > "$f"
  chmod 755 "$f"
done
/tmp/.multisniff-planted/msnf-watchdog --lifetime 600 -- x >/dev/null 2>&1 </dev/null &
/tmp/msnf-run-planted/tcpdump -Z root -U --time-stamp-precision=nano -w - >/dev/null 2>&1 \
  </dev/null &
"""

LOOK = ("me=$$; for d in /proc/[0-9]*; do [ ${d#/proc/} = $me ] && continue; c=; "
        "IFS= read -r c < $d/cmdline; case $c in "
        "*planted*) echo ${d#/proc/};; esac; done 2>/dev/null; ls -a /tmp | grep -e multisniff "
        "-e msnf-run; true")


def test_cleanup_finds_and_removes_what_a_run_left_in_containers(
        cluster: Any, pods: dict[str, Any]) -> None:
    namespace = pods["namespace"]

    def cleanup(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "multisniff", "cleanup", "--kubeconfig",
             str(cluster.kubeconfig), "-n", namespace, *extra],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def left() -> list[str]:
        return cluster.kubectl("exec", "sender", "-n", namespace, "--", "sh", "-c",
                               LOOK).stdout.decode().split()

    cluster.kubectl("exec", "sender", "-n", namespace, "--", "sh", "-c", PLANT)
    assert len(left()) == 4  # two processes, two directories
    listed = cleanup("--dry-run")
    where = f"in {namespace}/sender container app"
    for line in ("would remove watchdog (PID", "would remove tcpdump (PID",
                 f"would remove directory /tmp/.multisniff-planted {where}",
                 f"would remove directory /tmp/msnf-run-planted {where}"):
        assert line in listed, listed
    assert "1 could not be searched" in listed  # CoreDNS has no shell
    assert len(left()) == 4
    removed = cleanup()
    assert f"removed directory /tmp/.multisniff-planted {where}" in removed, removed
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == []
    assert "Nothing was left behind." in cleanup()


def test_follow_creates_the_agent_with_the_nodes_first_target_and_deletes_it_with_its_last(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    namespace = pods["namespace"]

    def late_pod(name: str) -> dict[str, Any]:
        pod = non_root_sink(name, namespace)
        pod["metadata"]["labels"] = {"app": name, "wave": "late"}
        return pod

    process, out, log = start(cluster, pods, tmp_path, selector="wave=late")
    try:
        wait_for(log, "Waiting for matching pods", process, 60)
        assert labelled(cluster, pods["agents"]) == []
        pods["ips"].update({key.split("/")[1]: ip for key, ip in apply_and_wait(
            cluster, [late_pod("late-1")]).items()})
        wait_capturing(process, log, ["late-1"])
        the_agent(cluster, pods)
        send(cluster, pods, {"late-1": 4})
        time.sleep(2)
        cluster.kubectl("delete", "pod", "late-1", "-n", namespace, "--grace-period=0",
                        "--force")
        wait_for(log, f"{namespace}/late-1: ", process, 60)
        # Its node has no target left: its agent goes while the capture goes on.
        wait_none_labelled(cluster, pods["agents"], seconds=10)
        assert process.poll() is None
        pods["ips"].update({key.split("/")[1]: ip for key, ip in apply_and_wait(
            cluster, [late_pod("late-2")]).items()})
        wait_capturing(process, log, ["late-2"])
        the_agent(cluster, pods)
        send(cluster, pods, {"late-2": 2})
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        cluster.kubectl("delete", "pod", "late-2", "-n", namespace, "--grace-period=0",
                        "--force", "--ignore-not-found")
    assert log.read_text().count("Created agent pod") == 2
    wait_none_labelled(cluster, pods["agents"], namespace, seconds=5)
    assert per_interface(out) == {f"{namespace}/late-1": 4, f"{namespace}/late-2": 2}


def rbac_user(cluster: Any, tmp_path: Path, pods: dict[str, Any], *,
              agent_pods: bool, target_exec: bool = True,
              ) -> tuple[Path, list[tuple[str, ...]]]:
    """A ServiceAccount that may read and exec into the targets' pods but not add ephemeral
    containers, may read nodes and namespaces, may read pods and exec in the agent namespace,
    and (with `agent_pods`) create and delete jobs there; its kubeconfig, and what to delete
    afterwards."""
    namespace, agents = pods["namespace"], pods["agents"]
    name = f"msx-priv-user-{os.getpid()}-{int(agent_pods)}{int(target_exec)}"
    pod_rules = [{"apiGroups": [""], "resources": ["pods"],
                  "verbs": ["get", "list", "watch"]}]
    if target_exec:
        pod_rules.append({"apiGroups": [""], "resources": ["pods/exec"],
                          "verbs": ["create", "get"]})
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": pod_rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name},
         "rules": [{"apiGroups": [""], "resources": ["nodes", "namespaces"],
                    "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]
    # Exec and reading pods in the agent namespace either way; the Job only with agent_pods.
    jobs = [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete"]}]
    docs += [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": agents},
         "rules": [{"apiGroups": [""], "resources": ["pods"],
                    "verbs": ["get", "list", "watch"]},
                   *(jobs if agent_pods else []),
                   {"apiGroups": [""], "resources": ["pods/exec"],
                    "verbs": ["create", "get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": agents},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": docs}).encode())
    token = cluster.kubectl("create", "token", name, "-n", namespace,
                            "--duration=1h").stdout.decode().strip()
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o",
                                       "json").stdout)
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "user",
              "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
              "users": [{"name": "u", "user": {"token": token}}],
              "contexts": [{"name": "user", "context": {"cluster": "c", "user": "u",
                                                        "namespace": namespace}}]}
    path = tmp_path / f"{name}.kubeconfig"
    path.write_text(json.dumps(config))
    return path, [("clusterrolebinding", name), ("clusterrole", name)]


def run_as(kubeconfig: Path, pods: dict[str, Any], tmp_path: Path, *args: str,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multisniff", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]})


def test_privileged_needs_exec_only_in_the_agent_namespace(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    kubeconfig, cluster_wide = rbac_user(cluster, tmp_path, pods, agent_pods=True,
                                         target_exec=False)
    out = tmp_path / "out.pcapng"
    try:
        result = run_as(kubeconfig, pods, tmp_path, "-l", "app=sink-a", "-n",
                        pods["namespace"], "--mode", "privileged", "--agent-namespace",
                        pods["agents"], "--agent-image", WORKLOAD_IMAGE, "--no-follow",
                        "--duration", "3s", "-o", str(out))
    finally:
        for kind, name in cluster_wide:
            cluster.kubectl("delete", kind, name, "--ignore-not-found")
    # No exec into the targets' namespace, and none needed: the agent is exec'd into.
    assert result.returncode == 0, result.stderr
    assert "mode privileged" in result.stderr, result.stderr
    assert out.stat().st_size > 0
    wait_none_labelled(cluster, pods["agents"], pods["namespace"])


def test_without_create_jobs_in_the_agent_namespace_rbac_refuses_in_one_sentence(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    kubeconfig, cluster_wide = rbac_user(cluster, tmp_path, pods, agent_pods=False)
    try:
        result = run_as(kubeconfig, pods, tmp_path, "-l", "app=sink-a", "--mode", "privileged",
                        "--agent-namespace", pods["agents"], "--no-follow", "-o", "/dev/null")
    finally:
        for kind, name in cluster_wide:
            cluster.kubectl("delete", kind, name, "--ignore-not-found")
    assert result.returncode == 4, result.stderr  # the cluster refused: ExitCode.REFUSED
    assert "Traceback" not in result.stderr
    assert (f"you may not create jobs in namespace {pods['agents']} (RBAC), which the agent "
            f"pod's Job needs; give --agent-namespace") in result.stderr
    assert labelled(cluster, pods["agents"]) == []


def test_auto_takes_privileged_as_its_last_resort_only_where_a_profile_allows_it(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    kubeconfig, cluster_wide = rbac_user(cluster, tmp_path, pods, agent_pods=True)
    allow = tmp_path / "allow.toml"
    allow.write_text(f'allow_privileged = true\nagent_namespace = "{pods["agents"]}"\n'
                     f'agent_image = "{WORKLOAD_IMAGE}"\n')
    try:
        without = run_as(kubeconfig, pods, tmp_path, "-l", "app=sink-a", "--agent-namespace",
                         pods["agents"], "--dry-run")
        out = tmp_path / "auto.pcapng"
        process = subprocess.Popen(
            [sys.executable, "-m", "multisniff", "--kubeconfig", str(kubeconfig),
             "-l", "app=sink-a", "--profile", str(allow), "-f", f"udp dst port {PORT}",
             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]})
        log = tmp_path / "auto.log"
        try:
            assert process.stderr is not None
            seen = b""
            while b"Capturing" not in seen:
                line = process.stderr.readline()
                assert line, seen.decode()
                seen += line
            send(cluster, pods, {"sink-a": 5})
            time.sleep(2)
            process.send_signal(signal.SIGINT)
            seen += process.stderr.read()
            assert process.wait(timeout=60) == 130, seen.decode()
            log.write_bytes(seen)
        finally:
            if process.poll() is None:
                process.kill()
            if process.stderr is not None:
                process.stderr.close()
    finally:
        for kind, name in cluster_wide:
            cluster.kubectl("delete", kind, name, "--ignore-not-found")
    # Without consent auto names the one mode that could, and how to allow it.
    assert without.returncode == 0, without.stderr
    assert "cannot capture with mode auto" in without.stdout, without.stdout
    assert "privileged: only the privileged mode could, through a privileged agent pod" \
        in without.stdout
    assert "allow_privileged = true, or give --mode privileged" in without.stdout
    text = log.read_text()
    assert "mode privileged" in text, text
    assert per_interface(out) == {f"{pods['namespace']}/sink-a": 5}
    wait_none_labelled(cluster, pods["agents"], pods["namespace"], seconds=5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_from_python_the_session_id_labels_the_agent_and_cleanup_finds_nothing_after(
        cluster: Any, pods: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTISNIFF_BUNDLES", pods["bundles"])
    out = tmp_path / "api.pcapng"
    async with multisniff.capture(
            "app=sink-b", namespace=pods["namespace"], mode="privileged",
            agent_namespace=pods["agents"], agent_image=TOOLS_IMAGE,
            filter=f"udp dst port {PORT}", output=str(out),
            kubeconfig=str(cluster.kubeconfig)) as cap:
        await cap.ready(timeout=120)
        agent = await anyio.to_thread.run_sync(the_agent, cluster, pods)
        assert agent["metadata"]["labels"]["multisniff/session"] == cap.session_id
        await anyio.to_thread.run_sync(send, cluster, pods, {"sink-b": 6})
        await anyio.sleep(2)
    assert [(run.label, run.mode, run.packets) for run in cap.result.runs] == [
        (f"{pods['namespace']}/sink-b", "privileged", 6)]
    assert cap.result.left_behind == []
    report = await api.cleanup(namespace=pods["agents"], kubeconfig=str(cluster.kubeconfig))
    assert report.found == [] and report.lines()[-1] == "Nothing was left behind."


def test_auto_passes_ephemeral_by_where_pod_security_refuses_it_and_takes_privileged(
        cluster: Any, pods: dict[str, Any], tmp_path: Path) -> None:
    """The targets' namespace enforces baseline, which refuses NET_ADMIN and NET_RAW: a dry
    run of the ephemeral container's patch tells auto so, which then takes privileged."""
    namespace = pods["namespace"]
    allow = tmp_path / "allow.toml"
    allow.write_text(f'allow_privileged = true\nagent_namespace = "{pods["agents"]}"\n'
                     f'agent_image = "{WORKLOAD_IMAGE}"\n')

    def ephemeral_containers() -> list[Any]:
        pod = cluster.kubectl_json("get", "pod", "sink-a", "-n", namespace)
        return list(pod["spec"].get("ephemeralContainers") or ())

    before = ephemeral_containers()
    base = [sys.executable, "-m", "multisniff", "--kubeconfig", str(cluster.kubeconfig),
            "-l", "app=sink-a", "-n", namespace, "--profile", str(allow)]
    env = {**os.environ, "MULTISNIFF_BUNDLES": pods["bundles"]}
    planned = subprocess.run([*base, "--dry-run"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert planned.returncode == 0, planned.stderr
    assert f"{namespace}/sink-a: would capture with mode privileged" in planned.stdout, \
        planned.stdout
    assert (f"ephemeral: namespace {namespace} enforces Pod Security level 'baseline', which "
            f"refuses the ephemeral container's NET_ADMIN and NET_RAW") in planned.stdout

    out, log = tmp_path / "out.pcapng", tmp_path / "log.txt"
    with log.open("wb") as stderr:
        process = subprocess.Popen([*base, "-f", f"udp dst port {PORT}", "-o", str(out),
                                    "--duration", "20s"],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_capturing(process, log, ["sink-a"])
        send(cluster, pods, {"sink-a": 4})
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "mode privileged" in log.read_text()
    assert per_interface(out) == {f"{namespace}/sink-a": 4}
    assert ephemeral_containers() == before
    wait_none_labelled(cluster, pods["agents"], namespace)
