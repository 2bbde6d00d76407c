"""Damaged captures, many of them: `inspect` and `merge` never raise, never hang, write only what
capinfos reads to the end, and never keep fewer packets than mergecap keeps from the same file.

Bases are real captures (tcpdump on the loopback interface, taken here; the same packets as
pcapng by editcap, and two interfaces in one pcapng by mergecap) and generated ones (both byte
orders, every block type, options, if_tsoffset, nanosecond and binary resolutions). Each case
damages one base in one to three ways, chosen by a seeded random generator: truncation, flipped
bytes, block lengths, option lengths, captured lengths, byte order, interface ids, timestamps at
both extremes, if_tsoffset and if_tsresol, blocks removed or repeated.

Damage to the first records of a classic pcap can make Wireshark take the file for one of the
pcap variants it guesses at (Nokia's, Red Hat's, ...: `captype` says so) and read the rest of it
as records of that variant; multisniff reads none of those variants, so for such a file the
packet count is not compared (everything else is).

MULTISNIFF_FUZZ_CASES sets the number of cases (40 by default, `make fuzz` runs many more) and
MULTISNIFF_FUZZ_SEED the seed. A failing case is kept as a file (in MULTISNIFF_FUZZ_FAILURES,
by default the test's temporary directory) and named in the failure with the damage done to it,
so that it can be replayed with `multisniff merge`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
import damagedfiles
from test_merge_tshark import wait_until_written

from multisniff.cli import main
from multisniff.errors import ExitCode

TOOLS = ("tcpdump", "editcap", "capinfos", "mergecap", "captype")
pytestmark = [
    pytest.mark.usefixtures("pcap_core"),
    pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo with tcpdump needs root"),
    pytest.mark.skipif(any(shutil.which(tool) is None for tool in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} on PATH"),
]

CASES = int(os.environ.get("MULTISNIFF_FUZZ_CASES", "40"))
SEED = int(os.environ.get("MULTISNIFF_FUZZ_SEED", "9"))
TIME_LIMIT = 30.0
"""Seconds one command may take on one damaged file (the largest base takes well under 1 s)."""


# --- bases ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("bases")
    real = _loopback_captures(directory)
    return {**real, **damagedfiles.generated()}


def _loopback_captures(directory: Path) -> dict[str, bytes]:
    """120 UDP datagrams of growing size on 127.0.0.1, captured by tcpdump with nanosecond and
    with microsecond timestamps; the pair also as pcapng made by editcap and mergecap."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        port = receiver.getsockname()[1]
        paths = {precision: directory / f"lo-{precision}.pcap" for precision in ("nano", "micro")}
        dumps = [subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-Z", "root",
             "--time-stamp-precision", precision, "-w", str(path), "udp", "dst", "port",
             str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for precision, path in paths.items()]
        try:
            for dump in dumps:
                assert dump.stderr is not None
                assert b"listening" in dump.stderr.readline()
            receiver.settimeout(10)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for n in range(120):
                    sender.sendto(bytes([n]) * (1 + 13 * n), ("127.0.0.1", port))
                    receiver.recv(65536)
            wait_until_written(dict.fromkeys(paths.values(), 120))
        finally:
            for dump in dumps:
                dump.send_signal(signal.SIGINT)
                dump.wait(timeout=30)
                if dump.stderr is not None:
                    dump.stderr.close()
    ng = directory / "lo.pcapng"
    both = directory / "lo-both.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(paths["nano"]), str(ng)], check=True,
                   capture_output=True)
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(both), *map(str, paths.values())],
                   check=True, capture_output=True)
    files = {path.name: path.read_bytes() for path in (*paths.values(), ng, both)}
    assert all(len(data) > 1000 for data in files.values()), {k: len(v) for k, v in
                                                              files.items()}
    return files


# --- the checks -------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


def run(argv: list[str]) -> tuple[int, str]:
    """`multisniff ARGV` in this process, under TIME_LIMIT: (exit code, stdout)."""
    out = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue()


def packets_read(path: Path) -> tuple[int | None, str]:
    """(packets capinfos counts, its complaint): None when it cannot read the file to its end."""
    result = subprocess.run(["capinfos", "-M", "-c", str(path)], capture_output=True,
                            text=True, check=False)
    counts = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
              if line.startswith("Number of packets")]
    count = int(counts[0]) if counts else 0
    return (count if result.returncode == 0 else None), result.stderr.strip()


def check(path: Path, workdir: Path) -> str | None:
    """What is wrong with what multisniff does with `path`, or None."""
    try:
        code, printed = run(["inspect", str(path), "--json"])
        if code not in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.NOTHING):
            return f"inspect exited {code}"
        if code != ExitCode.NOTHING:
            json.loads(printed)
        ours = workdir / "ours.pcapng"
        ours.unlink(missing_ok=True)
        code, _ = run(["merge", str(path), "-o", str(ours)])
    except Hang:
        return f"a command took more than {TIME_LIMIT} s"
    except Exception as exc:  # what the user would have seen as a traceback
        return f"{type(exc).__name__}: {exc}"
    if code not in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.NOTHING):
        return f"merge exited {code}"
    # when Wireshark guesses another format, its packets are not comparable
    kept = _kept_by_mergecap(path, workdir) if _read_as_pcap_or_pcapng(path) else 0
    if code == ExitCode.NOTHING:
        return None if kept == 0 else f"merge wrote nothing, mergecap kept {kept} packets"
    written, complaint = packets_read(ours)
    if written is None:
        return f"capinfos cannot read the merged file to its end: {complaint}"
    if written < kept:
        return f"merge kept {written} packets, mergecap {kept}"
    return None


def _read_as_pcap_or_pcapng(path: Path) -> bool:
    result = subprocess.run(["captype", str(path)], capture_output=True, text=True,
                            check=False)
    return result.stdout.rsplit(":", 1)[-1].strip() in ("pcap", "nsecpcap", "pcapng")


def _kept_by_mergecap(path: Path, workdir: Path) -> int:
    theirs = workdir / "theirs.pcapng"
    theirs.unlink(missing_ok=True)
    subprocess.run(["mergecap", "-F", "pcapng", "-w", str(theirs), str(path)],
                   capture_output=True, check=False)
    return (packets_read(theirs)[0] or 0) if theirs.exists() else 0


def test_damaged_captures(bases: dict[str, bytes], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    keep = Path(os.environ.get("MULTISNIFF_FUZZ_FAILURES", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    names = sorted(bases)
    failures: list[str] = []
    for number in range(CASES):
        name = names[number % len(names)]
        data, said = damagedfiles.damage(rng, bases[name])
        path = tmp_path / f"case{number}-{name}"
        path.write_bytes(data)
        problem = check(path, tmp_path)
        if problem is None:
            path.unlink()
        else:
            path = path.rename(keep / f"seed{SEED}-{path.name}")
            failures.append(f"{path} ({name}: {'; '.join(said)}): {problem}")
    assert not failures, (f"{len(failures)} of {CASES} cases failed (seed {SEED}):\n"
                          + "\n".join(failures[:20]))


def test_the_undamaged_bases_merge_as_mergecap_does(bases: dict[str, bytes],
                                                    tmp_path: Path) -> None:
    for name, data in bases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert check(path, tmp_path) is None, name


@pytest.mark.parametrize("name", sorted(damagedfiles.ALL))
def test_the_hand_made_damaged_files(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pcapng"
    path.write_bytes(damagedfiles.ALL[name]())
    assert check(path, tmp_path) is None
