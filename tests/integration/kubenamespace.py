"""A throwaway namespace with a pod that sleeps, for the Kubernetes client's integration tests."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TOOLS_IMAGE = "multisniff.local/tools:1"


def sleeper(name: str, namespace: str, image: str = TOOLS_IMAGE) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                 "command": ["sleep", "3600"]}]},
    }


@contextmanager
def throwaway_namespace(cluster: Any, prefix: str) -> Iterator[str]:
    """Create `prefix-<random>`, wait for its default ServiceAccount, delete it afterwards."""
    namespace = f"{prefix}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        deadline = time.monotonic() + 30
        while cluster.kubectl("get", "serviceaccount", "default", "-n", namespace,
                              check=False).returncode != 0:
            assert time.monotonic() < deadline, f"no default ServiceAccount in {namespace}"
            time.sleep(0.3)
        yield namespace
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run_sleeper(cluster: Any, namespace: str, name: str = "shell") -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sleeper(name, namespace)).encode())
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                    "--timeout=60s", timeout=90)
