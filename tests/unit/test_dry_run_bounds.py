"""The dry run's last line says how long remote tcpdumps may live and which setting says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from enginefakes import FakeCapture, FakeMode
from fakes import FakeCluster, make_pod

from multisniff.engine.output import FileOutput
from multisniff.engine.session import Session, dry_run
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


async def test_with_duration_the_bound_is_duration_plus_startup_and_margin() -> None:
    line = await last_line(Profile(labels="app=web", namespace="default", duration=30,
                                   lifetime_margin=20))
    assert line == ("Remote tcpdumps would end after at most 170 s (--duration 30 s plus "
                    "startup_timeout 120 s plus lifetime_margin 20 s).")


@pytest.mark.parametrize("profile", [
    Profile(labels="app=web", namespace="default", follow=False, duration=30,
            lifetime_margin=20, startup_timeout=5),
    Profile(labels="app=web", namespace="default", follow=False, max_lifetime=900),
])
async def test_the_bound_shown_is_the_bound_the_remote_side_gets(profile: Profile,
                                                                  tmp_path: Path) -> None:
    """--dry-run and the capture take the bound from one place: what the dry run says is what
    the watchdog is told."""
    cluster = FakeCluster()
    cluster.add_pod(make_pod("web-a", labels={"app": "web"}))
    mode = FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name, total=3))
    shown = (await dry_run(cluster, mode, profile))[-1]
    await Session(cluster, mode, profile.replace(duration=None) if profile.duration is None
                  else profile, FileOutput(str(tmp_path / "o.pcapng"), grace=5)).run()
    assert f"at most {mode.specs[0].lifetime:g} s (" in shown
