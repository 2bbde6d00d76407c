"""The dry run's last line says how long remote tcpdumps may live and which setting says so."""

from __future__ import annotations

import pytest
from enginefakes import FakeCapture, FakeMode
from fakes import FakeCluster, make_pod

from multisniff.engine.session import dry_run
from multisniff.profiles import Profile

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def last_line(profile: Profile) -> str:
    cluster = FakeCluster()
    cluster.add_pod(make_pod("web-a", labels={"app": "web"}))
    mode = FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name))
    return (await dry_run(cluster, mode, profile))[-1]


async def test_without_duration_the_bound_is_max_lifetime() -> None:
    line = await last_line(Profile(labels="app=web", namespace="default", max_lifetime=900))
    assert line == ("Remote tcpdumps would end after at most 900 s (max_lifetime, as no "
                    "--duration is given; a profile may change it).")


async def test_with_duration_the_bound_is_duration_plus_margin() -> None:
    line = await last_line(Profile(labels="app=web", namespace="default", duration=30,
                                   lifetime_margin=20))
    assert line == ("Remote tcpdumps would end after at most 50 s (--duration 30 s plus "
                    "lifetime_margin 20 s).")
