"""When the cluster refuses, the session says so once, as a RefusedError (exit 4), instead of
starting captures that cannot work or reporting each one as an ordinary failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from enginefakes import FakeCapture, FakeMode
from fakes import FakeCluster, make_pod

from multisniff.capture.auto import AutoMode
from multisniff.capture.model import Assessment, CaptureSpec, RemoteCapture, Target
from multisniff.capture.privileged import PrivilegedMode
from multisniff.capture.upload import UploadMode
from multisniff.engine.output import FileOutput
from multisniff.engine.session import Session, check_exec
from multisniff.errors import ExitCode, RefusedError
from multisniff.profiles import Profile

pytestmark = pytest.mark.anyio

PROFILE = Profile(labels="app=web", namespace="shop", follow=False, stop_grace=5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def shop(*names: str) -> FakeCluster:
    cluster = FakeCluster()
    for name in names:
        cluster.add_pod(make_pod(name, namespace="shop", labels={"app": "web"}))
    return cluster


def mode() -> FakeMode:
    return FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name, total=3))


async def test_no_exec_rights_is_refused_before_any_capture(tmp_path: Path) -> None:
    cluster = shop("web-a", "web-b")
    cluster.allowed = {("get", "pods", ""), ("list", "pods", "")}
    fake = mode()
    session = Session(cluster, fake, PROFILE, FileOutput(str(tmp_path / "o.pcapng"), grace=5))

    with pytest.raises(RefusedError, match=r"create pods/exec in namespace shop \(RBAC\)"):
        await session.run()
    assert not fake.opened and not session.runs


async def test_a_missing_namespace_is_named(tmp_path: Path) -> None:
    cluster = shop()
    session = Session(cluster, mode(), Profile(labels="app=web", namespace="nope", follow=False),
                      FileOutput(str(tmp_path / "o.pcapng"), grace=5))

    with pytest.raises(RefusedError, match="Namespace nope does not exist"):
        await session.run()


class PodSecurityMode(FakeMode):
    """Opening raises what the API says when admission refuses the ephemeral container."""

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[RemoteCapture]:
        if target.pod.ref.name != "web-ok":
            raise RefusedError(f"Namespace shop enforces Pod Security level 'restricted', "
                               f"which refuses {target.label}.")
        async with super().open(target, spec) as capture:
            yield capture


async def test_refused_everywhere_raises_the_refusal_and_partly_is_partial(
        tmp_path: Path) -> None:
    fake = PodSecurityMode(make=lambda target: FakeCapture(name=target.pod.ref.name, total=3))
    session = Session(shop("web-a", "web-b"), fake, PROFILE,
                      FileOutput(str(tmp_path / "o.pcapng"), grace=5))
    with pytest.raises(RefusedError, match="Pod Security"):
        await session.run()
    assert [run.state for run in session.runs] == ["refused", "refused"]

    result = await Session(shop("web-a", "web-ok"), fake, PROFILE,
                           FileOutput(str(tmp_path / "p.pcapng"), grace=5)).run()
    assert result.exit_code == ExitCode.PARTIAL
    assert sorted(run.state for run in result.runs) == ["done", "refused"]


@dataclass
class ExecOnlyIn(FakeCluster):
    """Grants exec in one namespace only."""

    exec_in: str = "capture"

    async def can_i(self, verb: str, resource: str, *, namespace: str | None,
                    subresource: str = "", group: str = "") -> bool:
        self.access_reviews.append((verb, resource, namespace, subresource))
        return namespace == self.exec_in


async def test_the_exec_check_asks_the_mode_where_it_would_exec() -> None:
    cluster = ExecOnlyIn()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    pods = list(cluster.pods.values())
    # The privileged mode execs only into its agents, in the agent namespace.
    await check_exec(cluster, pods, PrivilegedMode(cluster, namespace="capture"))
    assert [review[2] for review in cluster.access_reviews] == ["capture"]
    await check_exec(cluster, pods, AutoMode(UploadMode(cluster),
                                             PrivilegedMode(cluster, namespace="capture")))
    # The upload mode execs into the targets; so does privileged without --agent-namespace.
    for refused in (UploadMode(cluster), PrivilegedMode(cluster),
                    AutoMode(UploadMode(cluster),
                             PrivilegedMode(cluster, namespace="capture", consented=False))):
        with pytest.raises(RefusedError, match=r"create pods/exec in namespace shop \(RBAC\)"):
            await check_exec(cluster, pods, refused)


class AssessedRefusal(FakeMode):
    """A mode whose assessment says the cluster refuses (Pod Security), or that the pod
    cannot take it (no shell), for every pod."""

    def __init__(self, *, refused: bool) -> None:
        super().__init__(make=lambda target: FakeCapture(name=target.pod.ref.name, total=3))
        self.by_cluster = refused

    async def assess(self, target: Target) -> Assessment:
        if self.by_cluster:
            return Assessment(False, "namespace shop enforces Pod Security level 'restricted', "
                                     "which refuses it", refused=True)
        return Assessment(False, "container app has no shell (sh)")


async def test_an_assessment_the_cluster_refused_for_every_pod_is_one_refusal(
        tmp_path: Path) -> None:
    session = Session(shop("web-a", "web-b"), AssessedRefusal(refused=True), PROFILE,
                      FileOutput(str(tmp_path / "o.pcapng"), grace=5))
    with pytest.raises(RefusedError, match=r"^Cannot capture shop/web-a: namespace shop "
                                           r"enforces Pod Security level 'restricted', which "
                                           r"refuses it\.$") as caught:
        await session.run()
    assert caught.value.exit_code == ExitCode.REFUSED
    assert session.result is not None and session.result.exit_code == ExitCode.REFUSED


async def test_a_pod_that_cannot_take_any_mode_is_not_a_refusal(tmp_path: Path) -> None:
    result = await Session(shop("web-a"), AssessedRefusal(refused=False), PROFILE,
                           FileOutput(str(tmp_path / "o.pcapng"), grace=5)).run()
    assert result.exit_code == ExitCode.NOTHING
    assert [run.state for run in result.runs] == ["refused"]
