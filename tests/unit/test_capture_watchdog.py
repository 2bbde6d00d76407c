"""The watchdog, compiled here and run locally: each way of stopping ends its program, which
gets SIGINT first (and SIGKILL after the grace), and nothing is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from multisniff.capture.bundlecache import compile_watchdog, host_arch

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

# Prints "INT" and exits 3 on SIGINT; ignores nothing else.
TRAPPER = 'trap "echo INT; exit 3" INT; echo started; while :; do sleep 0.05; done'


@pytest.fixture(scope="module")
def watchdog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("watchdog") / "msnf-watchdog"
    path.write_bytes(compile_watchdog(host_arch()))
    path.chmod(0o755)
    return path


def start(watchdog: Path, *args: str, program: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(watchdog), *args, "--", *program], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 10) -> tuple[int, str]:
    """Wait for the end without closing stdin (whose EOF would stop the watchdog)."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    proc.stdout.close()
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    return proc.returncode, out


def test_stdin_eof_stops_the_program_with_sigint(watchdog: Path) -> None:
    proc = start(watchdog, "--lifetime", "60", program=["sh", "-c", TRAPPER])
    assert proc.stdin is not None
    proc.stdin.close()

    assert finish(proc) == (3, "INT\n")


def test_the_lifetime_stops_the_program(watchdog: Path) -> None:
    began = time.monotonic()
    proc = start(watchdog, "--lifetime", "0.5", program=["sh", "-c", TRAPPER])

    assert finish(proc) == (3, "INT\n")
    assert time.monotonic() - began >= 0.5  # not before its lifetime


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_to_the_watchdog_stop_the_program(watchdog: Path, signum: int) -> None:
    proc = start(watchdog, "--lifetime", "60", program=["sh", "-c", TRAPPER])
    proc.send_signal(signum)

    assert finish(proc) == (3, "INT\n")


def test_a_program_ignoring_sigint_is_killed_after_the_grace(watchdog: Path) -> None:
    proc = start(watchdog, "--lifetime", "0.5", "--grace", "0.5",
                 program=["sh", "-c", 'trap "" INT; echo started; while :; do sleep 0.05; done'])

    assert finish(proc)[0] == 128 + signal.SIGKILL


def test_exit_status_pidfile_and_remove(watchdog: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "lib").mkdir(parents=True)
    (bundle / "lib" / "x.so").write_bytes(b"x")
    pidfile = bundle / "run.pid"
    proc = start(watchdog, "--lifetime", "60", "--remove", str(bundle), "--pidfile",
                 str(pidfile), program=["sh", "-c", "echo started; read -r _; exit 7"])
    assert int(pidfile.read_text()) == proc.pid
    os.kill(int(pidfile.read_text()), signal.SIGINT)

    assert finish(proc)[0] == 7 or proc.returncode == 128 + signal.SIGINT
    assert not bundle.exists()


def test_a_program_that_cannot_start_is_127(watchdog: Path) -> None:
    with subprocess.Popen([str(watchdog), "--lifetime", "5", "--", "/nonexistent/prog"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        # stdin stays open until the end: its EOF would stop the watchdog first.
        result_code = proc.wait(timeout=10)
        assert proc.stderr is not None
        stderr = proc.stderr.read()

    assert result_code == 127
    assert "cannot run /nonexistent/prog" in stderr


def test_usage_errors_are_2(watchdog: Path) -> None:
    result = subprocess.run([str(watchdog), "--", "true"], capture_output=True, text=True,
                            timeout=10)

    assert result.returncode == 2
    assert "usage: msnf-watchdog --lifetime" in result.stderr
