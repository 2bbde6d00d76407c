"""How long a capture of N pods takes to start and to tear down, per capture mode, and what it
leaves behind (nothing, checked by `multisniff cleanup --dry-run`).

For each pod count (10 and 30 by default) a namespace msnf-teardown-<random> gets N pods of the
tools image (root, sh and tar: every mode can capture them) running sleep. Then, one mode after
another (upload, privileged, ephemeral), `multisniff -l app=target --mode M` runs until every
pod is capturing, and is sent SIGINT. Printed per mode and count:

* start: seconds from the process's start until the log says the last pod is capturing;
* teardown: seconds from SIGINT until the process has exited (every tcpdump stopped, its
  output drained, bundles and agent pods removed);
* gone: for the privileged mode, seconds from SIGINT until no pod labelled
  app.kubernetes.io/managed-by=multisniff is listed in the namespace any more;
* left: what `multisniff cleanup -n NS --dry-run` still finds afterwards ("nothing").

Run against the local cluster: `eval "$(tests/cluster/clusterctl env)"; .venv/bin/python
benchmarks/teardown_bench.py`. It deletes its namespace at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = "multisniff.local/tools:1"
AGENT = "multisniff.local/workload:1"
MANAGED = "app.kubernetes.io/managed-by=multisniff"


def kubectl(*args: str, data: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=data, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def make_pods(namespace: str, count: int) -> None:
    deadline = time.monotonic() + 60  # a new namespace's default ServiceAccount comes later
    while subprocess.run(["kubectl", "get", "serviceaccount", "default", "-n", namespace],
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"No default ServiceAccount in {namespace} after 60 s.")
        time.sleep(0.3)
    items = [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"target-{i}", "namespace": namespace,
                     "labels": {"app": "target"}},
        "spec": {"terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                 "containers": [{"name": "main", "image": TOOLS, "imagePullPolicy": "Never",
                                 "command": ["sleep", "3600"]}]},
    } for i in range(count)]
    kubectl("apply", "-f", "-", data=json.dumps({"apiVersion": "v1", "kind": "List",
                                                 "items": items}))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=180s", "pod",
            "-l", "app=target")


def run(mode: str, namespace: str, count: int, bundles: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="msnf-teardown-") as tmp:
        log = Path(tmp) / "log"
        started = time.monotonic()
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "multisniff", "-l", "app=target", "-n", namespace,
                 "--mode", mode, "--agent-image", AGENT, "--ephemeral-image", TOOLS,
                 "-f", "udp port 9", "-o", str(Path(tmp) / "out.pcapng")],
                stdout=subprocess.DEVNULL, stderr=stderr,
                env={**os.environ, "MULTISNIFF_BUNDLES": bundles})
        try:
            while len(set(re.findall(r"Capturing (\S+) \(", log.read_text()))) < count:
                if process.poll() is not None or time.monotonic() - started > 600:
                    raise SystemExit(f"{mode}: not every pod captured:\n{log.read_text()}")
                time.sleep(0.1)
            start = time.monotonic() - started
            stopping = time.monotonic()
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=300)
            teardown = time.monotonic() - stopping
            gone = None
            if mode == "privileged":
                while kubectl("get", "pods", "-n", namespace, "-l", MANAGED, "-o", "name"):
                    time.sleep(0.1)
                gone = time.monotonic() - stopping
        finally:
            if process.poll() is None:
                process.kill()
        left = subprocess.run(
            [sys.executable, "-m", "multisniff", "cleanup", "-n", namespace, "--dry-run"],
            capture_output=True, text=True, timeout=600).stdout
        nothing = "Nothing was left behind." in left
        return {"mode": mode, "pods": count, "exit": code, "start": round(start, 1),
                "teardown": round(teardown, 2), "gone": None if gone is None else round(gone, 2),
                "left": "nothing" if nothing else left.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10,30")
    parser.add_argument("--modes", default="upload,privileged,ephemeral")
    args = parser.parse_args()
    bundles = tempfile.mkdtemp(prefix="msnf-teardown-bundles-")
    for count in (int(c) for c in args.counts.split(",")):
        namespace = f"msnf-teardown-{secrets.token_hex(3)}"
        kubectl("create", "namespace", namespace)
        try:
            make_pods(namespace, count)
            for mode in args.modes.split(","):
                print(json.dumps(run(mode, namespace, count, bundles)), flush=True)
        finally:
            kubectl("delete", "namespace", namespace, "--wait=false")


if __name__ == "__main__":
    main()
