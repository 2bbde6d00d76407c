"""Without -n or -A, multisniff looks where kubectl would: the namespace of the kubeconfig's
current context (or of --context), else "default"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from enginefakes import FakeCapture, FakeMode
from fakes import FakeCluster, make_pod

from multisniff.engine.session import dry_run, selector_of
from multisniff.kube.api import connect
from multisniff.profiles import Profile

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "team",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "team", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "team-b"}},
            {"name": "bare", "context": {"cluster": "c", "user": "u"}},
        ],
    }))
    return path


@pytest.mark.parametrize(("context", "namespace"),
                         [(None, "team-a"), ("other", "team-b"), ("bare", "default")])
async def test_connect_takes_the_namespace_of_the_context(
        kubeconfig: Path, context: str | None, namespace: str) -> None:
    async with connect(str(kubeconfig), context) as cluster:
        assert cluster.default_namespace == namespace


def test_selector_uses_the_default_only_without_n_or_a() -> None:
    assert selector_of(Profile(labels="app=web"), "team-a").namespace == "team-a"
    assert selector_of(Profile(labels="app=web", namespace="shop"), "team-a").namespace == "shop"
    assert selector_of(Profile(labels="app=web", all_namespaces=True), "team-a").namespace is None


async def test_dry_run_looks_in_the_clusters_default_namespace() -> None:
    cluster = FakeCluster(default_namespace="team-a")
    cluster.add_pod(make_pod("web-a", namespace="team-a", labels={"app": "web"}))
    cluster.add_pod(make_pod("web-d", namespace="default", labels={"app": "web"}))

    mode = FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name))
    text = "\n".join(await dry_run(cluster, mode, Profile(labels="app=web")))

    assert "1 pod in namespace team-a match app=web" in text
    assert "team-a/web-a" in text and "web-d" not in text
