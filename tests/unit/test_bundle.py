"""The tcpdump bundle runs from where it is unpacked, with nothing of the host's libraries."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from multisniff.capture.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleError,
    Sysroot,
    build_bundle,
    load_bundle,
    read_elf,
    resolve_closure,
)

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs the host's tcpdump")


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return build_bundle()


def unpack(bundle: Bundle, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(bundle.targz), mode="r:gz") as tar:
        tar.extractall(into, filter="data")
    return into


def test_tcpdump_runs_through_the_bundled_loader(bundle: Bundle, tmp_path: Path) -> None:
    root = unpack(bundle, tmp_path)
    assert bundle.loader == "lib/ld-linux-x86-64.so.2"
    proc = subprocess.run(
        ["./lib/ld-linux-x86-64.so.2", "--library-path", "./lib", "./tcpdump", "--version"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/nonexistent"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "tcpdump version" in proc.stdout
    assert "libpcap version" in proc.stdout


def test_the_closure_holds_every_needed_library(bundle: Bundle) -> None:
    names = {f.name for f in bundle.files}
    elves = {f.name: read_elf(f.data, name=f.name) for f in bundle.files if f.name != MANIFEST_NAME}
    assert {"tcpdump", "lib/libpcap.so.0.8", "lib/libc.so.6"} <= names
    for name, elf in elves.items():
        for needed in elf.needed:
            assert f"lib/{needed}" in names, f"{name} needs {needed}, which is not bundled"
    # and against the loader's own opinion, for the host
    ldd = subprocess.run(["ldd", shutil.which("tcpdump") or ""], capture_output=True, text=True)
    for line in ldd.stdout.splitlines():
        soname = line.split()[0]
        if "=>" in line and soname != "linux-vdso.so.1":
            assert f"lib/{soname}" in names, f"ldd lists {soname}, the bundle lacks it"


def test_the_manifest_says_what_is_inside(bundle: Bundle) -> None:
    manifest_file = next(f for f in bundle.files if f.name == MANIFEST_NAME)
    manifest = json.loads(manifest_file.data)
    assert manifest["digest"] == bundle.digest
    assert manifest["loader"] == bundle.loader
    assert manifest["interpreter"] == "/lib64/ld-linux-x86-64.so.2"
    assert manifest["multiarch"] == "x86_64-linux-gnu"
    assert manifest["programs"]["tcpdump"]["args"] == ["-Z", "root"]
    listed = manifest["files"]
    assert set(listed) == {f.name for f in bundle.files} - {MANIFEST_NAME}
    for f in bundle.files:
        if f.name != MANIFEST_NAME:
            assert listed[f.name]["sha256"] == f.sha256
    assert bundle.command("tcpdump", ["-i", "any"], root="/tmp/b") == [
        "/tmp/b/lib/ld-linux-x86-64.so.2",
        "--library-path",
        "/tmp/b/lib",
        "/tmp/b/tcpdump",
        "-Z",
        "root",
        "-i",
        "any",
    ]


def test_the_same_inputs_give_the_same_bytes(bundle: Bundle) -> None:
    again = build_bundle()
    assert again.targz == bundle.targz
    assert again.digest == bundle.digest
    assert again.directory_name == f"multisniff-bundle-{bundle.digest[:16]}"


def _pcap_with_one_udp_packet() -> bytes:
    payload = b"MSNF unit 1"
    udp = struct.pack("!HHHH", 40000, 9999, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02"
    )
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    record = struct.pack("<IIII", 1_700_000_000, 0, len(frame), len(frame))
    return header + record + frame


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chroot") is None, reason="needs root")
def test_it_runs_in_a_root_with_nothing_else(bundle: Bundle, tmp_path: Path) -> None:
    """chroot into a directory holding only the bundle: no host libc, no shell, no ld.so.cache.

    The one thing tcpdump takes from the root it runs in is /etc/passwd: as root, even with
    ``-Z root``, it looks the user up before it reads or captures anything.
    """
    root = unpack(bundle, tmp_path / "root")
    (root / "one.pcap").write_bytes(_pcap_with_one_udp_packet())
    argv = [
        shutil.which("chroot") or "chroot",
        str(root),
        *bundle.command("tcpdump", ["-n", "-r", "/one.pcap"], root="/"),
    ]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={})

    without_passwd = run()
    assert without_passwd.returncode != 0
    assert "Couldn't find user 'root'" in without_passwd.stderr

    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert "10.0.0.1.40000 > 10.0.0.2.9999: UDP, length 11" in proc.stdout


def test_a_sysroot_is_read_from_inside(bundle: Bundle, tmp_path: Path) -> None:
    """A copy of the closure under another root, with absolute symlinks as unpacked .debs have,
    bundles to the same digest: nothing is looked up outside the sysroot."""
    sysroot = tmp_path / "sysroot"
    closure = resolve_closure(Sysroot(), ["tcpdump"])
    for item in [*closure.programs.values(), *closure.libraries.values(), closure.loader]:
        real = Sysroot().resolve(item.path)
        copy = sysroot / str(real).lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, copy)
        soname = copy.with_name(Path(item.path).name)
        if not soname.exists():  # libpcap.so.0.8 -> libpcap.so.0.8.1
            soname.symlink_to(real.name)
    # merged /usr as on Debian, and an absolute symlink for the loader (usr/lib64 in bookworm)
    (sysroot / "lib").symlink_to("usr/lib")
    (sysroot / "lib64").symlink_to("usr/lib64")
    (sysroot / "usr" / "lib64").mkdir()
    triplet = closure.loader.elf.multiarch
    (sysroot / "usr" / "lib64" / "ld-linux-x86-64.so.2").symlink_to(
        f"/lib/{triplet}/ld-linux-x86-64.so.2"
    )
    again = build_bundle(sysroot=Sysroot(sysroot))
    assert again.digest == bundle.digest


def test_a_missing_library_is_named(tmp_path: Path) -> None:
    tcpdump = Sysroot().resolve(Sysroot().find_program("tcpdump"))
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(tcpdump, tmp_path / "usr" / "bin" / "tcpdump")
    with pytest.raises(BundleError, match=r"loader /lib64/ld-linux-x86-64.so.2 .* is not in"):
        build_bundle(sysroot=Sysroot(tmp_path))
    loader = Sysroot().resolve("/lib64/ld-linux-x86-64.so.2")
    (tmp_path / "lib64").mkdir()
    shutil.copy2(loader, tmp_path / "lib64" / "ld-linux-x86-64.so.2")
    with pytest.raises(BundleError, match=r"/usr/bin/tcpdump needs libcrypto.so.3, which is in"):
        build_bundle(sysroot=Sysroot(tmp_path))


def test_elf_errors_say_what_is_wrong() -> None:
    with pytest.raises(BundleError, match="is not an ELF file"):
        read_elf(b"#!/bin/sh\n" + b"\0" * 60, name="script")
    tcpdump = Sysroot().resolve(Sysroot().find_program("tcpdump")).read_bytes()
    with pytest.raises(BundleError, match="is truncated"):
        read_elf(tcpdump[:64] + b"\0" * 8, name="cut")


def test_a_static_program_is_refused(tmp_path: Path) -> None:
    # a minimal ELF64 header with no program headers: what a static, non-PIE file looks like here
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHI", 2, 62, 1) + b"\0" * 40
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "static").write_bytes(header)
    info = read_elf(header, name="static")
    assert info.interpreter is None and info.needed == () and info.multiarch == "x86_64-linux-gnu"
    with pytest.raises(BundleError, match="has no ELF interpreter"):
        build_bundle(sysroot=Sysroot(tmp_path), programs=["/bin/static"])


def test_a_loaded_bundle_uploads_the_bytes_it_was_loaded_from(bundle: Bundle) -> None:
    archive = bundle.targz
    loaded = load_bundle(archive)
    assert loaded.digest == bundle.digest
    # the very same object: nothing is compressed again for each upload
    assert loaded.targz is archive
