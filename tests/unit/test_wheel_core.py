"""The compiled core as packaged: the sdist carries the crate; without a Rust toolchain the package
installs from it with the pure-Python core and says so in the build log; with the aarch64 target
and cross linker, it makes an arm64 wheel whose core loads in Debian's arm64 Python under
qemu-user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import capturefiles as cf
import pytest
from wheelbuild import ROOT, build_sdist, build_wheel, client_env, copy_tree, fresh_venv

from multisniff._version import __version__
from multisniff.capture.bundlebuild import foreign_architectures, host_arch, prepare_sysroot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _rust_sysroot_has(target: str) -> bool:
    rustc = shutil.which("rustc")
    if rustc is None:
        return False
    sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True,
                             check=False).stdout.strip()
    return bool(sysroot) and (Path(sysroot) / "lib" / "rustlib" / target / "lib").is_dir()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdist(copy_tree(tmp_path_factory.mktemp("tree")),
                       tmp_path_factory.mktemp("sdist"))


def test_the_sdist_carries_the_crate(sdist: Path) -> None:
    crate = subprocess.run(["git", "ls-files", "rust/Cargo.toml", "rust/Cargo.lock", "rust/src"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert "rust/src/lib.rs" in crate
    assert set(crate) <= names
    assert not any(name.startswith(("rust/target", "rust/fuzz")) for name in names)


@pytest.mark.skipif(shutil.which("capinfos") is None, reason="needs capinfos (wireshark-common)")
def test_without_rust_the_sdist_installs_with_the_pure_python_core(
        sdist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    fresh_venv(venv)
    # No cargo or rustc on PATH, and rustup's homes hidden (its proxies read them).
    env = client_env(venv, tmp_path, CARGO_HOME=str(tmp_path / "no-cargo"),
                     RUSTUP_HOME=str(tmp_path / "no-rustup"), MULTISNIFF_WHEEL_BUNDLES="none",
                     **{k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    if any(shutil.which(tool, path=env["PATH"]) for tool in ("cargo", "rustc")):
        pytest.skip("this machine has Rust in /usr/bin, which no PATH here can hide")

    install = subprocess.run([venv / "bin" / "pip", "install", "-v", "--no-deps", str(sdist)],
                             env=env, capture_output=True, text=True, timeout=500)
    version = subprocess.run([venv / "bin" / "multisniff", "--version"], env=env,
                             capture_output=True, text=True, timeout=60)
    a, b, out = tmp_path / "a.pcap", tmp_path / "b.pcap", tmp_path / "merged.pcapng"
    a.write_bytes(cf.pcap_file([(100, n * 2, b"a" * 60, 60) for n in range(5)]))
    b.write_bytes(cf.pcap_file([(100, n * 2 + 1, b"b" * 70, 70) for n in range(4)],
                               order=">", nano=True))
    merge = subprocess.run([venv / "bin" / "multisniff", "merge", "-o", str(out), str(a), str(b)],
                           env=env, capture_output=True, text=True, timeout=60)

    assert install.returncode == 0, install.stderr[-3000:]
    log = [line.strip() for line in (install.stdout + install.stderr).splitlines()
           if "multisniff:" in line and "Rust" in line]
    assert log == ["multisniff: no Rust toolchain (cargo, rustc) on PATH: installing with the "
                   "pure-Python core only; install Rust (rustup) and reinstall for the compiled "
                   "one."]
    assert version.returncode == 0, version.stderr
    said = version.stdout + version.stderr  # argparse's exit message goes to stderr
    assert said.startswith(f"multisniff {__version__}, pure-Python core (the compiled core is "
                           "not built"), said
    assert merge.returncode == 0, merge.stderr
    info = subprocess.run(["capinfos", "-M", "-c", "-T", str(out)], capture_output=True,
                          text=True, check=True).stdout
    assert info.splitlines()[-1].split("\t")[-1] == "9"


@pytest.mark.skipif(
    host_arch() != "amd64" or not _rust_sysroot_has("aarch64-unknown-linux-gnu")
    or any(shutil.which(t) is None for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64", "dpkg"))
    or "arm64" not in foreign_architectures(),
    reason="needs an amd64 host with Rust's aarch64-unknown-linux-gnu target (rustup target add), "
           "gcc-aarch64-linux-gnu, qemu-user and dpkg --add-architecture arm64 (see .ci/setup)")
def test_the_arm64_wheel_cross_built_from_the_sdist_loads_in_an_arm64_python(
        sdist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "MULTISNIFF_REQUIRE_CORE": "1", "MULTISNIFF_WHEEL_BUNDLES": "none",
           "CARGO_BUILD_TARGET": "aarch64-unknown-linux-gnu",
           "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER": "aarch64-linux-gnu-gcc"}
    wheel, log = build_wheel(sdist, tmp_path / "wheel", env=env,
                             options=("-C--build-option=--plat-name=linux_aarch64",), timeout=500)
    # Debian's arm64 Python 3 with its libraries, unpacked (never installed) into a sysroot.
    monkeypatch.setenv("MULTISNIFF_BUNDLES", str(tmp_path / "sysroots"))
    root = prepare_sysroot("arm64", program="python3")
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    core = unpacked / "multisniff" / "_core.abi3.so"
    header = subprocess.run(["readelf", "-h", str(core)], capture_output=True, text=True,
                            check=True).stdout
    dependencies = Path(pytest.__file__).parents[1]  # this venv's: pure Python ones suffice
    ran = subprocess.run(
        ["qemu-aarch64", "-L", str(root), str(root / "usr" / "bin" / "python3"), "-I", "-c",
         f"import sys; sys.path[:0] = [{str(unpacked)!r}, {str(dependencies)!r}]\n"
         "import platform, multisniff, multisniff._core as core\n"
         "from multisniff.pcap import core as choice\n"
         "print(platform.machine(), core.__file__, choice.describe())"],
        capture_output=True, text=True, timeout=120)

    assert wheel.name == f"multisniff-{__version__}-cp310-abi3-linux_aarch64.whl"
    assert "multisniff: built the compiled core (multisniff._core) for aarch64-unknown-linux-gnu" \
        in log
    assert "Machine:                           AArch64" in header
    assert ran.returncode == 0, ran.stderr
    machine, path, described = ran.stdout.strip().split(" ", 2)
    assert (machine, path) == ("aarch64", str(core))
    assert described.startswith("compiled core ") and described.endswith("(Rust)")
