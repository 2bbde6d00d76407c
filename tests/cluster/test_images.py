"""The test cluster's images: what is in each tarball, and that each one runs without the host.

These run without a cluster: they build the images (cached, so seconds when warm) with the real
entry point, tests/cluster/images/build, and look into the docker-archive tarballs it wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from multisniff.capture.bundle import build_bundle, read_elf

IMAGES_DIR = Path(__file__).resolve().parent / "images"
BUILD = IMAGES_DIR / "build"
sys.path.insert(0, str(IMAGES_DIR))

from dockerarchive import ImageConfig, Layer, docker_archive  # noqa: E402

pytestmark = pytest.mark.timeout(900)  # a cold Go build of CoreDNS takes minutes on 2 cores

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and namespaces need root")


@dataclass(frozen=True)
class Image:
    reference: str
    tarball: Path
    manifest: dict  # type: ignore[type-arg]
    config: dict  # type: ignore[type-arg]
    layer_tar: bytes

    def members(self) -> dict[str, tarfile.TarInfo]:
        with tarfile.open(fileobj=io.BytesIO(self.layer_tar)) as tar:
            return {m.name: m for m in tar.getmembers()}

    def read(self, name: str) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(self.layer_tar)) as tar:
            f = tar.extractfile(name)
            assert f is not None, f"{name} is not a regular file in {self.reference}"
            return f.read()

    def unpack(self, into: Path) -> Path:
        with tarfile.open(fileobj=io.BytesIO(self.layer_tar)) as tar:
            tar.extractall(into, filter="tar")  # absolute symlinks are the point of a rootfs
        return into


def open_image(reference: str, tarball: Path) -> Image:
    with tarfile.open(tarball) as outer:

        def member(name: str) -> bytes:
            f = outer.extractfile(name)
            assert f is not None
            return f.read()

        (manifest,) = json.loads(member("manifest.json"))
        config = json.loads(member(manifest["Config"]))
        (layer_name,) = manifest["Layers"]
        return Image(reference, tarball, manifest, config, member(layer_name))


@pytest.fixture(scope="module")
def build_output() -> str:
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def images(build_output: str) -> dict[str, Image]:
    cache = Path(os.environ.get("MULTISNIFF_CACHE", "/var/cache/multisniff"))
    index = json.loads((cache / "images" / "index.json").read_text())
    return {ref.split("/")[1].split(":")[0]: open_image(ref, Path(p)) for ref, p in index.items()}


# --- the archive format -------------------------------------------------------------------------


def test_every_image_is_listed_with_a_fully_qualified_name(images: dict[str, Image]) -> None:
    assert {"pause", "tools", "coredns", "workload"} <= set(images)
    for name, image in images.items():
        assert image.reference == f"multisniff.local/{name}:1"
        assert image.manifest["RepoTags"] == [image.reference]
        assert image.tarball.name.startswith(f"{name}-1-")


def test_the_config_names_the_layer_it_comes_with(images: dict[str, Image]) -> None:
    for image in images.values():
        config = image.config
        assert (config["architecture"], config["os"]) == ("amd64", "linux")
        diff_id = "sha256:" + hashlib.sha256(image.layer_tar).hexdigest()
        assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
        assert config["config"].get("Entrypoint") or config["config"].get("Cmd")
        image_id = image.manifest["Config"].removesuffix(".json")
        assert image.tarball.name.endswith(f"-{image_id[:12]}.tar")


def test_layers_are_deterministic(images: dict[str, Image]) -> None:
    for image in images.values():
        with tarfile.open(fileobj=io.BytesIO(image.layer_tar)) as tar:
            infos = tar.getmembers()
        names = [m.name for m in infos]
        assert names == sorted(names), image.reference
        for m in infos:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", ""), m.name


def test_a_second_build_changes_nothing(images: dict[str, Image]) -> None:
    before = {name: image.tarball.stat().st_mtime_ns for name, image in images.items()}
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "written" not in result.stderr
    assert result.stderr.count("unchanged") == len(images)
    after = {name: image.tarball.stat().st_mtime_ns for name, image in images.items()}
    assert after == before


def test_the_archive_writer_refuses_short_names_and_is_repeatable() -> None:
    layer = Layer()
    layer.file("a/b/c", b"x", mode=0o600)
    layer.symlink("bin/sh", "/bin/busybox")
    assert layer.names() == ["a", "a/b", "a/b/c", "bin", "bin/sh"]
    with pytest.raises(ValueError, match="fully qualified"):
        docker_archive("pause:1", layer, ImageConfig(), created_by="test")
    one = docker_archive("multisniff.local/t:1", layer, ImageConfig(), created_by="test")
    two = docker_archive("multisniff.local/t:1", layer, ImageConfig(), created_by="test")
    assert one == two
    with pytest.raises(ValueError, match="is a file"):
        layer.file("a/b/c/d", b"")


# --- pause --------------------------------------------------------------------------------------


@ROOT_ONLY
def test_pause_exits_0_on_sigterm_and_reaps_orphans(
    images: dict[str, Image], tmp_path: Path
) -> None:
    pause = images["pause"].unpack(tmp_path) / "pause"
    assert read_elf(pause.read_bytes()).interpreter is None  # static
    # As PID 1 of a new PID namespace, the way it runs in every pod.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", str(pause)])
    try:
        pid = _wait_for_child(proc.pid)
        # An orphan: sh starts a short sleep and exits at once, so the sleep is reparented to
        # pause, which must reap it when it ends.
        subprocess.run(
            ["nsenter", "-t", str(pid), "-p", "--", "sh", "-c", "sleep 0.3 & exit 0"], check=True
        )
        time.sleep(1.0)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        zombies = [c for c in children if _state(int(c)) == "Z"]
        assert not zombies, f"pause left zombies {zombies}"
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_child(parent: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare did not start pause")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# --- coredns ------------------------------------------------------------------------------------


def test_the_corefile_has_no_upstream(images: dict[str, Image]) -> None:
    corefile = images["coredns"].read("etc/coredns/Corefile").decode()
    assert corefile == (IMAGES_DIR / "coredns" / "Corefile").read_text()
    directives = [
        line.split()[0]
        for line in corefile.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for upstream in ("forward", "proxy", "grpc", "etcd", "secondary", "kubernetes", "route53"):
        assert upstream not in directives
    assert "file" in directives
    assert images["coredns"].config["config"]["Cmd"] == ["-conf", "/etc/coredns/Corefile"]


def test_the_coredns_binary_cannot_forward(images: dict[str, Image], tmp_path: Path) -> None:
    binary = images["coredns"].unpack(tmp_path) / "coredns"
    assert read_elf(binary.read_bytes()).interpreter is None  # static
    listed = subprocess.run([str(binary), "-plugins"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    plugins = {line.strip().removeprefix("dns.") for line in listed.stdout.splitlines()}
    assert {"file", "health", "ready"} <= plugins
    assert not plugins & {"forward", "grpc", "proxy", "etcd", "kubernetes", "secondary"}


# --- tools --------------------------------------------------------------------------------------


def test_tools_tcpdump_comes_from_the_bundle_builder(images: dict[str, Image]) -> None:
    tools = images["tools"]
    bundle = build_bundle(programs=("tcpdump", "nsenter", "ip"))
    assert tools.config["config"]["Labels"]["multisniff.bundle"] == bundle.digest
    by_name = {f.name: f.data for f in bundle.files}
    assert tools.read("usr/bin/tcpdump") == by_name["tcpdump"]
    assert tools.read("lib/x86_64-linux-gnu/libpcap.so.0.8") == by_name["lib/libpcap.so.0.8"]
    members = tools.members()
    assert members["lib64/ld-linux-x86-64.so.2"].linkname == (
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )
    passwd = tools.read("etc/passwd").decode()
    assert passwd.startswith("root:x:0:0:") and "\ntcpdump:x:" in passwd


@ROOT_ONLY
def test_tools_run_by_name_with_nothing_of_the_host(
    images: dict[str, Image], tmp_path: Path
) -> None:
    root = images["tools"].unpack(tmp_path)
    path = images["tools"].config["config"]["Env"][0]
    chroot = shutil.which("chroot") or "chroot"

    def run(*argv: str) -> str:
        result = subprocess.run(
            [chroot, str(root), "/usr/bin/env", path, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env={},
        )
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        return result.stdout + result.stderr

    assert "tcpdump version 4.99" in run("tcpdump", "--version")
    assert "util-linux" in run("nsenter", "--version")
    assert "iproute2" in run("ip", "-V")
    assert run("sh", "-c", "echo shell works; tar --help 2>&1 | head -1").startswith("shell works")


# --- workload -----------------------------------------------------------------------------------


def test_the_workload_image_has_no_libc(images: dict[str, Image]) -> None:
    workload = images["workload"]
    names = workload.members()
    libc = [n for n in names if "/ld-linux" in "/" + n or "libc.so" in n or n.endswith(".so")]
    assert not libc, f"the workload image must not carry a libc: {libc}"
    for binary in ("bin/busybox", "usr/local/bin/workload"):
        assert read_elf(workload.read(binary)).interpreter is None, f"{binary} is not static"
    for applet in ("bin/sh", "bin/tar", "bin/gzip"):
        assert names[applet].linkname == "/bin/busybox"
    assert workload.config["config"]["Entrypoint"] == ["/usr/local/bin/workload"]
    assert workload.read("etc/passwd").startswith(b"root:x:0:0:")


@ROOT_ONLY
def test_the_workload_runs_and_its_tar_unpacks_the_bundle(
    images: dict[str, Image], tmp_path: Path
) -> None:
    """The upload mode in miniature, minus Kubernetes: busybox tar from stdin, then tcpdump."""
    root = images["workload"].unpack(tmp_path)
    chroot = shutil.which("chroot") or "chroot"
    version = subprocess.run(
        [chroot, str(root), "/usr/local/bin/workload", "version"],
        capture_output=True,
        text=True,
        timeout=30,
        env={},
    )
    assert version.stdout.strip() == "multisniff workload 1", version.stderr
    bundle = build_bundle()
    unpacked = subprocess.run(
        [chroot, str(root), "/bin/sh", "-c", "mkdir -p /tmp/b && tar -xzf - -C /tmp/b"],
        input=bundle.targz,
        capture_output=True,
        timeout=60,
        env={},
    )
    assert unpacked.returncode == 0, unpacked.stderr
    ran = subprocess.run(
        [chroot, str(root), *bundle.command("tcpdump", ["--version"], root="/tmp/b")],
        capture_output=True,
        text=True,
        timeout=30,
        env={},
    )
    assert ran.returncode == 0 and "tcpdump version" in ran.stdout, ran.stderr


def test_the_workload_program_passes_its_own_tests() -> None:
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain")
    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=readonly")
    for argv in (["go", "vet", "./..."], ["go", "test", "-p", "1", "-count", "1", "./..."]):
        result = subprocess.run(
            argv, cwd=IMAGES_DIR / "workload", env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
