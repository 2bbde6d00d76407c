"""`kubectl multisniff`: the kubectl-multisniff console script, found by kubectl on PATH as a
plugin, runs multisniff with the kubeconfig kubectl's environment names (kubectl passes none of
its own flags to a plugin, only the environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

VENV_BIN = Path(sys.executable).parent


def plugin_env(cluster: Any) -> dict[str, str]:
    path = os.pathsep.join([str(VENV_BIN), str(cluster.kubectl_path.parent), "/usr/bin", "/bin"])
    return {**os.environ, "PATH": path, "KUBECONFIG": str(cluster.kubeconfig)}


def kubectl(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(cluster.kubectl_path), *args], env=plugin_env(cluster),
                          capture_output=True, text=True, timeout=120)


def test_kubectl_lists_the_plugin(cluster: Any) -> None:
    assert (VENV_BIN / "kubectl-multisniff").is_file(), "pip install -e . makes the script"
    listed = kubectl(cluster, "plugin", "list")
    assert listed.returncode == 0, listed.stderr
    assert str(VENV_BIN / "kubectl-multisniff") in listed.stdout.splitlines(), listed.stdout


def test_kubectl_multisniff_dry_run_lists_the_coredns_pods(cluster: Any) -> None:
    names = cluster.kubectl("get", "pods", "-n", "kube-system", "-l", "app=coredns", "-o",
                            "jsonpath={.items[*].metadata.name}").stdout.decode().split()
    assert names, "the cluster runs CoreDNS (clusterctl demo)"
    result = kubectl(cluster, "multisniff", "-l", "app=coredns", "-n", "kube-system",
                     "--dry-run", "--ephemeral-image", "multisniff.local/tools:1")
    assert result.returncode == 0, result.stderr
    assert f"{len(names)} pods in namespace kube-system match app=coredns" in result.stdout, \
        result.stdout
    for name in names:
        assert f"kube-system/{name}: would capture" in result.stdout, (name, result.stdout)
