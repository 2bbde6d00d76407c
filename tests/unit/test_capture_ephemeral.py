"""Ephemeral and auto modes against a FakeCluster whose exec runs locally: the ephemeral
container's sleeper and the shell watchdog around a real tcpdump on lo run on this machine,
with their /tmp files moved into a temporary directory."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakes import FakeCluster, make_pod

from multisniff.capture.auto import AutoMode, NoUsableMode
from multisniff.capture.bundlecache import BundleUnavailable
from multisniff.capture.ephemeral import EphemeralError, EphemeralMode
from multisniff.capture.model import CaptureSpec, Target
from multisniff.capture.upload import UploadMode
from multisniff.kube.model import PodRef


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SleeperCluster(FakeCluster):
    """Starts an added ephemeral container's command locally, as Kubernetes would run it."""

    sleepers: list[subprocess.Popen[bytes]]

    async def add_ephemeral_container(self, pod: PodRef, spec: Mapping[str, Any], *,
                                      dry_run: bool = False) -> None:
        await super().add_ephemeral_container(pod, spec, dry_run=dry_run)
        if dry_run:
            return
        # Kubernetes turns $$ into $ in a container's command.
        argv = [a.replace("$$", "$") for a in spec["command"]]
        assert self.rewrite is not None
        self.sleepers.append(subprocess.Popen(list(self.rewrite(pod, spec["name"], argv))))
        await anyio.sleep(0.2)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SleeperCluster]:
    def rewrite(pod: PodRef, container: str, argv: Sequence[str]) -> list[str]:
        return [a.replace("/tmp/msnf-", f"{tmp_path}/msnf-") for a in argv]

    fake = SleeperCluster(rewrite=rewrite)
    fake.sleepers = []
    fake.add_pod(make_pod())
    yield fake
    for sleeper in fake.sleepers:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


def _send_udp(port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(f"MSNF eph {i}".encode(), ("127.0.0.1", port))


def no_watchdog(arch: str) -> bytes:
    raise BundleUnavailable(f"no compiler for {arch} here")


@pytest.mark.skipif(shutil.which("tcpdump") is None or os.geteuid() != 0,
                    reason="needs tcpdump and root (captures on lo)")
@pytest.mark.parametrize("watched", [True, False], ids=["watchdog", "shell"])
@pytest.mark.anyio
async def test_capture_runs_in_the_ephemeral_container_and_its_sleeper_is_ended(
        cluster: SleeperCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        watched: bool) -> None:
    target = Target(cluster.pods[PodRef("default", "app-0")], "app")
    mode = (EphemeralMode(cluster, image="tools:1") if watched else
            EphemeralMode(cluster, image="tools:1", watchdogs=no_watchdog))
    port = 48000 + os.getpid() % 1000
    spec = CaptureSpec(interface="lo", bpf_filter=f"udp port {port}", packet_count=3,
                       lifetime=30, read_linger=0.5)

    async with mode.open(target, spec) as capture:
        await anyio.sleep(1)
        await anyio.to_thread.run_sync(_send_udp, port, 3)
        pcap = bytearray()
        with anyio.fail_after(20):
            while chunk := await capture.read():
                pcap += chunk
        report = await capture.wait()

    assert report.exit_code == 0, report.message
    assert report.captured == 3
    assert pcap.count(b"MSNF eph") == 3
    capture_script = cluster.execs[0].command[-1]
    if watched:  # the watchdog came over stdin, ran tcpdump, and removed itself
        assert "msnf-watchdog" in capture_script and "--batch 0.05" in capture_script
        assert not list(tmp_path.glob("msnf-run-*"))
    else:
        assert "msnf-watchdog" not in capture_script
        assert "stop tcpdump by a shell" in caplog.text
    # The sleeper saw the capture's end and ended by itself; no exec was needed for it.
    (sleeper,) = cluster.sleepers
    assert sleeper.wait(timeout=5) == 0
    assert len(cluster.execs) == 1
    assert cluster.execs[0].linger == spec.read_linger
    ((_pod, added),) = cluster.ephemeral_specs
    assert re.fullmatch(r"msnf-[0-9a-f]{6}", added["name"])
    # Not in the target container's PID namespace, whose end would end the capture.
    assert "targetContainerName" not in added
    assert added["securityContext"] == {"privileged": False,
                                        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}


@pytest.mark.anyio
async def test_a_sleeper_left_running_is_ended_by_its_pid(cluster: SleeperCluster,
                                                         tmp_path: Path) -> None:
    # The capture never got to leave the done file: the sleeper, PID 1 of its container on a
    # cluster, is sent SIGTERM, which it traps.
    target = Target(cluster.pods[PodRef("default", "app-0")], "app")
    mode = EphemeralMode(cluster, image="tools:1")
    await cluster.add_ephemeral_container(
        target.pod.ref, mode.container_spec("msnf-abcdef", target, CaptureSpec(lifetime=60)))
    with anyio.fail_after(30):
        while not (tmp_path / "msnf-sleeper.pid").exists():
            await anyio.sleep(0.05)

    await mode._end_sleeper(target, "msnf-abcdef")

    (sleeper,) = cluster.sleepers
    assert await anyio.to_thread.run_sync(lambda: sleeper.wait(timeout=30)) == 143
    assert not (tmp_path / "msnf-done").exists()


@pytest.mark.anyio
async def test_no_process_but_the_sleeper_is_signalled(cluster: SleeperCluster, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # PID 1 is our sleeper only in the ephemeral container's own PID namespace; in a pod that
    # shares one it is the pause process, here the host's init. /proc says whose it is.
    target = Target(cluster.pods[PodRef("default", "app-0")], "app")
    mode = EphemeralMode(cluster, image="tools:1")
    (tmp_path / "msnf-sleeper.pid").write_text("1\n")

    with caplog.at_level(logging.WARNING):
        await mode._end_sleeper(target, "msnf-abcdef")

    assert "Could not end ephemeral container msnf-abcdef" in caplog.text
    assert cluster.execs[-1].result is not None and cluster.execs[-1].result.exit_code == 3
    # What it could not end is left for the summary, with the command that ends it.
    (entry,) = mode._leftovers.entries
    assert entry.startswith("the running ephemeral container msnf-abcdef of pod default/app-0")
    assert "remove it with: kubectl exec -n default app-0 -c msnf-abcdef -- sh -c" in entry


@pytest.mark.anyio
async def test_assess_names_the_missing_permission(cluster: SleeperCluster) -> None:
    cluster.allowed = {("create", "pods", "exec")}
    target = Target(cluster.pods[PodRef("default", "app-0")], "app")

    assessment = await EphemeralMode(cluster).assess(target)

    assert not assessment.usable
    assert assessment.reason == ("you may not add ephemeral containers to pods in namespace "
                                 "default (patch pods/ephemeralcontainers)")


@pytest.mark.anyio
async def test_auto_falls_back_to_ephemeral_and_says_why(tmp_path: Path) -> None:
    shbin = tmp_path / "bin"
    shbin.mkdir()
    (shbin / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    cluster = FakeCluster(rewrite=lambda pod, c, argv: ["env", f"PATH={shbin}", *argv])
    target = Target(cluster.add_pod(make_pod()), "app")
    auto = AutoMode(UploadMode(cluster, directory=str(tmp_path)), EphemeralMode(cluster))

    mode, assessment = await auto.choose(target)

    assert mode is not None and mode.name == "ephemeral"
    assert assessment.reason == "ephemeral: container app has no tar, head, mkdir, mv, rm"

    cluster.allowed = set()  # a new session: access reviews are kept for a minute
    auto = AutoMode(UploadMode(cluster, directory=str(tmp_path)), EphemeralMode(cluster))
    other = Target(cluster.add_pod(make_pod("app-1")), "app")
    assessment = await auto.assess(other)
    assert not assessment.usable
    assert assessment.reason.startswith("upload: container app has no tar")
    with pytest.raises(NoUsableMode, match=r"^Pod default/app-1 cannot be captured: upload:"):
        async with auto.open(other, CaptureSpec()):
            pass


@pytest.mark.anyio
async def test_access_reviews_are_asked_once_per_namespace(cluster: SleeperCluster) -> None:
    mode = EphemeralMode(cluster)
    first = Target(cluster.pods[PodRef("default", "app-0")], "app")
    second = Target(cluster.add_pod(make_pod("app-1")), "app")

    assert (await mode.assess(first)).usable
    assert (await mode.assess(second)).usable

    assert sorted(cluster.access_reviews) == [("create", "pods", "default", "exec"),
                                              ("patch", "pods", "default",
                                               "ephemeralcontainers")]


@pytest.mark.anyio
async def test_an_image_that_cannot_be_pulled_is_said_once_and_nothing_is_left_to_end(
        caplog: pytest.LogCaptureFixture) -> None:
    cluster = FakeCluster(unpullable={"nope:1"})
    targets = [Target(cluster.add_pod(make_pod(f"app-{i}")), "app") for i in range(3)]
    mode = EphemeralMode(cluster, image="nope:1", watchdogs=no_watchdog)
    # At the start of a session every pod is assessed before any container has failed.
    assert all([(await mode.assess(target)).usable for target in targets[:2]])

    errors = []
    with caplog.at_level(logging.ERROR, logger="multisniff"):
        for target in targets[:2]:
            with pytest.raises(EphemeralError) as caught:
                async with mode.open(target, CaptureSpec()):
                    pass
            errors.append(str(caught.value))
    later = await mode.assess(targets[2])

    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [
        "The image nope:1 of the ephemeral containers could not be pulled on node node-1 "
        "(ErrImagePull); pass --ephemeral-image with an image that has tcpdump and that the "
        "nodes can pull."]
    assert errors == ["its ephemeral container's image nope:1 could not be pulled "
                      "(ErrImagePull)"] * 2
    assert not cluster.execs  # no exec to end a sleeper that never ran
    assert not later.usable
    assert later.reason == "the image nope:1 could not be pulled on node node-1 (ErrImagePull)"
    assert len(cluster.ephemeral_specs) == 2
