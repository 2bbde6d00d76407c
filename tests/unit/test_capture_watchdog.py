"""The watchdog, compiled here and run locally: each way of stopping ends its program, which
gets SIGINT first (and SIGKILL after the grace), and nothing is left behind; with --batch, the
program's output is passed on whole and in order, in batches (its first write, tcpdump's
header, at once; a lone packet after the delay), and a reader that stops reading does not keep
anything alive past the bounds."""

from __future__ import annotations

import os
import select
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


@pytest.fixture(params=[(), ("--batch", "0.05")], ids=["direct", "batched"])
def relay(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The stopping rules hold whether the program's stdout is ours or relayed by us."""
    return tuple(request.param)


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


def test_stdin_eof_stops_the_program_with_sigint(watchdog: Path, relay: tuple[str, ...]) -> None:
    proc = start(watchdog, "--lifetime", "60", *relay, program=["sh", "-c", TRAPPER])
    assert proc.stdin is not None
    proc.stdin.close()

    assert finish(proc) == (3, "INT\n")


def test_the_lifetime_stops_the_program(watchdog: Path, relay: tuple[str, ...]) -> None:
    began = time.monotonic()
    proc = start(watchdog, "--lifetime", "0.5", *relay, program=["sh", "-c", TRAPPER])

    assert finish(proc) == (3, "INT\n")
    assert time.monotonic() - began >= 0.5  # not before its lifetime


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_to_the_watchdog_stop_the_program(watchdog: Path, signum: int,
                                                  relay: tuple[str, ...]) -> None:
    proc = start(watchdog, "--lifetime", "60", *relay, program=["sh", "-c", TRAPPER])
    proc.send_signal(signum)

    assert finish(proc) == (3, "INT\n")


def test_a_program_ignoring_sigint_is_killed_after_the_grace(watchdog: Path,
                                                             relay: tuple[str, ...]) -> None:
    proc = start(watchdog, "--lifetime", "0.5", "--grace", "0.5", *relay,
                 program=["sh", "-c", 'trap "" INT; echo started; while :; do sleep 0.05; done'])

    assert finish(proc)[0] == 128 + signal.SIGKILL


def test_exit_status_pidfile_and_remove(watchdog: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "lib").mkdir(parents=True)
    (bundle / "lib" / "x.so").write_bytes(b"x")
    pidfile = bundle / "run.pid"
    proc = start(watchdog, "--lifetime", "60", "--remove", str(bundle), "--pidfile",
                 str(pidfile), program=["sh", "-c", 'trap "exit 7" INT; echo started; '
                                        'while :; do sleep 0.05; done'])
    # (The program runs until told: one that waited on its stdin got EOF at once, as the
    # watchdog keeps stdin for itself, and ended, with the pidfile, before it was read.)
    assert int(pidfile.read_text()) == proc.pid
    os.kill(int(pidfile.read_text()), signal.SIGINT)

    assert finish(proc)[0] == 7
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


def test_batched_output_arrives_whole_and_in_order(watchdog: Path) -> None:
    # Many small writes, as tcpdump -U makes one per packet.
    script = 'i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done'
    proc = subprocess.Popen([str(watchdog), "--lifetime", "60", "--batch", "0.2", "--", "sh",
                             "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)

    assert finish(proc) == (0, "".join(f"line {i}\n" for i in range(20000)))


def read_within(proc: subprocess.Popen[bytes], size: int, seconds: float) -> bytes:
    """`size` bytes of the watchdog's stdout, or fewer when `seconds` pass first (a bound far
    beyond any delay under test, so no timing is asserted)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + seconds
    while len(got) < size and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, size - len(got))
            if not chunk:
                break
            got += chunk
    return got


def stop_and_reap(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=10)


def test_the_programs_first_write_goes_out_at_once(watchdog: Path) -> None:
    # tcpdump's file header: with an hour's batch interval, only the first-write rule can
    # send it on while the program lives.
    proc = subprocess.Popen([str(watchdog), "--lifetime", "60", "--batch", "3600", "--", "sh",
                             "-c", "echo header; exec sleep 60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    got = read_within(proc, 7, 30)
    alive = proc.poll() is None

    assert stop_and_reap(proc) == 128 + signal.SIGINT
    assert (got, alive) == (b"header\n", True)


def test_a_lone_packet_goes_out_after_the_delay_not_at_the_end(watchdog: Path) -> None:
    # A packet after the header, then silence: the delay since it began to wait sends it on,
    # well before the program ends (at stdin's EOF, after the read below).
    proc = subprocess.Popen([str(watchdog), "--lifetime", "60", "--batch", "0.05", "--", "sh",
                             "-c", "echo header; sleep 0.2; echo packet; exec sleep 60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    got = read_within(proc, 14, 30)
    alive = proc.poll() is None

    assert stop_and_reap(proc) == 128 + signal.SIGINT
    assert (got, alive) == (b"header\npacket\n", True)


def test_a_small_batch_waits_for_its_delay(watchdog: Path, tmp_path: Path) -> None:
    # After the header has gone on, a packet waits for its delay (an hour here): the
    # program's end, not the delay, is what sends it on.
    go = tmp_path / "go"
    os.mkfifo(go)
    proc = subprocess.Popen([str(watchdog), "--lifetime", "60", "--batch", "3600", "--", "sh",
                             "-c", f"echo header; read -r _ < {go}; echo packet; exec sleep 60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = read_within(proc, 7, 30)
    with go.open("w") as fifo:
        fifo.write("go\n")
    early = read_within(proc, 7, 0.5)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    rest = proc.stdout.read()
    proc.stdout.close()

    assert proc.wait(timeout=10) == 128 + signal.SIGINT
    assert first + early + rest == b"header\npacket\n"
    assert early == b""


def test_a_big_batch_goes_out_before_it_is_old(watchdog: Path) -> None:
    # An hour's interval: only the batch size (64 KiB) can send these bytes on before the end.
    proc = subprocess.Popen([str(watchdog), "--lifetime", "60", "--batch", "3600", "--", "sh",
                             "-c", "head -c 70000 /dev/zero; exec sleep 60"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    got = proc.stdout.read(64 * 1024)
    proc.stdin.close()
    rest = proc.stdout.read()
    proc.wait(timeout=10)
    proc.stdout.close()

    assert len(got) == 64 * 1024
    assert len(got) + len(rest) == 70000


def test_a_reader_that_stops_reading_does_not_keep_anything_alive(watchdog: Path) -> None:
    # Nobody reads: the relay fills, the program blocks writing. The lifetime still stops it,
    # and what it wrote last is given up after the grace instead of waiting forever.
    with subprocess.Popen([str(watchdog), "--lifetime", "0.5", "--grace", "0.5", "--batch",
                           "0.05", "--", "sh", "-c", "exec yes multisniff"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        code = proc.wait(timeout=30)

    assert code == 128 + signal.SIGINT
