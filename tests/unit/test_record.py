"""`multisniff record -- COMMAND` with fakes of our own interfaces: COMMAND runs once the pods
capture, its exit code comes through, its start, end and marks (`multisniff mark` from inside
it) are on the timeline, --keep, the summary JSON, and the ways it cannot run. Signals and the
real cluster: tests/integration/test_record_cluster.py."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from enginefakes import BASE_SECONDS, FakeCapture, FakeMode, registered
from fakes import FakeCluster, make_pod

import multisniff
from multisniff import cli
from multisniff.capture.model import Target
from multisniff.engine.events import EVENTS_INTERFACE
from multisniff.errors import ExitCode, UsageError
from multisniff.record import send_mark, split_command
from multisniff.recorder import Recorder

TSHARK = shutil.which("tshark")


def now_capture(target: Target) -> FakeCapture:
    offset = int((time.time() - BASE_SECONDS) * 1e6)
    return FakeCapture(name=target.pod.ref.name, total=1, interval=0.005, step_us=5000,
                       offset_us=offset, forever=True)


@pytest.fixture
def mode() -> Iterator[FakeMode]:
    with registered(FakeMode(make=now_capture, name="fake-rec")) as fake:
        yield fake


def cluster() -> FakeCluster:
    fake = FakeCluster()
    fake.add_pod(make_pod("web-a", namespace="shop", labels={"app": "web"}))
    fake.add_pod(make_pod("web-b", namespace="shop", labels={"app": "web"}, ip="10.0.0.3"))
    return fake


def record(tmp_path: Path, command: list[str], *, keep: str = "on-failure",
           ready_timeout: float = 10, require_ready: bool = False,
           fake: FakeCluster | None = None, **settings: object) -> tuple[int, Path, dict]:
    out = tmp_path / "rec.pcapng"
    recorder = Recorder(
        multisniff.settings_for(None, labels="app=web", namespace="shop", mode="fake-rec",
                                **settings),
        command, output=str(out), summary=str(tmp_path / "rec.json"),
        ready_timeout=ready_timeout, require_ready=require_ready, tail=0.2, keep=keep,
        cluster=fake or cluster())
    code = anyio.run(recorder.run, backend="asyncio")
    summary = json.loads((tmp_path / "rec.json").read_text())
    return code, out, summary


def event_comments(path: Path) -> list[str]:
    assert TSHARK is not None
    done = subprocess.run([TSHARK, "-r", str(path), "-Y",
                           f'frame.interface_name == "{EVENTS_INTERFACE}"', "-T", "fields",
                           "-e", "frame.comment"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_the_commands_exit_code_comes_through_and_the_failure_keeps_the_recording(
        tmp_path: Path, mode: FakeMode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="multisniff")
    marker = tmp_path / "ran"
    code, out, summary = record(tmp_path, ["sh", "-c", f"touch {marker}; sleep 0.3; exit 3"])
    assert code == 3
    assert marker.exists()
    assert out.exists() and not Path(str(out) + ".parts").exists()
    assert summary["exit_code"] == 3
    assert summary["command"]["exit_code"] == 3
    assert summary["command"]["how"] == "exit code 3"
    assert summary["kept"] == [str(out)]
    assert summary["totals"]["packets"] > 0
    assert {pod["pod"] for pod in summary["pods"]} == {"web-a", "web-b"}
    kinds = [event["kind"] for event in summary["events"]]
    assert kinds.index("command started") > max(
        i for i, kind in enumerate(kinds) if kind == "capture started")
    assert "command ended" in kinds
    # The kept paths are the last lines.
    last = [record.getMessage() for record in caplog.records][-2:]
    assert last == [f"kept {out}", f"kept {tmp_path / 'rec.json'}"]
    if TSHARK is not None:
        comments = event_comments(out)
        assert f"command started: sh -c 'touch {marker}; sleep 0.3; exit 3'" in comments
        assert any(c.startswith("command ended, exit code 3") for c in comments)


def test_success_removes_the_recording_on_failure_only_but_keeps_the_summary(
        tmp_path: Path, mode: FakeMode) -> None:
    code, out, summary = record(tmp_path, ["true"])
    assert code == 0
    assert not out.exists() and not Path(str(out) + ".parts").exists()
    assert summary["kept"] == []
    assert summary["exit_code"] == 0
    code, out, summary = record(tmp_path, ["false"], keep="never")
    assert code == 1 and not out.exists()
    code, out, summary = record(tmp_path, ["true"], keep="always")
    assert code == 0 and out.exists() and summary["kept"] == [str(out)]


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_marks_from_inside_the_command_are_on_the_timeline(tmp_path: Path,
                                                           mode: FakeMode) -> None:
    mark = [sys.executable, "-m", "multisniff", "mark"]
    script = (f"{' '.join(mark)} servers deleted && sleep 0.2 && "
              f"{' '.join(mark)} clients checked")
    code, out, summary = record(tmp_path, ["sh", "-c", script], keep="always")
    assert code == 0
    comments = event_comments(out)
    started = next(i for i, c in enumerate(comments) if c.startswith("command started"))
    ended = next(i for i, c in enumerate(comments) if c.startswith("command ended"))
    assert comments[started + 1:ended] == ["mark: servers deleted", "mark: clients checked"]
    assert [e["text"] for e in summary["events"] if e["kind"] == "mark"] == [
        "mark: servers deleted", "mark: clients checked"]


def test_a_command_that_is_not_there_exits_127_and_stops_the_capture(
        tmp_path: Path, mode: FakeMode) -> None:
    code, out, summary = record(tmp_path, [str(tmp_path / "no-such-script")])
    assert code == 127
    assert summary["command"]["how"] == "not found"
    assert out.exists()  # a failure: kept
    assert all(capture.closed for capture in mode.opened)


def test_require_ready_does_not_run_the_command_when_a_pod_is_slow(
        tmp_path: Path, mode: FakeMode) -> None:
    mode.open_delay["web-b"] = 3
    marker = tmp_path / "ran"
    code, _, summary = record(tmp_path, ["touch", str(marker)], ready_timeout=0.5,
                                require_ready=True)
    assert code == ExitCode.NOTHING
    assert not marker.exists()
    assert "shop/web-b" in summary["error"]
    assert summary["command"]["exit_code"] is None


def test_without_require_ready_the_command_runs_anyway(tmp_path: Path,
                                                       mode: FakeMode) -> None:
    mode.open_delay["web-b"] = 1
    marker = tmp_path / "ran"
    code, _, _ = record(tmp_path, ["touch", str(marker)], ready_timeout=0.2)
    assert code == 0
    assert marker.exists()


def test_a_capture_that_cannot_start_does_not_run_the_command(tmp_path: Path,
                                                              mode: FakeMode) -> None:
    marker = tmp_path / "ran"
    other = FakeCluster()
    other.add_pod(make_pod("db-a", namespace="shop", labels={"app": "db"}))
    code, _, summary = record(tmp_path, ["touch", str(marker)], follow=False, fake=other)
    assert code == ExitCode.NOTHING
    assert not marker.exists()
    assert "No pod in namespace shop matches app=web" in summary["error"]


def test_the_command_line_splits_at_the_double_dash() -> None:
    assert split_command(["record", "-l", "a=b", "--", "sh", "-c", "x -- y"]) == (
        ["record", "-l", "a=b"], ["sh", "-c", "x -- y"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["record", "-l", "app=web"], "record needs a command after --"),
        (["record", "-l", "app=web", "-o", "-", "--", "true"], "not -o -"),
        (["record", "-l", "app=web", "--tail", "soon", "--", "true"],
         "'soon' is not a duration"),
        (["record", "-o", "x.pcapng", "--", "true"], "Say which pods to capture with -l"),
        (["mark", "x"], "it is not set here"),
    ],
)
def test_usage_errors_exit_2_with_a_sentence(argv: list[str], message: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("MULTISNIFF_MARK_SOCKET", raising=False)
    assert cli.main(argv) == ExitCode.USAGE
    assert message in caplog.text


def test_a_mark_to_a_recording_that_ended_says_so(tmp_path: Path) -> None:
    with pytest.raises(multisniff.errors.MultisniffError, match="has it ended"):
        send_mark("late", path=str(tmp_path / "gone"))
    with pytest.raises(UsageError, match="not blank"):
        send_mark("  ", path=str(tmp_path / "gone"))


def test_the_readme_has_the_exit_code_table_as_the_code_has_it() -> None:
    from multisniff.record import exit_code_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("<!-- record-exit-codes -->\n") + len("<!-- record-exit-codes -->\n")
    end = readme.index("<!-- /record-exit-codes -->")
    assert readme[start:end].strip().splitlines() == exit_code_table()


def test_record_into_a_ring_of_files_keeps_or_removes_them_all(tmp_path: Path,
                                                              mode: FakeMode) -> None:
    from multisniff.engine.rotation import ring_files

    code, out, summary = record(tmp_path, ["sh", "-c", "sleep 0.5; exit 5"], rotate_size="4k",
                                keep_files=2)
    assert code == 5
    files = ring_files(str(out))
    assert 1 <= len(files) <= 2
    assert summary["kept"] == [str(path) for path in files]
    code, out, summary = record(tmp_path, ["true"], rotate_size="4k")
    assert code == 0 and ring_files(str(out)) == [] and summary["kept"] == []


def test_a_capture_over_before_the_command_starts_does_not_run_it(tmp_path: Path,
                                                                  mode: FakeMode) -> None:
    mode.refuse = {"web-a", "web-b"}
    marker = tmp_path / "ran"
    code, _, summary = record(tmp_path, ["touch", str(marker)], follow=False)
    assert code == ExitCode.NOTHING
    assert not marker.exists()
    assert summary["command"]["exit_code"] is None


def test_a_command_that_cannot_be_executed_exits_126(tmp_path: Path, mode: FakeMode) -> None:
    script = tmp_path / "no-shebang"
    script.write_bytes(b"\x7fELF not really\n")
    script.chmod(0o755)
    code, _, summary = record(tmp_path, [str(script)])
    assert code == 126
    assert summary["command"]["how"].startswith("cannot be executed (exec format error")
    script.chmod(0o644)
    code, _, summary = record(tmp_path, [str(script)])
    assert code == 126 and summary["command"]["how"] == "not executable"


@pytest.mark.parametrize("argv", [["--debug", "record", "-l", "a=b", "--", "true"],
                                  ["record", "--debug", "-l", "a=b", "--", "true"],
                                  ["record", "-l", "a=b", "--", "true", "--debug"]])
def test_debug_before_or_after_record_and_the_commands_own(argv: list[str]) -> None:
    arguments, command = split_command(argv)
    args = cli.build_parser(record=True).parse_args(arguments)
    assert args.debug is ("--debug" in arguments)
    assert command == ["true", "--debug"][:len(command)]
