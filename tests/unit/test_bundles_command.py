"""`multisniff bundles list|build|export|import` and the order a run looks for a bundle in:
shipped in the package, then the user's cache, then built here.

The bundles here are made of tiny ELF files written by the test (a dynamic "tcpdump" with its
loader, a static "watchdog"): real bundles as far as the format goes, made without a compiler
and in milliseconds. The package's store is pointed at a temporary directory."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from multisniff.capture import bundlestore
from multisniff.capture.bundle import MANIFEST_NAME, Bundle, Sysroot, build_bundle
from multisniff.capture.bundlebuild import WATCHDOG_NAME, watchdog_source_digest
from multisniff.capture.bundlecache import BundleUnavailable, bundle_for, watchdog_for
from multisniff.cli import main

MACHINES = {"amd64": 62, "arm64": 183, "riscv64": 243}
LOADERS = {"amd64": "/lib64/ld-linux-x86-64.so.2", "arm64": "/lib/ld-linux-aarch64.so.1",
           "riscv64": "/lib/ld-linux-riscv64-lp64d.so.1"}


def tiny_elf(machine: int, *, interpreter: str | None = None, payload: bytes = b"") -> bytes:
    """A 64-bit little-endian ELF file: static, or dynamic through ``interpreter``."""
    phnum = 1 if interpreter else 0
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9),
                         2 if interpreter else 3, machine, 1, 0, 64 if phnum else 0, 0, 0,
                         64, 56, phnum, 64, 0, 0)
    if not interpreter:
        return header + payload
    name = interpreter.encode() + b"\0"
    program_header = struct.pack("<IIQQQQQQ", 3, 4, 64 + 56, 0, 0, len(name), len(name), 1)
    return header + program_header + name + payload


def make_bundle(tmp_path: Path, arch: str, *, version: bytes = b"1",
                watchdog_source: str | None = None) -> tuple[Bundle, bytes]:
    """A bundle for ``arch`` with a tcpdump, its loader and a watchdog; and the watchdog."""
    root = tmp_path / f"sysroot-{arch}-{version.decode()}"
    loader = root / LOADERS[arch].lstrip("/")
    loader.parent.mkdir(parents=True, exist_ok=True)
    loader.write_bytes(tiny_elf(MACHINES[arch]))
    tcpdump = root / "tcpdump"
    tcpdump.write_bytes(tiny_elf(MACHINES[arch], interpreter=LOADERS[arch], payload=version))
    watchdog = tiny_elf(MACHINES[arch], payload=b"watchdog " + version)
    bundle = build_bundle(
        sysroot=Sysroot(root), programs=(), built_programs={"tcpdump": tcpdump},
        static_programs={WATCHDOG_NAME: watchdog},
        notes={"watchdog_source_sha256": watchdog_source or watchdog_source_digest()})
    return bundle, watchdog


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the package's store, the user's cache), both empty."""
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    monkeypatch.setattr(bundlestore, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("MULTISNIFF_BUNDLES", str(cache))
    return shipped, cache


@dataclass
class Outcome:
    code: int
    stdout: str
    messages: list[logging.LogRecord]


Cli = Callable[..., Outcome]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> Callable[..., Outcome]:
    """Runs the command line as `multisniff` does: exit code, stdout, and what it logged."""

    def run(*argv: str) -> Outcome:
        capsys.readouterr()
        caplog.clear()
        code = main(list(argv))
        return Outcome(code, capsys.readouterr().out, list(caplog.records))

    return run


def test_the_package_store_comes_before_the_cache(
        stores: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped, cache = stores
    in_package, package_watchdog = make_bundle(tmp_path, "amd64", version=b"package")
    in_cache, cache_watchdog = make_bundle(tmp_path, "amd64", version=b"cache")
    bundlestore.save(shipped / "amd64", in_package, watchdog=package_watchdog)
    bundlestore.save(cache / "amd64", in_cache, watchdog=cache_watchdog)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # building would fail: no gcc

    assert bundle_for("amd64").digest == in_package.digest
    assert watchdog_for("amd64") == package_watchdog

    (shipped / "amd64" / "msnf-watchdog.sha256").unlink()  # as in a wheel: in the bundle only
    assert watchdog_for("amd64") == package_watchdog

    (shipped / "amd64" / "bundle.tar.gz").unlink()
    assert bundle_for("amd64").digest == in_cache.digest
    assert watchdog_for("amd64") == cache_watchdog


def test_without_a_stored_bundle_one_is_built(
        stores: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))

    with pytest.raises(BundleUnavailable, match="needs gcc, which is not installed"):
        bundle_for("amd64")


def test_a_bundle_with_another_versions_watchdog_is_passed_over(
        stores: tuple[Path, Path], tmp_path: Path) -> None:
    shipped, cache = stores
    old, old_watchdog = make_bundle(tmp_path, "amd64", version=b"old")
    current, watchdog = make_bundle(tmp_path, "amd64", version=b"current")
    bundlestore.save(shipped / "amd64", old, watchdog=old_watchdog)
    (shipped / "amd64" / "watchdog.sha256").write_text("0" * 64 + "\n")
    bundlestore.save(cache / "amd64", current, watchdog=watchdog)

    assert bundle_for("amd64").digest == current.digest


def test_list_says_which_bundle_is_where_and_which_is_used(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    shipped, cache = stores
    amd64, amd64_watchdog = make_bundle(tmp_path, "amd64", version=b"package")
    older, older_watchdog = make_bundle(tmp_path, "amd64", version=b"cache")
    arm64, arm64_watchdog = make_bundle(tmp_path, "arm64")
    bundlestore.save(shipped / "amd64", amd64, watchdog=amd64_watchdog)
    bundlestore.save(cache / "amd64", older, watchdog=older_watchdog)
    bundlestore.save(cache / "arm64", arm64, watchdog=arm64_watchdog, origin="imported")

    rows = json.loads(cli("bundles", "list", "--json").stdout)

    assert [(r["arch"], r["digest"], r["source"], r["used"]) for r in rows] == [
        ("amd64", amd64.digest, "wheel", True),
        ("amd64", older.digest, "cache", False),
        ("arm64", arm64.digest, "imported", True),
    ]
    assert rows[0]["size"] == (shipped / "amd64" / "bundle.tar.gz").stat().st_size
    table = cli("bundles", "list").stdout
    assert f"amd64  {amd64.digest[:12]}" in table
    assert "(not used: an earlier one is)" in table.splitlines()[2]


def test_list_names_the_architectures_without_a_bundle(
        cli: Cli, stores: tuple[Path, Path]) -> None:
    table = cli("bundles", "list").stdout

    assert "amd64  -" in table
    assert "multisniff bundles build --arch arm64" in table


def test_export_then_import_moves_the_bundles_in_use(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    shipped, cache = stores
    amd64, amd64_watchdog = make_bundle(tmp_path, "amd64")
    arm64, arm64_watchdog = make_bundle(tmp_path, "arm64")
    bundlestore.save(shipped / "amd64", amd64, watchdog=amd64_watchdog)
    bundlestore.save(cache / "arm64", arm64, watchdog=arm64_watchdog)
    exported = tmp_path / "usb-stick"

    cli("bundles", "export", str(exported))

    files = sorted(p.name for p in exported.iterdir())
    assert files == [f"multisniff-bundle-amd64-{amd64.digest[:12]}.tar.gz",
                     f"multisniff-bundle-arm64-{arm64.digest[:12]}.tar.gz"]
    assert (exported / files[0]).read_bytes() == amd64.targz

    # The air-gapped machine: a package without bundles, an empty cache, no compiler.
    monkeypatch.setattr(bundlestore, "SHIPPED_DIR", tmp_path / "other-package")
    monkeypatch.setenv("MULTISNIFF_BUNDLES", str(tmp_path / "other-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    cli("bundles", "import", str(exported))

    rows = json.loads(cli("bundles", "list", "--json").stdout)
    assert [(r["arch"], r["digest"], r["source"]) for r in rows] == [
        ("amd64", amd64.digest, "imported"), ("arm64", arm64.digest, "imported")]
    assert bundle_for("arm64").targz == arm64.targz
    assert watchdog_for("arm64") == arm64_watchdog


def fails(cli: Cli, *argv: str) -> str:
    """The one sentence a failing command says, without a traceback; it prints nothing."""
    outcome = cli(*argv)
    assert outcome.code == 3
    assert outcome.stdout == ""
    assert [(m.levelno, m.exc_info) for m in outcome.messages] == [(logging.ERROR, None)]
    return outcome.messages[0].getMessage()


def import_fails(cli: Cli, directory: Path, cache: Path) -> str:
    """What an import of ``directory`` says; it fails and imports nothing."""
    line = fails(cli, "bundles", "import", str(directory))
    assert not cache.exists()
    return line


def test_a_damaged_file_is_named_and_nothing_is_imported(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache = stores
    good, _ = make_bundle(tmp_path, "amd64")
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "a-good.tar.gz").write_bytes(good.targz)
    (directory / "b-cut.tar.gz").write_bytes(good.targz[: len(good.targz) // 2])

    line = import_fails(cli, directory, cache)

    assert f"{directory / 'b-cut.tar.gz'} is not a readable bundle" in line
    assert line.endswith("copy it whole; nothing was imported.")


def test_a_file_that_is_no_bundle_is_named(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "notes.tar.gz").write_text("these are my notes\n")

    line = import_fails(cli, directory, stores[1])

    assert f"{directory / 'notes.tar.gz'} is not a readable bundle" in line


def test_a_changed_file_inside_is_found_by_the_manifest(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    good, _ = make_bundle(tmp_path, "amd64")
    raw = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(good.targz)) as source, \
            tarfile.open(fileobj=raw, mode="w:gz") as changed:
        for member in source.getmembers():
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "tcpdump" and data is not None:
                content = data.read() + b"x"
                member.size = len(content)
                data = io.BytesIO(content)
            changed.addfile(member, data)
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "changed.tar.gz").write_bytes(raw.getvalue())

    line = import_fails(cli, directory, stores[1])

    assert "does not match its manifest" in line


def test_a_tar_without_a_manifest_is_no_bundle(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "hello.tar.gz").write_bytes(raw.getvalue())

    line = import_fails(cli, directory, stores[1])

    assert f"has no {MANIFEST_NAME}" in line


def test_a_bundle_for_another_architecture_is_refused(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    riscv, _ = make_bundle(tmp_path, "riscv64")
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "riscv.tar.gz").write_bytes(riscv.targz)

    line = import_fails(cli, directory, stores[1])

    assert "is a bundle for riscv64-linux-gnu, not one of the architectures" in line


def test_a_bundle_of_another_version_is_refused(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    other, _ = make_bundle(tmp_path, "amd64", watchdog_source="f" * 64)
    directory = tmp_path / "in"
    directory.mkdir()
    (directory / "other.tar.gz").write_bytes(other.targz)

    line = import_fails(cli, directory, stores[1])

    assert "was made by another version of multisniff" in line


def test_import_of_a_directory_without_bundles_says_so(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    line = import_fails(cli, tmp_path, stores[1])

    assert f"{tmp_path} has no bundle (*.tar.gz) in it" in line


def test_export_without_bundles_says_how_to_make_them(
        cli: Cli, stores: tuple[Path, Path], tmp_path: Path) -> None:
    line = fails(cli, "bundles", "export", str(tmp_path / "out"))

    assert line.endswith("make them with `multisniff bundles build` first.")
    assert not (tmp_path / "out").exists()
