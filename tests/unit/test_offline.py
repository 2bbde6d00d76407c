"""`multisniff merge` and `multisniff inspect` as a user runs them: files in, exit codes out."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import capturefiles as cf
import pytest
from test_pcap_merging import order_of, source_file
from test_pcap_reading import read_all

from multisniff import offline
from multisniff.cli import main
from multisniff.errors import ExitCode
from multisniff.pcap import core

pytestmark = pytest.mark.usefixtures("pcap_core")


@pytest.fixture
def two_inputs(tmp_path: Path) -> tuple[Path, Path]:
    web = tmp_path / "web-1.pcap"
    db = tmp_path / "db-0.pcap"
    web.write_bytes(source_file(0, [10**6 + 2 * n for n in range(50)]))
    db.write_bytes(source_file(1, [10**6 + 2 * n + 1 for n in range(50)]))
    return web, db


def test_merge_names_interfaces_after_files_and_orders_packets(
        two_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    assert main(["merge", *map(str, two_inputs), "-o", str(out)]) == ExitCode.OK
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    reader, _ = read_all(out.read_bytes())
    assert [i.name for i in reader.interfaces] == ["web-1", "db-0"]
    order = order_of(out.read_bytes())
    assert order == [(n % 2, n // 2) for n in range(100)]


def test_merge_tightens_the_mode_of_an_existing_output(two_inputs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out.pcapng"
    out.write_bytes(b"old")
    out.chmod(0o644)
    assert main(["merge", *map(str, two_inputs), "-w", str(out)]) == ExitCode.OK
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_merge_name_option_and_collisions(two_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    web, db = two_inputs
    out = tmp_path / "out.pcapng"
    code = main(["merge", str(web), str(db), "-o", str(out), "--name", f"{db}=web-1"])
    assert code == ExitCode.OK
    reader, _ = read_all(out.read_bytes())
    assert [i.name for i in reader.interfaces] == ["web-1", "web-1#2"]


def test_merge_keeps_interfaces_of_a_multi_interface_input(tmp_path: Path) -> None:
    multi = tmp_path / "node.pcapng"
    multi.write_bytes(cf.shb() + cf.idb(name="eth0") + cf.epb(0, 1, b"a") + cf.idb()
                      + cf.epb(1, 2, b"b"))
    single = tmp_path / "one.pcapng"
    single.write_bytes(cf.shb() + cf.idb(name="eth0") + cf.epb(0, 3, b"c"))
    out = tmp_path / "out.pcapng"
    assert main(["merge", str(multi), str(single), "-o", str(out)]) == ExitCode.OK
    reader, _ = read_all(out.read_bytes())
    assert [i.name for i in reader.interfaces] == ["node:eth0", "node:1", "one"]


def test_merge_of_a_truncated_input_writes_every_complete_packet(
        two_inputs: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    web, db = two_inputs
    db.write_bytes(db.read_bytes()[:-4])
    out = tmp_path / "out.pcapng"
    assert main(["merge", str(web), str(db), "-o", str(out)]) == ExitCode.PARTIAL
    order = order_of(out.read_bytes())
    assert len(order) == 99
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert str(db) in message and "byte 1102" in message and "49 packets" in message


def test_merge_of_a_missing_or_foreign_file_fails_in_one_sentence(
        two_inputs: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    web, _ = two_inputs
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a capture\n")
    out = tmp_path / "out.pcapng"
    assert main(["merge", str(web), str(tmp_path / "nope.pcap"), "-o", str(out)]) == \
        ExitCode.NOTHING
    assert main(["merge", str(web), str(text), "-o", str(out)]) == ExitCode.NOTHING
    assert main(["merge", str(web), str(tmp_path), "-o", str(out)]) == ExitCode.NOTHING
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(messages) == 3
    assert "no such file" in messages[0] and "not a capture file" in messages[1]
    assert "directory" in messages[2]
    assert all(m.endswith(".") and "\n" not in m for m in messages)
    assert not out.exists()


def test_merge_needs_an_output_and_refuses_to_overwrite_an_input(
        two_inputs: tuple[Path, Path]) -> None:
    web, db = two_inputs
    assert main(["merge", str(web), str(db)]) == ExitCode.USAGE
    assert main(["merge", str(web), str(db), "-o", str(db)]) == ExitCode.USAGE


def test_inspect_json_shape_and_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cap.pcapng"
    path.write_bytes(cf.shb() + cf.idb(name="eth0", tsresol=9, extra=[(3, b"the nic")])
                     + cf.epb(0, 1_700_000_000_000_000_001, b"abc", orig=1500)
                     + cf.epb(0, 1_700_000_000_999_999_999, b"de")
                     + cf.idb(name="idle")
                     + cf.isb(0, 5, ifdrop=3, osdrop=4))
    assert main(["inspect", str(path), "--json"]) == ExitCode.OK
    printed = capsys.readouterr().out
    document = json.loads(printed)
    assert printed == json.dumps(document, indent=2) + "\n"  # written interface by interface
    assert document == {
        "file": str(path),
        "packets": 2,
        "interfaces": [
            {"name": "eth0", "description": "the nic", "linktype": 1, "packets": 2,
             "bytes": 1502, "first": "1700000000.000000001", "last": "1700000000.999999999",
             "dropped": 7},
            {"name": "idle", "description": None, "linktype": 1, "packets": 0, "bytes": 0,
             "first": None, "last": None, "dropped": None},
        ],
    }


def test_inspect_text_and_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cut.pcap"
    path.write_bytes(source_file(0, [10**6, 2 * 10**6, 3 * 10**6])[:-2])
    assert main(["inspect", str(path)]) == ExitCode.PARTIAL
    out = capsys.readouterr().out
    assert "pcap, 1 interface, 2 packets" in out
    assert "1.000000" in out and "2.000000" in out
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert str(path) in message and "byte 68" in message


def test_no_traceback_for_any_damage(tmp_path: Path) -> None:
    import random

    rng = random.Random(3)
    base = source_file(0, list(range(10**6, 10**6 + 40)))
    base_ng = (cf.shb() + cf.idb(name="x") + cf.epb(0, 1, b"a" * 30) + cf.spb(b"s")
               + cf.nrb([(b"\1\2\3\4", ["n"])]) + cf.isb(0, 1, ifdrop=1))
    for round_number in range(120):
        blob = bytearray(rng.choice([base, base_ng]))
        for _ in range(rng.randint(1, 5)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if round_number % 3 == 0:
            del blob[rng.randrange(len(blob)) :]
        path = tmp_path / f"fuzz{round_number}.pcap"
        path.write_bytes(bytes(blob))
        out = tmp_path / "fuzz.pcapng"
        for argv in (["inspect", str(path), "--json"], ["merge", str(path), "-o", str(out)]):
            code = main(argv)
            assert code in (ExitCode.OK, ExitCode.PARTIAL, ExitCode.NOTHING)


def test_offline_commands_do_not_import_the_kubernetes_client(
        two_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    web, db = two_inputs
    script = (
        "import sys\n"
        "from multisniff.cli import main\n"
        f"assert main(['merge', {str(web)!r}, {str(db)!r}, '-o', {str(tmp_path / 'o')!r}]) == 0\n"
        f"assert main(['inspect', {str(web)!r}]) == 0\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('kubernetes_asyncio', 'aiohttp', 'anyio')]\n"
        "print('LOADED', loaded)\n"
        # nor the other sub-commands' modules (bundles, record, capture): memory and start-up
        "ours = sorted(m for m in sys.modules if m.count('.') > 1 or m.split('.')[-1] in "
        "('bundles', 'record', 'profiles', 'api', 'engine', 'kube'))\n"
        "print('OURS', [m for m in ours if not m.startswith('multisniff.pcap.')])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "LOADED []" in result.stdout
    assert "OURS []" in result.stdout


def test_merge_to_stdout(two_inputs: tuple[Path, Path]) -> None:
    web, db = two_inputs
    result = subprocess.run([sys.executable, "-m", "multisniff", "merge", str(web), str(db),
                             "-o", "-"], capture_output=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert len(order_of(result.stdout)) == 100


def test_write_blocks_writes_everything_in_order_through_short_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multisniff import offline

    blocks = [bytes([n % 251]) * (n % 37) for n in range(3 * offline.IOV_MAX + 5)]
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        # at most 1000 bytes per call, often ending inside a block
        taken: list[bytes] = []
        room = 1000
        for buffer in buffers:
            taken.append(buffer[:room])
            room -= len(taken[-1])
            if not room:
                break
        return real_writev(fd, taken)

    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        offline.write_blocks(fd, blocks, str(out))
        monkeypatch.setattr(os, "writev", short_writev)
        offline.write_blocks(fd, blocks, str(out))
    finally:
        os.close(fd)
    assert out.read_bytes() == b"".join(blocks) * 2


def test_write_blocks_to_a_full_device_is_one_sentence() -> None:
    from multisniff import offline
    from multisniff.errors import OutputError

    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OutputError, match="Cannot write /dev/full: no space left on device"):
            offline.write_blocks(fd, [b"x" * 100], "/dev/full")
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    not core.available(), reason="the compiled core is not built"))])
def test_the_census_counts_interfaces_and_resolutions_of_every_section(
        tmp_path: Path, name: str) -> None:
    """Before merging, every block header of a pcapng input is walked (the compiled core does
    the walk of each chunk at once): interfaces of big-endian sections count too, and a block
    length that cannot be right ends the census there."""
    many = b"".join(cf.epb(0, n, bytes(40)) for n in range(20000))  # several chunks of headers
    files = {
        "one": (cf.shb() + cf.idb() + many, 1, {10**6}),
        "late": (cf.shb() + cf.idb() + many + cf.idb(tsresol=9) + cf.epb(1, 5, b"x"),
                 2, {10**6, 10**9}),
        "big-endian": (cf.shb(">") + cf.idb(">", tsresol=3) + cf.idb(">")
                       + cf.epb(1, 5, b"x", order=">"), 2, {10**3, 10**6}),
        "sections": (cf.shb() + cf.idb() + many + cf.shb(">") + cf.idb(">", tsresol=9)
                     + cf.shb() + cf.idb(tsresol=3), 3, {10**3, 10**6, 10**9}),
        "bad length": (cf.shb() + cf.idb() + cf.epb(0, 1, b"x")[:4] + struct.pack("<I", 13)
                       + bytes(20) + cf.idb(tsresol=9), 1, {10**6}),
    }
    for label, (data, interfaces, units) in files.items():
        path = tmp_path / f"{label}.pcapng"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            with core.use(name):
                census = offline.take_census(str(path), fd)
        finally:
            os.close(fd)
        assert (label, census.interfaces, census.units) == (label, interfaces, units)
