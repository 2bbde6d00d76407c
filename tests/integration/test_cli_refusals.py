"""The real `multisniff` command against the real cluster when it cannot capture: each refusal
ends the process with its documented exit code and one sentence on stderr (no traceback) that
names what was refused and the way out."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import sleeper, throwaway_namespace

from multisniff.errors import ExitCode

pytestmark = pytest.mark.cluster

MULTISNIFF = Path(sys.executable).parent / "multisniff"
WORKLOAD_IMAGE = "multisniff.local/workload:1"
TOOLS_IMAGE = "multisniff.local/tools:1"


def run_multisniff(kubeconfig: Path, tmp_path: Path,
                   *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(MULTISNIFF), "--kubeconfig", str(kubeconfig), *args,
            "-o", str(tmp_path / "out.pcapng")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          cwd=tmp_path)


def one_sentence(stderr: str) -> str:
    """The error line: asserts there is no traceback and returns the message."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1].removeprefix("multisniff: ")
    assert last.endswith("."), stderr
    return last


def test_a_user_who_may_only_view_pods_is_refused_with_rbac_verb_and_namespace(
        cluster: Any, tmp_path: Path) -> None:
    pods = cluster.kubectl_json("get", "pods", "-n", "kube-system", "-l", "app=coredns")
    assert pods["items"], "the cluster runs coredns labelled app=coredns"

    result = run_multisniff(cluster.viewer_kubeconfig, tmp_path, "-n", "kube-system",
                            "-l", "app=coredns", "--no-follow", "--duration", "5")

    message = one_sentence(result.stderr)
    assert result.returncode == ExitCode.REFUSED, result.stderr
    assert "create" in message and "pods/exec" in message, message
    assert "namespace kube-system" in message and "RBAC" in message, message
    assert "kubeconfig" in message, message  # the way out


@pytest.fixture
def restricted_pod(cluster: Any) -> Iterator[str]:
    """A pod that Pod Security "restricted" admits, in the restricted namespace."""
    namespace = cluster.restricted_namespace
    name = f"refusal-{secrets.token_hex(3)}"
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"refusal": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": WORKLOAD_IMAGE, "imagePullPolicy": "Never",
                "command": ["sleep", "3600"],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod).encode())
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                        "--timeout=60s", timeout=90)
        yield name
    finally:
        cluster.kubectl("delete", "pod", name, "-n", namespace, "--wait=false", check=False)


def test_pod_security_refuses_the_ephemeral_container(cluster: Any, restricted_pod: str,
                                                      tmp_path: Path) -> None:
    namespace = cluster.restricted_namespace

    result = run_multisniff(cluster.kubeconfig, tmp_path, "-n", namespace,
                            "-l", f"refusal={restricted_pod}", "--mode", "ephemeral",
                            "--ephemeral-image", TOOLS_IMAGE, "--no-follow",
                            "--duration", "5")

    message = one_sentence(result.stderr)
    assert result.returncode == ExitCode.REFUSED, result.stderr
    assert "Pod Security" in message and namespace in message, message
    pod = cluster.kubectl_json("get", "pod", restricted_pod, "-n", namespace)
    assert not pod["spec"].get("ephemeralContainers"), "the refused container was added"


def test_a_selector_matching_nothing_lists_the_labels_there(cluster: Any,
                                                            tmp_path: Path) -> None:
    result = run_multisniff(cluster.kubeconfig, tmp_path, "-n", "kube-system",
                            "-l", "k8s-app=no-such-app", "--no-follow")

    message = one_sentence(result.stderr)
    assert result.returncode == ExitCode.NOTHING, result.stderr
    assert "k8s-app=no-such-app" in message and "namespace kube-system" in message, message
    assert "app=coredns" in message, message


def test_a_missing_namespace_is_named(cluster: Any, tmp_path: Path) -> None:
    missing = f"no-such-namespace-{secrets.token_hex(3)}"

    result = run_multisniff(cluster.kubeconfig, tmp_path, "-n", missing, "-l", "app=web",
                            "--duration", "5")

    message = one_sentence(result.stderr)
    assert result.returncode == ExitCode.REFUSED, result.stderr
    assert f"Namespace {missing} does not exist" in message, message


def test_an_ephemeral_image_that_cannot_be_pulled_is_said_once(cluster: Any,
                                                               tmp_path: Path) -> None:
    image = "multisniff.local/does-not-exist:1"  # the ephemeral mode pulls IfNotPresent
    with throwaway_namespace(cluster, "msx-pull") as namespace:
        pods = [sleeper(name, namespace) for name in ("one", "two")]
        for pod in pods:
            pod["metadata"]["labels"]["pull"] = "test"
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": pods}).encode())
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s",
                        "pod/one", "pod/two", timeout=90)

        result = run_multisniff(cluster.kubeconfig, tmp_path, "-n", namespace, "-l",
                                "pull=test", "--mode", "ephemeral", "--ephemeral-image", image,
                                "--no-follow", "--duration", "5")

    assert result.returncode == ExitCode.NOTHING, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if "--ephemeral-image" in line]
    assert len(said) == 1, result.stderr
    assert f"The image {image} of the ephemeral containers could not be pulled" in said[0]
    assert "kubectl exec" not in result.stderr and "Could not end" not in result.stderr, \
        result.stderr
