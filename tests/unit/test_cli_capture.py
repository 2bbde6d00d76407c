"""The capture command line: parsing both shapes, profile overrides, usage errors and exit
codes, summary JSON; the session itself is tested in test_engine_session.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multisniff import cli
from multisniff.errors import ExitCode
from multisniff.profiles import PACKAGE_PROFILES


def args_of(*argv: str):  # type: ignore[no-untyped-def]
    return cli.build_capture_parser().parse_args(list(argv))


def test_flags_override_the_profile() -> None:
    args = args_of("--profile", str(PACKAGE_PROFILES / "dns.toml"), "-n", "other", "-f",
                   "udp", "--duration", "30s", "--max-size", "1M", "--no-follow", "-o", "x")
    profile = cli.profile_from_args(args)
    assert profile.labels == "k8s-app=kube-dns"
    assert profile.namespace == "other"
    assert profile.filter == "udp"
    assert profile.duration == 30
    assert profile.max_size == 1 << 20
    assert profile.follow is False
    assert profile.snaplen == 4096


def test_all_namespaces_clears_the_profile_namespace() -> None:
    profile = cli.profile_from_args(args_of("--profile", "dns", "-A"))
    assert profile.all_namespaces and profile.namespace is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-o", "x.pcapng"], "Say which pods to capture with -l"),
        (["-l", "app=web"], "Say where the capture goes: -o FILE"),
        (["-l", "app=web", "-o", "x", "--wireshark"], "either -o or --wireshark"),
        (["-l", "app=web", "-n", "a", "-A", "-o", "x"], "either -n NAMESPACE or -A"),
        (["-l", "app=web", "--duration", "soon", "-o", "x"], "'soon' is not a duration"),
        (["-l", "app=web", "--count", "0", "-o", "x"], "--count must be more than 0"),
        (["-l", "app=web", "--profile", "nope", "-o", "x"], "No profile named 'nope'"),
    ],
)
def test_usage_errors_exit_2_with_a_sentence(argv: list[str], message: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    assert cli.main(argv) == ExitCode.USAGE
    assert message in caplog.text


def test_unknown_flag_is_argparse_usage() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--bogus"])
    assert info.value.code == 2


def test_subcommands_still_parse_with_their_own_options(tmp_path: Path) -> None:
    assert cli._is_subcommand(["merge", "a", "-o", "b"])
    assert cli._is_subcommand(["--debug", "inspect", "f"])
    assert not cli._is_subcommand(["-l", "merge"])
    assert cli.main(["merge", str(tmp_path / "missing.pcap"), "-o",
                     str(tmp_path / "o.pcapng")]) == ExitCode.NOTHING


def test_profiles_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profiles"]) == 0
    listed = capsys.readouterr().out
    for name in ("dns", "http", "all-traffic", "chaos-ci"):
        assert name in listed
    assert cli.main(["profiles", "show", "dns"]) == 0
    shown = capsys.readouterr().out
    assert 'filter = "port 53"' in shown and "# container is unset" in shown
    assert cli.main(["profiles", "show"]) == ExitCode.USAGE


def test_summary_json_on_an_early_error(tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    kubeconfig = tmp_path / "missing-kubeconfig"
    result = subprocess.run(
        [sys.executable, "-m", "multisniff", "-l", "app=web", "-o", str(tmp_path / "o"),
         "--kubeconfig", str(kubeconfig), "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    data = json.loads(summary.read_text())
    assert data["exit_code"] == ExitCode.USAGE
    assert data["error"] and data["pods"] == [] and data["totals"]["packets"] == 0
    assert "Traceback" not in result.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sigint_stops_the_session_with_130(tmp_path: Path, anyio_backend: str) -> None:
    import os
    import signal

    import anyio
    from enginefakes import FakeCapture, FakeMode, registered
    from fakes import FakeCluster, make_pod

    from multisniff import api

    cluster = FakeCluster()
    cluster.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    mode = FakeMode(make=lambda target: FakeCapture(name=target.pod.ref.name, total=1,
                                                    interval=0.005, forever=True))
    out = tmp_path / "o.pcapng"

    async def interrupt() -> None:
        await anyio.sleep(0.4)
        os.kill(os.getpid(), signal.SIGINT)

    with registered(mode):
        args = args_of("-l", "app=web", "-n", "shop", "-o", str(out), "--mode", "fake")
        settings = api.settings_for(cli.profile_from_args(args))
        cap = api.capture(profile=settings, output=args.output, cluster=cluster)
        async with anyio.create_task_group() as tg:
            tg.start_soon(interrupt)
            with anyio.fail_after(20):
                result = await cli.run_with_ui(cap, debug=False)
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.stop_reason == "interrupted (SIGINT)"
    assert all(capture.closed for capture in mode.opened)
    assert out.stat().st_size > 0
