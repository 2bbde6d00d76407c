"""The privileged mode's pieces that need no cluster: finding a container's process by its
cgroup (the lookup script run by real shells over /proc trees written here from the formats
documented for each runtime and cgroup driver), the agent pod's manifest, and the refusals of
its assessment against a FakeCluster."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import FakeCluster, make_pod

from multisniff.capture import registry
from multisniff.capture.auto import AutoMode
from multisniff.capture.cleanup import cleanup
from multisniff.capture.model import (
    MANAGED_BY_LABEL,
    SESSION_LABEL,
    ModeOptions,
    SessionMark,
    Target,
)
from multisniff.capture.privileged import (
    DEFAULT_IMAGE,
    PrivilegedError,
    PrivilegedMode,
    agent_manifest,
    choose_pid,
    lookup_script,
    path_names_container,
    runtime_container_id,
)
from multisniff.engine.session import SessionResult
from multisniff.errors import ClusterError, ExitCode
from multisniff.kube.model import ContainerInfo, NodeInfo, PodInfo, PodRef
from multisniff.ui import summary_lines

ID = "4f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"
OTHER = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d"
UID = "0d4bd0a2-7c1e-4d6b-9f0a-3e2b1c4d5e6f"
SLICE_UID = UID.replace("-", "_")

V1_CONTROLLERS = ("12:pids", "11:memory", "9:cpu,cpuacct", "4:devices", "1:name=systemd")


def v1(path: str) -> str:
    """A /proc/PID/cgroup of cgroup v1: the same path in every hierarchy."""
    return "".join(f"{hierarchy}:{path}\n" for hierarchy in V1_CONTROLLERS)


def v2(path: str) -> str:
    return f"0::{path}\n"


# Per runtime and driver: (the container's cgroup file, a file of something else on the node
# that must never be chosen, though it may mention the ID).
LAYOUTS: dict[str, tuple[str, str]] = {
    "containerd, cgroup v1, cgroupfs (burstable)": (
        v1(f"/kubepods/burstable/pod{UID}/{ID}"),
        v1(f"/kubepods/burstable/pod{UID}/{OTHER}")),
    "containerd, cgroup v1, cgroupfs (guaranteed)": (
        v1(f"/kubepods/pod{UID}/{ID}"), v1("/system.slice/containerd.service")),
    "containerd, cgroup v2, systemd": (
        v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SLICE_UID}"
           f".slice/cri-containerd-{ID}.scope"),
        v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SLICE_UID}"
           f".slice/cri-containerd-{OTHER}.scope")),
    "containerd, cgroup v2, seen from a container's own cgroup namespace": (
        v2(f"/../../kubepods-burstable-pod{SLICE_UID}.slice/cri-containerd-{ID}.scope"),
        v2("/")),
    "cri-o, cgroup v1, systemd (conmon in the host network)": (
        v1(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice/"
           f"crio-{ID}.scope"),
        v1(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SLICE_UID}.slice/"
           f"crio-conmon-{ID}.scope")),
    "cri-o, cgroup v2, systemd, nested container cgroup": (
        v2(f"/kubepods.slice/kubepods-pod{SLICE_UID}.slice/crio-{ID}.scope/container"),
        v2(f"/kubepods.slice/kubepods-pod{SLICE_UID}.slice/crio-conmon-{ID}.scope")),
    "cri-o, cgroup v1, cgroupfs": (
        v1(f"/kubepods/besteffort/pod{UID}/crio-{ID}"),
        v1(f"/kubepods/besteffort/pod{UID}/crio-conmon-{ID}")),
    "docker, cgroup v1, cgroupfs": (
        v1(f"/kubepods/besteffort/pod{UID}/{ID}"), v1(f"/docker/{OTHER}")),
    "docker, cgroup v2, systemd": (
        v2(f"/system.slice/docker-{ID}.scope"), v2("/system.slice/docker.service")),
}


def shells() -> list[list[str]]:
    """The POSIX shells here: dash as /bin/sh, and busybox's ash (agent images have it)."""
    found = [["/bin/sh"]]
    busybox = shutil.which("busybox") or next(
        (str(p) for p in Path("/var/cache/multisniff/build").glob("busybox-*/busybox")), None)
    if busybox:
        found.append([busybox, "sh"])
    return found


def write_proc(root: Path, files: dict[int, str]) -> Path:
    proc = root / "proc"
    for pid, content in files.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(content)
    # What /proc also has, and a process that ended before its file could be read.
    (proc / "self").mkdir()
    (proc / "sys").mkdir()
    (proc / "4242").mkdir()
    return proc


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("shell", shells(), ids=lambda argv: Path(argv[0]).name)
def test_the_lookup_finds_the_containers_first_process_and_nothing_else(
        tmp_path: Path, layout: str, shell: list[str]) -> None:
    mine, other = LAYOUTS[layout]
    # The other process has the lowest PID: choosing it would be the mistake.
    proc = write_proc(tmp_path, {1: v1("/") if "v1" in layout else v2("/"), 300: other,
                                 812: mine, 813: mine, 2000: v2("/user.slice")})
    listing = subprocess.run([*shell, "-c", lookup_script(ID, proc=str(proc))],
                             capture_output=True, text=True, check=True, timeout=30)
    assert listing.stderr == ""
    assert choose_pid(listing.stdout, ID) == 812, listing.stdout


@pytest.mark.parametrize("shell", shells(), ids=lambda argv: Path(argv[0]).name)
def test_the_lookup_finds_nothing_when_the_container_has_no_process(
        tmp_path: Path, shell: list[str]) -> None:
    proc = write_proc(tmp_path, {1: v1("/"), 77: v1(f"/kubepods/pod{UID}/{OTHER}")})
    listing = subprocess.run([*shell, "-c", lookup_script(ID, proc=str(proc))],
                             capture_output=True, text=True, check=True, timeout=30)
    assert choose_pid(listing.stdout, ID) is None


def test_a_path_names_the_container_only_by_a_whole_component() -> None:
    assert path_names_container(f"/kubepods/pod{UID}/{ID}", ID)
    assert not path_names_container(f"/kubepods/pod{UID}/{ID}x", ID)
    assert not path_names_container(f"/kubepods/pod{UID}/crio-conmon-{ID}.scope", ID)
    assert not path_names_container(f"/kubepods/pod{UID}/{ID[:12]}", ID)


def test_container_ids_of_each_runtime_and_none_of_others() -> None:
    assert runtime_container_id(f"containerd://{ID}") == ID
    assert runtime_container_id(f"cri-o://{ID}") == ID
    assert runtime_container_id(f"docker://{ID}") == ID
    assert runtime_container_id(f"rkt://{ID}") is None
    assert runtime_container_id("containerd://not-hex; rm -rf /") is None
    assert runtime_container_id(None) is None
    with pytest.raises(ValueError):
        lookup_script("$(reboot)")


MARK = SessionMark(session_id="ab12cd34", host="laptop", user="ana",
                   started="2026-11-29T21:00:00Z")


def test_the_agent_pod_is_pinned_privileged_marked_and_bounded() -> None:
    manifest = agent_manifest(name="msnf-agent-x", namespace="web", node="node-7",
                              image="busybox:1", deadline=3720, session=MARK)
    assert manifest["kind"] == "Job"
    job = manifest["spec"]
    # One pod, never retried, ended at the deadline, deleted by the cluster soon after.
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == 3720
    assert 0 < job["ttlSecondsAfterFinished"] <= 60
    for meta in (manifest["metadata"], job["template"]["metadata"]):
        assert meta["labels"][MANAGED_BY_LABEL] == "multisniff"
        assert meta["labels"][SESSION_LABEL] == "ab12cd34"
        assert {"multisniff/client-host": "laptop", "multisniff/client-user": "ana",
                "multisniff/started": "2026-11-29T21:00:00Z"}.items() \
            <= meta["annotations"].items()
    spec = job["template"]["spec"]
    assert spec["nodeName"] == "node-7" and spec["hostPID"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["automountServiceAccountToken"] is False
    assert spec["activeDeadlineSeconds"] == 3720
    (container,) = spec["containers"]
    assert container["securityContext"] == {"privileged": True}
    assert container["command"] == ["sleep", "3720"]
    assert set(container["resources"]) == {"requests", "limits"}


def non_root_target(namespace: str = "web") -> Target:
    container = ContainerInfo("app", "app:1", running=True, container_id=f"containerd://{ID}",
                              run_as_non_root=True, dropped_capabilities=("ALL",))
    return Target(make_pod("web-0", namespace=namespace, containers=[container]), "app")


def mode(cluster: FakeCluster, **options: object) -> PrivilegedMode:
    made = registry.create("privileged", cluster, ModeOptions(session=MARK, **options))  # type: ignore[arg-type]
    assert isinstance(made, PrivilegedMode)
    made._bundles._made["amd64"] = object()  # type: ignore[assignment]  # no bundle build
    return made


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_assessment_names_what_it_would_create_and_where() -> None:
    cluster = FakeCluster(namespaces={"web": {}, "capture": {}})
    assessment = await mode(cluster, agent_namespace="capture").assess(non_root_target())
    assert assessment.usable, assessment.reason
    (creates,) = assessment.creates
    assert creates.startswith("privileged agent pod of job msnf-agent-<session>-")
    assert "in namespace capture on node node-1" in creates


@pytest.mark.anyio
async def test_pod_security_of_the_agent_namespace_is_a_refusal_that_names_its_level() -> None:
    cluster = FakeCluster(namespaces={"web": {"pod-security.kubernetes.io/enforce": "baseline"}})
    assessment = await mode(cluster).assess(non_root_target())
    assert not assessment.usable
    assert assessment.reason == (
        "namespace web enforces Pod Security level 'baseline', which refuses the privileged "
        "agent pod; give --agent-namespace with a namespace labelled "
        "pod-security.kubernetes.io/enforce=privileged, or use another --mode")


@pytest.mark.anyio
async def test_rbac_without_create_jobs_is_a_refusal() -> None:
    cluster = FakeCluster(namespaces={"web": {}},
                          allowed={("create", "pods", "exec"), ("get", "pods", ""),
                                   ("create", "pods", "")})
    assessment = await mode(cluster).assess(non_root_target())
    assert not assessment.usable
    assert assessment.reason.startswith("you may not create jobs in namespace web (RBAC)")


@pytest.mark.anyio
async def test_a_node_that_is_not_ready_is_a_refusal() -> None:
    cluster = FakeCluster(namespaces={"web": {}},
                          nodes={"node-1": NodeInfo("node-1", "amd64", ready=False)})
    assessment = await mode(cluster).assess(non_root_target())
    assert assessment.reason == "node node-1 is not Ready, so no agent pod can run there"


@pytest.mark.anyio
async def test_auto_uses_privileged_only_last_and_only_when_allowed() -> None:
    cluster = FakeCluster(namespaces={"web": {}})
    auto = registry.create("auto", cluster, ModeOptions(session=MARK))
    assert isinstance(auto, AutoMode)
    assert [m.name for m in auto.modes] == ["upload", "ephemeral", "privileged"]
    privileged = auto.modes[-1]
    assert isinstance(privileged, PrivilegedMode)
    privileged._bundles._made["amd64"] = object()  # type: ignore[assignment]
    said = await privileged.assess(non_root_target())
    assert not said.usable
    assert "allow_privileged = true" in said.reason and "--mode privileged" in said.reason

    allowed = registry.create("auto", cluster, ModeOptions(session=MARK, allow_privileged=True))
    assert isinstance(allowed, AutoMode)
    last = allowed.modes[-1]
    assert isinstance(last, PrivilegedMode)
    last._bundles._made["amd64"] = object()  # type: ignore[assignment]
    assert (await last.assess(non_root_target())).usable



class AgentCluster(FakeCluster):
    """Agent Jobs' pods run at once; the bundle's unpacking only swallows its bytes."""

    fail_deletes: bool = False

    async def delete_job(self, namespace: str, name: str) -> None:
        if self.fail_deletes:
            raise ClusterError(f"Cannot reach the Kubernetes API to delete {namespace}/{name}.")
        await super().delete_job(namespace, name)


def jobs_of(*agents: Any) -> list[PodRef]:
    return [PodRef(agent.ref.namespace, agent.job) for agent in agents]


def swallow_bundle(pod: PodRef, container: str, command: Sequence[str]) -> list[str]:
    size = re.search(r"head -c (\d+)", command[-1])
    assert size is not None, command
    return ["sh", "-c", f"head -c {size.group(1)} > /dev/null"]


def agent_mode(cluster: FakeCluster) -> PrivilegedMode:
    made = mode(cluster, agent_namespace="capture")
    made._bundles._made["amd64"] = SimpleNamespace(targz=b"\x1f\x8b" * 50_000)  # type: ignore[assignment]
    return made


def target_on(node: str, name: str) -> Target:
    container = ContainerInfo("app", "app:1", running=True, container_id=f"containerd://{ID}")
    return Target(make_pod(name, namespace="web", node=node, containers=[container]), "app")


@pytest.mark.anyio
async def test_one_agent_per_node_shared_and_deleted_with_its_last_capture() -> None:
    cluster = AgentCluster(namespaces={"capture": {}}, rewrite=swallow_bundle)
    privileged = agent_mode(cluster)
    a1 = await privileged._acquire(target_on("node-1", "a"))
    a2 = await privileged._acquire(target_on("node-1", "b"))
    b1 = await privileged._acquire(target_on("node-2", "c"))
    assert a1 is a2 and a1 is not b1
    assert [(m["metadata"]["namespace"], m["spec"]["template"]["spec"]["nodeName"])
            for m in cluster.created] == [
        ("capture", "node-1"), ("capture", "node-2")]
    assert privileged.agents == (a1.ref, b1.ref)
    assert cluster.pods[a1.ref].labels["batch.kubernetes.io/job-name"] == a1.job
    await privileged._release(a1)
    assert cluster.deleted_jobs == []
    await privileged._release(a2)
    assert cluster.deleted_jobs == jobs_of(a1) and a1.ref not in cluster.pods
    # The node's next target gets a new agent.
    again = await privileged._acquire(target_on("node-1", "d"))
    assert again is not a1 and len(cluster.created) == 3
    # The session's end removes every agent, in use or not.
    await privileged.aclose()
    assert set(cluster.deleted_jobs) == set(jobs_of(a1, b1, again))
    assert privileged.agents == ()
    assert privileged.leftovers.entries == []


@pytest.mark.anyio
async def test_an_agent_that_cannot_be_deleted_is_left_with_the_command_that_removes_it() -> None:
    cluster = AgentCluster(namespaces={"capture": {}}, rewrite=swallow_bundle)
    privileged = agent_mode(cluster)
    agent = await privileged._acquire(target_on("node-1", "a"))
    cluster.fail_deletes = True
    await privileged.aclose()
    assert privileged.leftovers.entries == [
        f"agent pod capture/{agent.ref.name} on node node-1; remove it with: "
        f"kubectl delete job -n capture {agent.job}"]
    result = SessionResult(runs=[], skipped=[], exit_code=ExitCode.OK, output="x.pcapng",
                           started=0.0, ended=1.0, stop_reason="done",
                           left_behind=privileged.leftovers.entries)
    assert summary_lines(result)[-1] == f"Left behind: {privileged.leftovers.entries[0]}"


class RejectingCluster(AgentCluster):
    """The kubelet refuses every agent pod."""

    async def wait_container_running(self, pod: PodRef, container: str, *,
                                     timeout: float) -> PodInfo:
        raise ClusterError(f"Pod {pod} failed before its container {container} ran: Pod Node "
                           f"didn't have enough resource: cpu.")


@pytest.mark.anyio
async def test_an_agent_the_node_cannot_run_is_a_sentence_and_is_deleted() -> None:
    cluster = RejectingCluster(namespaces={"capture": {}}, rewrite=swallow_bundle)
    privileged = agent_mode(cluster)
    with pytest.raises(PrivilegedError) as caught:
        await privileged._acquire(target_on("node-1", "a"))
    (created,) = cluster.created
    job = created["metadata"]["name"]
    name = f"{job}-x1y2z"
    assert str(caught.value) == (
        f"The agent pod capture/{name} cannot run on node node-1 (pod capture/{name} failed "
        f"before its container agent ran: Pod Node didn't have enough resource: cpu); check "
        f"the node's capacity and the image {DEFAULT_IMAGE}, or use another --mode.")
    assert cluster.deleted_jobs == [PodRef("capture", job)]
    assert privileged.agents == ()


@pytest.mark.anyio
async def test_an_agent_namespace_that_does_not_exist_is_a_refusal() -> None:
    cluster = FakeCluster(namespaces={"web": {}})
    assessment = await mode(cluster, agent_namespace="captrue").assess(non_root_target())
    assert assessment.reason == ("the agent namespace captrue does not exist; give "
                                 "--agent-namespace with one that does")


@pytest.mark.anyio
async def test_cleanup_finds_and_removes_the_agent_job_and_its_pod() -> None:
    cluster = AgentCluster(namespaces={"capture": {}}, rewrite=swallow_bundle)
    agent = await agent_mode(cluster)._acquire(target_on("node-1", "a"))  # then killed
    report = await cleanup(cluster, namespace=None, session=MARK.session_id)
    # The Job's pod goes with it (the garbage collector's work, in the fake at once).
    assert report.lines()[0] == f"removed agent job (Active) in capture/{agent.job}"
    assert cluster.deleted_jobs == jobs_of(agent) and cluster.jobs == {}
    assert agent.ref not in cluster.pods


@pytest.mark.anyio
async def test_auto_moves_past_ephemeral_where_pod_security_refuses_its_capabilities() -> None:
    cluster = FakeCluster(namespaces={"web": {"pod-security.kubernetes.io/enforce": "baseline"},
                                      "capture": {}})
    auto = registry.create("auto", cluster, ModeOptions(session=MARK, allow_privileged=True,
                                                        agent_namespace="capture"))
    assert isinstance(auto, AutoMode)
    privileged = auto.modes[-1]
    assert isinstance(privileged, PrivilegedMode)
    privileged._bundles._made["amd64"] = object()  # type: ignore[assignment]
    mode_of, said = await auto.choose(non_root_target())
    assert mode_of is privileged, said.reason
    assert ("ephemeral: namespace web enforces Pod Security level 'baseline', which refuses "
            "the ephemeral container's NET_ADMIN and NET_RAW (non-default capabilities") \
        in said.reason
    # A dry run, nothing added; asked once for the namespace, not once per pod.
    other = Target(make_pod("web-1", namespace="web", containers=[
        non_root_target().pod.containers[0]]), "app")
    assert (await auto.choose(other))[0] is privileged
    assert len(cluster.dry_runs) == 1 and cluster.ephemeral_specs == []


@pytest.mark.anyio
async def test_ephemeral_is_assessed_usable_where_pod_security_admits_it() -> None:
    cluster = FakeCluster(namespaces={"web": {"pod-security.kubernetes.io/enforce": "privileged"}})
    auto = registry.create("auto", cluster, ModeOptions(session=MARK, allow_privileged=True))
    assert isinstance(auto, AutoMode)
    mode_of, said = await auto.choose(non_root_target())
    assert mode_of is auto.modes[1], said.reason
    assert len(cluster.dry_runs) == 1 and cluster.ephemeral_specs == []
