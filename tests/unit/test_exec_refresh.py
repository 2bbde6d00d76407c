"""Tokens from an exec credential plugin: asked again only when the token is about to expire,
and once for requests that need one together. The plugin is a shell script that counts its
runs; the requests' authentication is what the generated client does before each request."""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import anyio
import pytest

from multisniff.kube.api import connect

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def kubeconfig_with_plugin(tmp_path: Path, lifetime: int) -> tuple[Path, Path]:
    counter, plugin, path = tmp_path / "calls", tmp_path / "plugin.sh", tmp_path / "config"
    plugin.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo call >> '{counter}'
        n=$(wc -l < '{counter}')
        expires=$(date -u -d "+{lifetime} seconds" +%Y-%m-%dT%H:%M:%SZ)
        printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
        printf '"status":{{"token":"token-%s","expirationTimestamp":"%s"}}}}\\n' $n "$expires"
        """))
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
            "interactiveMode": "Never"}}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return path, counter


async def bearer_tokens(kubeconfig: Path, requests: int) -> list[str]:
    """The Authorization header of `requests` requests made together."""
    tokens: list[str] = []
    async with connect(str(kubeconfig)) as cluster:
        configuration = cluster._rest.configuration

        async def one() -> None:
            settings = await configuration.auth_settings()
            tokens.append(settings["BearerToken"]["value"])

        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(one)
    return tokens


async def test_a_token_with_minutes_left_is_kept(tmp_path: Path) -> None:
    # Two minutes is within the client library's own five-minute margin: it alone would run
    # the plugin for every request.
    kubeconfig, counter = kubeconfig_with_plugin(tmp_path, lifetime=120)
    tokens = await bearer_tokens(kubeconfig, requests=6)
    assert tokens == ["Bearer token-1"] * 6
    assert len(counter.read_text().splitlines()) == 1


async def test_an_expiring_token_is_asked_again_one_run_at_a_time(tmp_path: Path) -> None:
    kubeconfig, counter = kubeconfig_with_plugin(tmp_path, lifetime=1)
    tokens = await bearer_tokens(kubeconfig, requests=3)
    calls = len(counter.read_text().splitlines())
    # The first token came with the configuration; each request then found it about to expire
    # and got the next one, in turn (never two runs giving the same number).
    assert calls == 4, calls
    assert sorted(tokens) == [f"Bearer token-{n}" for n in (2, 3, 4)]
