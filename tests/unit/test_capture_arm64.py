"""The arm64 bundle, made from Debian's arm64 packages and the cross compiler, runs under
qemu-user: tcpdump through the bundled loader, and the watchdog around it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from multisniff.capture.bundlecache import bundle_for, foreign_architectures, host_arch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(host_arch() != "amd64", reason="cross-builds from amd64"),
    pytest.mark.skipif(
        shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-gcc") is None
        or "arm64" not in foreign_architectures(),
        reason="needs qemu-user, gcc-aarch64-linux-gnu and dpkg --add-architecture arm64",
    ),
]


@pytest.fixture(scope="module")
def arm64_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("MULTISNIFF_BUNDLES")
    if cache is None:  # keep the downloaded sysroot between runs, not the bundles of a test
        os.environ["MULTISNIFF_BUNDLES"] = str(tmp_path_factory.mktemp("bundles"))
    try:
        bundle = bundle_for("arm64")
    finally:
        if cache is None:
            del os.environ["MULTISNIFF_BUNDLES"]
    root = tmp_path_factory.mktemp("arm64")
    with tarfile.open(fileobj=io.BytesIO(bundle.targz), mode="r:gz") as tar:
        tar.extractall(root, filter="data")
    assert bundle.manifest["multiarch"] == "aarch64-linux-gnu"
    assert bundle.loader == "lib/ld-linux-aarch64.so.1"
    return root


def test_bundled_tcpdump_runs_under_qemu(arm64_bundle: Path) -> None:
    result = subprocess.run(
        ["qemu-aarch64", "./lib/ld-linux-aarch64.so.1", "--library-path", "./lib",
         "./tcpdump", "--version"],
        cwd=arm64_bundle, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "tcpdump version" in result.stdout + result.stderr


def test_bundled_watchdog_runs_under_qemu_and_passes_the_exit_status(arm64_bundle: Path) -> None:
    # Without binfmt_misc the kernel cannot exec arm64 files: the watchdog's child is qemu.
    # Its stdin stays open until the end: EOF would stop tcpdump before it printed anything.
    keep_open, writer = os.pipe()
    try:
        result = subprocess.run(
            ["qemu-aarch64", "./msnf-watchdog", "--lifetime", "30", "--",
             shutil.which("qemu-aarch64") or "qemu-aarch64", "./lib/ld-linux-aarch64.so.1",
             "--library-path", "./lib", "./tcpdump", "-Z", "root", "--version"],
            cwd=arm64_bundle, stdin=keep_open, capture_output=True, text=True, timeout=60)
    finally:
        os.close(keep_open)
        os.close(writer)

    assert result.returncode == 0, result.stderr
    assert "tcpdump version" in result.stdout + result.stderr
