"""Session fixtures: the local Kubernetes cluster of tests/cluster, for tests marked ``cluster``.

The fixture attaches to a cluster that is already up (``clusterctl status``) or starts one with
``clusterctl up``. At the end it stops only a cluster that a test session started, and only when
no other test session is still using it (several engineers share one machine). It never builds:
binaries and images come from ``clusterctl build``, run beforehand, because a build can take far
longer than any test timeout.

``pytest -m 'not cluster'`` never touches this fixture and runs the fast unit suite alone.

`pcap_core` runs a test once with each pcap core (pure Python and compiled), for
the suites that check the per-packet work (`pytestmark = pytest.mark.usefixtures("pcap_core")`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTERCTL = Path(__file__).resolve().parent / "cluster" / "clusterctl"
UP_TIMEOUT = 240  # seconds; a warm start takes about 15


@dataclass(frozen=True)
class Cluster:
    """What a test needs to talk to the cluster, as ``clusterctl status --json`` reports it."""

    kubeconfig: Path
    viewer_kubeconfig: Path  # may get/list/watch pods, nothing else
    viewer_user: str
    restricted_namespace: str  # Pod Security "restricted" is enforced there
    node_name: str
    node_ip: str
    pod_cidr: str
    node_pod_cidr: str
    service_cidr: str
    kubectl_path: Path  # built from the module; Debian's kubectl is too old
    started_here: bool

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run kubectl against this cluster; stdout and stderr as bytes, never decoded."""
        argv = [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def kubectl_json(self, *args: str, kubeconfig: Path | None = None) -> dict:  # type: ignore[type-arg]
        return json.loads(self.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)


def clusterctl(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLUSTERCTL), *args], capture_output=True, text=True,
                          timeout=timeout)


def cluster_status() -> tuple[dict, bool]:  # type: ignore[type-arg]
    result = clusterctl("status", "--json", timeout=30)
    return json.loads(result.stdout), result.returncode == 0


def _cluster_from(facts: dict, *, started_here: bool) -> Cluster:  # type: ignore[type-arg]
    return Cluster(
        kubeconfig=Path(facts["kubeconfig"]),
        viewer_kubeconfig=Path(facts["viewer_kubeconfig"]),
        viewer_user=facts["viewer_user"],
        restricted_namespace=facts["restricted_namespace"],
        node_name=facts["node_name"],
        node_ip=facts["node_ip"],
        pod_cidr=facts["pod_cidr"],
        node_pod_cidr=facts["node_pod_cidr"],
        service_cidr=facts["service_cidr"],
        kubectl_path=Path(facts["kubectl"]),
        started_here=started_here,
    )


class SessionRegistry:
    """Which test sessions use the cluster, so that one ending does not stop it under another.

    Each session writes ``run/users/PID`` in the state directory while it uses the cluster; the
    one that started it writes ``run/started-by-tests``. The last live session out stops a
    cluster that a test session started, and never one that a person started by hand. Both live
    under run/, which every ``clusterctl down`` and ``up`` wipes.
    """

    def __init__(self, state_dir: Path) -> None:
        self.users = state_dir / "run" / "users"
        self.marker = state_dir / "run" / "started-by-tests"
        self.me = self.users / str(os.getpid())

    def join(self, *, started: bool) -> None:
        self.users.mkdir(parents=True, exist_ok=True)
        self.me.touch()
        if started:
            self.marker.touch()

    def leave(self) -> bool:
        """Unregister; True if the cluster should now be stopped."""
        self.me.unlink(missing_ok=True)
        others = [p for p in self.users.glob("*") if p.name.isdigit() and _alive(int(p.name))]
        for stale in set(self.users.glob("*")) - set(others):
            stale.unlink(missing_ok=True)
        if others or not self.marker.exists():
            return False
        self.marker.unlink(missing_ok=True)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    facts, up = cluster_status()
    registry = SessionRegistry(Path(facts["state_dir"]))
    if not up:
        if os.geteuid() != 0:
            pytest.fail("No cluster is up and starting one needs root; run "
                        "`sudo tests/cluster/clusterctl up` first.", pytrace=False)
        result = clusterctl("up", timeout=UP_TIMEOUT)
        if result.returncode != 0:
            clusterctl("down", timeout=120)  # what the failed up did start, it must not leave
            pytest.fail(f"`tests/cluster/clusterctl up` failed (exit {result.returncode}):\n"
                        f"{result.stderr.strip()}\nLogs: {facts['state_dir']}/logs/",
                        pytrace=False)
        facts, up = cluster_status()
        if not up:
            pytest.fail(f"`clusterctl up` succeeded but status says {facts['state']}: "
                        f"missing {facts['missing']}.", pytrace=False)
        registry.join(started=True)
        started_here = True
    else:
        registry.join(started=False)
        started_here = False
    try:
        yield _cluster_from(facts, started_here=started_here)
    finally:
        if registry.leave():
            down = clusterctl("down", timeout=120)
            if down.returncode != 0:
                pytest.fail(f"`clusterctl down` left things behind:\n{down.stderr.strip()}",
                            pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The lifecycle tests bring a cluster up and down themselves, which they can do only while
    # none is running; run them before anything else starts the session's cluster.
    lifecycle = [i for i in items if i.path.name == "test_lifecycle.py"]
    if lifecycle:
        items[:] = lifecycle + [i for i in items if i.path.name != "test_lifecycle.py"]


@pytest.fixture(params=["python", "compiled"])
def pcap_core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once with each pcap core (multisniff.pcap.core): readers and mergers made
    in the test use it, and so do `multisniff` commands the test starts (MULTISNIFF_CORE is set
    for them). Where the extension is not built, the compiled run is skipped; under
    MULTISNIFF_CORE=compiled (CI) it fails instead, since a broken build must not pass as a
    skip."""
    from multisniff.pcap import core

    name = request.param
    required = os.environ.get("MULTISNIFF_CORE", "").strip().lower() == core.COMPILED
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(core.use(name))
        except core.CoreUnavailable as exc:
            if required:
                pytest.fail(f"MULTISNIFF_CORE=compiled, but {exc}.", pytrace=False)
            pytest.skip(f"{exc} (under MULTISNIFF_CORE=compiled this fails)")
        monkeypatch.setenv("MULTISNIFF_CORE", name)
        yield name
