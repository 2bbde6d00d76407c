"""The end of a pod's capture is said once when the session ends: by the final summary
(ui.summary_lines), not also by the session. A capture that ends while others go on is news,
said when it happens, and summed up with the others at the end."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode
from fakes import FakeCluster, make_pod

from multisniff.capture.model import Target
from multisniff.engine.output import FileOutput
from multisniff.engine.session import Session
from multisniff.profiles import Profile
from multisniff.ui import summary_lines

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(target: Target) -> FakeCapture:
    if target.pod.ref.name == "short":
        return FakeCapture(name="short", total=5)
    return FakeCapture(name="long", total=1, interval=0.01, forever=True)


async def test_the_end_is_said_once_by_the_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    cluster = FakeCluster()
    for i, name in enumerate(("short", "long")):
        cluster.add_pod(make_pod(name, namespace="shop", labels={"app": "web"},
                                 ip=f"10.1.0.{i + 10}"))
    profile = Profile(labels="app=web", namespace="shop", follow=False, stop_grace=5,
                      duration=0.5)
    session = Session(cluster, FakeMode(make=make), profile,
                      FileOutput(str(tmp_path / "out.pcapng"), grace=5))
    with caplog.at_level(logging.INFO, logger="multisniff"), anyio.fail_after(10):
        result = await session.run()
    said = [record.getMessage() for record in caplog.records]
    printed = summary_lines(result)

    def mentions(name: str) -> int:
        return sum(line.startswith(f"shop/{name}: done,") for line in said + printed)

    assert mentions("long") == 1, (said, printed)
    assert sorted(line.split(":")[0] for line in printed if line.startswith("shop/")) == [
        "shop/long", "shop/short"], printed
    # The short one ended while the long one still captured: news, said at once.
    assert "shop/short: done, 5 packets, 0 dropped; the other captures go on." in said
    assert any(line.startswith("shop/long: done,") for line in printed)
