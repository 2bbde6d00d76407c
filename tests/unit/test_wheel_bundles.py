"""The wheel built from this tree ships both upload bundles and the compiled core, and a client
that installs it uses them as they are: no gcc, apt, dpkg or Rust on its PATH, an empty bundle
cache, nothing built."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from wheelbuild import build_wheel, copy_tree, fresh_venv

from multisniff._version import __version__
from multisniff.capture.bundlebuild import (
    BUFFER_TIMEOUT_PATCH,
    TCPDUMP_PATCHES,
    foreign_architectures,
    host_arch,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),  # the first build compiles tcpdump twice; later ones reuse it
    pytest.mark.skipif(host_arch() != "amd64", reason="cross-builds arm64 from amd64"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("gcc", "aarch64-linux-gnu-gcc", "dpkg"))
        or "arm64" not in foreign_architectures(),
        reason="the package build needs gcc, gcc-aarch64-linux-gnu and dpkg (see .ci/setup)",
    ),
]


RUST = shutil.which("cargo") is not None and shutil.which("rustc") is not None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = copy_tree(tmp_path_factory.mktemp("tree"))
    # Where Rust is, a wheel without the compiled core is a broken build, not a fallback.
    env = {**os.environ, "MULTISNIFF_REQUIRE_CORE": "1" if RUST else "0"}
    built, log = build_wheel(tree, tmp_path_factory.mktemp("wheel"), env=env)
    print(log)
    return built


def test_the_wheel_ships_a_small_bundle_for_each_architecture(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())

    for arch in ("amd64", "arm64"):
        for name in ("bundle.tar.gz", "bundle.index.json", "watchdog.sha256"):
            assert f"multisniff/capture/bundles/{arch}/{name}" in names
        # tcpdump built from Debian's sources, without D-Bus, systemd and libcrypto: tcpdump,
        # libc and the loader are all of it (from Debian's packages: 18 libraries, 5.4 MB).
        index = json.loads(archive.read(f"multisniff/capture/bundles/{arch}/bundle.index.json"))
        assert index["manifest"]["built_from"]["recipe"] == "debian-source"
        # with multisniff's patch, named with the digest of the diff it was built from
        assert index["manifest"]["built_from"]["tcpdump_patches"] == {
            BUFFER_TIMEOUT_PATCH:
                hashlib.sha256(TCPDUMP_PATCHES[BUFFER_TIMEOUT_PATCH].read_bytes()).hexdigest()}
        libraries = sorted(n for n in index["manifest"]["files"] if n.startswith("lib/"))
        assert [n for n in libraries if "ld-linux" not in n] == ["lib/libc.so.6"]
        assert archive.getinfo(f"multisniff/capture/bundles/{arch}/bundle.tar.gz").file_size \
            < 2_500_000



@pytest.mark.skipif(os.geteuid() != 0, reason="captures on lo")
def test_the_shipped_tcpdump_takes_a_buffer_timeout(wheel: Path, tmp_path: Path) -> None:
    archive = zipfile.ZipFile(wheel).read("multisniff/capture/bundles/amd64/bundle.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    tcpdump = [str(tmp_path / "lib" / "ld-linux-x86-64.so.2"), "--library-path",
               str(tmp_path / "lib"), str(tmp_path / "tcpdump"), "-Z", "root"]

    refused = subprocess.run([*tcpdump, "--buffer-timeout=0", "-w", "/dev/null"],
                             capture_output=True, text=True, timeout=30)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with subprocess.Popen(
                [*tcpdump, "-U", "--buffer-timeout=20", "-i", "lo", "-c", "3", "-w",
                 str(tmp_path / "out.pcap"), f"udp port {port}"],
                stderr=subprocess.PIPE, text=True) as capture:
            assert capture.stderr is not None
            assert "listening on" in capture.stderr.readline()
            for _ in range(30):  # until tcpdump has 3 (a block handed over after 20 ms)
                s.sendto(b"MSNF buffer timeout", ("127.0.0.1", port))
                if capture.poll() is not None:
                    break
                time.sleep(0.1)
            capture.terminate()
            assert capture.wait(timeout=30) == 0

    assert refused.returncode != 0
    assert "invalid buffer timeout 0 (milliseconds" in refused.stderr
    count = subprocess.run(["capinfos", "-c", "-M", str(tmp_path / "out.pcap")],
                           capture_output=True, text=True, check=True).stdout
    assert "Number of packets:   3" in count, count


@pytest.mark.skipif(not RUST, reason="the compiled core needs Rust (cargo, rustc) to build")
def test_the_wheel_is_one_abi3_wheel_with_the_compiled_core(wheel: Path) -> None:
    # PyO3's abi3-py310: one wheel per platform for every CPython from 3.10 on.
    assert wheel.name == f"multisniff-{__version__}-cp310-abi3-linux_x86_64.whl"
    cores = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("multisniff/_core")]
    assert cores == ["multisniff/_core.abi3.so"]


def test_a_client_without_compiler_or_apt_uses_the_shipped_bundles(
        wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    site_packages = fresh_venv(venv)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True, timeout=120)
    cache = tmp_path / "empty-cache"
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "MULTISNIFF_BUNDLES": str(cache),
           "LANG": os.environ.get("LANG", "C.UTF-8")}

    listing = subprocess.run([venv / "bin" / "multisniff", "bundles", "list", "--json"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    version = subprocess.run([venv / "bin" / "multisniff", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    loaded = subprocess.run(
        [venv / "bin" / "python", "-c",
         "import hashlib, json, shutil, multisniff\n"
         "from multisniff.capture.bundlecache import bundle_for, watchdog_for\n"
         "print(json.dumps({'module': multisniff.__file__,"
         " 'tools': [t for t in ('gcc', 'aarch64-linux-gnu-gcc', 'apt-get', 'dpkg', 'cargo',"
         " 'rustc')"
         " if shutil.which(t)],"
         " 'digests': {a: bundle_for(a).digest for a in ('amd64', 'arm64')},"
         " 'watchdogs': {a: hashlib.sha256(watchdog_for(a)).hexdigest()"
         " for a in ('amd64', 'arm64')},"
         " 'in_bundles': {a: bundle_for(a).manifest['files']['msnf-watchdog']['sha256']"
         " for a in ('amd64', 'arm64')}}))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["arch"], r["source"], r["used"]) for r in rows] == [
        ("amd64", "wheel", True), ("arm64", "wheel", True)]
    assert all(r["path"].startswith(str(site_packages)) for r in rows)
    assert loaded.returncode == 0, loaded.stderr
    facts = json.loads(loaded.stdout)
    assert facts["module"].startswith(str(site_packages))
    assert facts["tools"] == []
    assert facts["digests"] == {r["arch"]: r["digest"] for r in rows}
    assert facts["watchdogs"] == facts["in_bundles"]  # the ephemeral mode's, from the bundle
    assert not cache.exists()  # nothing was built or cached
    assert version.returncode == 0, version.stderr
    if RUST:
        said = version.stdout + version.stderr  # argparse's exit message goes to stderr
        assert said.startswith(f"multisniff {__version__}, compiled core "), said
        assert said.rstrip().endswith("(Rust)"), said
