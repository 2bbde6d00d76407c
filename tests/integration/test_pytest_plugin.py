"""The pytest plugin with pytester against the real cluster: one recording for the session with
marks per test phase and outcome, or one per test; kept for failed tests and listed in the
terminal summary; off unless asked for. tshark reads the marks."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import apply_and_wait, workload_pod

pytestmark = pytest.mark.cluster
pytest_plugins = ["pytester"]

TESTS = '''
def test_passes(multisniff):
    multisniff.mark("inside the passing test")


def test_fails(multisniff):
    multisniff.mark("inside the failing test")
    assert False
'''


@pytest.fixture(scope="module")
def pods(cluster: Any) -> Iterator[tuple[str, str]]:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed")
    label = f"msnf-plugin-{secrets.token_hex(3)}"
    with throwaway_namespace(cluster, "msx-plugin") as namespace:
        apply_and_wait(cluster, [workload_pod("idle", namespace, labels={label: "x"},
                                              command=["sleep", "3600"])])
        yield label, namespace


def marks(path: Path) -> list[str]:
    done = subprocess.run(
        ["tshark", "-r", str(path), "-Y", 'frame.interface_name == "multisniff/events"',
         "-T", "fields", "-e", "frame.comment"], capture_output=True, text=True, check=True,
        timeout=60)
    return [line for line in done.stdout.splitlines() if line.startswith("mark: ")]


@pytest.fixture
def pytester_on_the_cluster(pytester: pytest.Pytester, cluster: Any,
                            monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    return pytester


def run(pytester: pytest.Pytester, pods: tuple[str, str], *options: str) -> pytest.RunResult:
    label, namespace = pods
    pytester.makepyfile(test_inner=TESTS)
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--multisniff-selector", f"{label}=x",
        "--multisniff-namespace", namespace, "--multisniff-dir",
        str(pytester.path / "recordings"), *options, timeout=240)


def test_one_recording_for_the_session_with_a_mark_per_phase(
        pytester_on_the_cluster: pytest.Pytester, pods: tuple[str, str]) -> None:
    pytester = pytester_on_the_cluster
    result = run(pytester, pods)
    result.assert_outcomes(passed=1, failed=1)
    kept = list((pytester.path / "recordings").glob("session-*.pcapng"))
    assert len(kept) == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*multisniff recordings*",
                                 f"kept {kept[0]} (failed: test_inner.py::test_fails)"])
    passes, fails = "mark: test_inner.py::test_passes", "mark: test_inner.py::test_fails"
    assert marks(kept[0]) == [
        f"{passes} setup", f"{passes} setup: passed", f"{passes} call",
        "mark: inside the passing test", f"{passes} call: passed", f"{passes} teardown",
        f"{passes} teardown: passed",
        f"{fails} setup", f"{fails} setup: passed", f"{fails} call",
        "mark: inside the failing test", f"{fails} call: failed", f"{fails} teardown",
        f"{fails} teardown: passed",
    ]


def test_one_recording_per_test_kept_for_the_failed_one(
        pytester_on_the_cluster: pytest.Pytester, pods: tuple[str, str]) -> None:
    pytester = pytester_on_the_cluster
    result = run(pytester, pods, "--multisniff-per-test")
    result.assert_outcomes(passed=1, failed=1)
    kept = sorted((pytester.path / "recordings").iterdir())
    assert [path.name for path in kept] == ["test_inner.py_test_fails.pcapng"]
    result.stdout.fnmatch_lines([f"kept {kept[0]} (failed: test_inner.py::test_fails)"])
    assert "inside the failing test" in " ".join(marks(kept[0]))
    assert "test_passes" not in " ".join(marks(kept[0]))


def test_off_unless_asked_for(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, failed=1)  # marks go nowhere
    assert "multisniff recordings" not in result.stdout.str()
    assert not (pytester.path / "multisniff-recordings").exists()
