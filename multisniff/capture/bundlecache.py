"""Where upload bundles come from at run time: a cache directory, filled on demand.

A bundle is tcpdump with its libraries and loader (see `bundle`) plus the static watchdog
compiled from ``watchdog.c`` next to this file. Both are built here, for the architecture of
the node a target runs on, and kept in ``$MULTISNIFF_BUNDLES`` (default
``~/.cache/multisniff/bundles``) as ``<arch>/bundle.tar.gz``, with ``bundle.index.json`` (the
archive's sha256 and the manifest) beside it so that a run need not unpack it to know it, and
the watchdog alone as ``<arch>/msnf-watchdog`` (the ephemeral mode sends just that):

* for the host's own architecture from the host's files (Debian's tcpdump) and ``gcc``;
* for another architecture from a sysroot of that architecture's unpacked Debian packages in
  ``<cache>/sysroots/<arch>`` and the Debian cross compiler (``aarch64-linux-gnu-gcc``). Where
  dpkg knows the architecture (``dpkg --add-architecture``), the sysroot is made here: tcpdump
  and its dependency closure are fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x``, nothing is installed.

A cached bundle or watchdog is rebuilt when the watchdog's source changes. Building is blocking
work (files, gzip, a compiler); callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from multisniff.capture.bundle import (
    Bundle,
    BundleError,
    Sysroot,
    build_bundle,
    bundle_from_archive,
    load_bundle,
)
from multisniff.errors import MultisniffError
from multisniff.kube.model import Cluster, PodInfo

T = TypeVar("T")

WATCHDOG_NAME = "msnf-watchdog"
WATCHDOG_SOURCE = Path(__file__).resolve().with_name("watchdog.c")

_GNU_TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
_MACHINE_TO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}


class BundleUnavailable(MultisniffError):
    """No bundle for a node's architecture exists and none can be built on this machine."""


def host_arch() -> str:
    """The host's architecture in the nodes' (GOARCH) spelling."""
    machine = platform.machine()
    return _MACHINE_TO_ARCH.get(machine, machine)


class PerArchitecture(Generic[T]):
    """Something made once per node architecture (a bundle, a watchdog), in a worker thread.

    Captures start together: without the lock each would miss the cache and make its own copy
    (tens of MB apiece for a bundle) before the first one landed."""

    def __init__(self, cluster: Cluster, make: Callable[[str], T]) -> None:
        self._cluster = cluster
        self._make = make
        self._made: dict[str, T] = {}
        self._failed: dict[str, MultisniffError] = {}
        self._lock = anyio.Lock()

    async def for_pod(self, pod: PodInfo) -> T:
        arch = host_arch()
        if pod.node:
            arch = (await self._cluster.node(pod.node)).architecture
        async with self._lock:
            if arch in self._failed:  # it would fail the same way for every pod: say it once
                raise self._failed[arch]
            if arch not in self._made:
                try:
                    self._made[arch] = await anyio.to_thread.run_sync(self._make, arch)
                except MultisniffError as exc:
                    self._failed[arch] = exc
                    raise
        return self._made[arch]


def cache_dir() -> Path:
    configured = os.environ.get("MULTISNIFF_BUNDLES")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "multisniff" / "bundles"


def sysroot_dir(arch: str) -> Path:
    return cache_dir() / "sysroots" / arch


def compiler_for(arch: str) -> str:
    """The C compiler that makes static programs for ``arch`` here."""
    if arch == host_arch():
        return "gcc"
    triplet = _GNU_TRIPLETS.get(arch)
    if triplet is None:
        raise BundleUnavailable(
            f"multisniff cannot build a bundle for {arch} nodes: it knows the compilers for "
            f"{', '.join(sorted(_GNU_TRIPLETS))} only; use the ephemeral mode for those nodes."
        )
    return f"{triplet}-gcc"


def compile_watchdog(arch: str) -> bytes:
    """The watchdog as a static, stripped program for ``arch``."""
    compiler = compiler_for(arch)
    if shutil.which(compiler) is None:
        package = "gcc" if arch == host_arch() else f"gcc-{_GNU_TRIPLETS[arch]}"
        raise BundleUnavailable(
            f"Building the watchdog for {arch} nodes needs {compiler}, which is not installed "
            f"here; install it (Debian: apt-get install {package} libc6-dev"
            f"{'' if arch == host_arch() else '-' + arch + '-cross'}) or use the ephemeral mode."
        )
    with tempfile.TemporaryDirectory(prefix="msnf-watchdog-") as tmp:
        out = Path(tmp) / WATCHDOG_NAME
        result = subprocess.run(
            [compiler, "-static", "-Os", "-s", "-Wall", "-o", str(out), str(WATCHDOG_SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BundleUnavailable(
                f"{compiler} could not build the watchdog for {arch} nodes "
                f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )
        return out.read_bytes()


def _watchdog_source_digest() -> str:
    return hashlib.sha256(WATCHDOG_SOURCE.read_bytes()).hexdigest()


def _store(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def _cached_bundle(archive: Path, index: Path) -> Bundle:
    """The cached bundle: known by its index when that matches the archive, else verified."""
    targz = archive.read_bytes()
    digest = hashlib.sha256(targz).hexdigest()
    try:
        known = json.loads(index.read_text())
        if known.get("archive_sha256") == digest:
            return bundle_from_archive(targz, known["manifest"])
    except (OSError, ValueError, KeyError, AttributeError, BundleError):
        pass
    bundle = load_bundle(targz, name=str(archive))
    _store(index, _index(bundle, digest))
    return bundle


def _index(bundle: Bundle, archive_sha256: str) -> bytes:
    return json.dumps({"archive_sha256": archive_sha256, "manifest": bundle.manifest},
                      sort_keys=True).encode()


def watchdog_for(arch: str) -> bytes:
    """The static watchdog for nodes of ``arch``: from the cache, else compiled now."""
    path = cache_dir() / arch / WATCHDOG_NAME
    stamp = path.with_name(f"{WATCHDOG_NAME}.sha256")
    source_digest = _watchdog_source_digest()
    try:
        if stamp.read_text().strip() == source_digest:
            return path.read_bytes()
    except OSError:
        pass
    program = compile_watchdog(arch)
    _store(path, program)
    _store(stamp, (source_digest + "\n").encode())
    return program


def bundle_for(arch: str) -> Bundle:
    """The bundle for nodes of ``arch``: from the cache, else built now and cached."""
    return _bundle_for(arch, programs=("tcpdump",), name="bundle")


AGENT_PROGRAMS = ("tcpdump", "nsenter")


def agent_bundle_for(arch: str) -> Bundle:
    """The privileged mode's bundle for nodes of ``arch``: tcpdump, nsenter (util-linux) and
    the watchdog, so that the agent's image needs only a shell and tar."""
    return _bundle_for(arch, programs=AGENT_PROGRAMS, name="agent-bundle")


def _bundle_for(arch: str, *, programs: tuple[str, ...], name: str) -> Bundle:
    directory = cache_dir() / arch
    archive = directory / f"{name}.tar.gz"
    index = directory / f"{name}.index.json"
    stamp = directory / ("watchdog.sha256" if name == "bundle" else f"{name}.watchdog.sha256")
    source_digest = _watchdog_source_digest()
    if archive.is_file() and stamp.is_file() and stamp.read_text().strip() == source_digest:
        try:
            return _cached_bundle(archive, index)
        except BundleError:
            pass  # damaged: rebuilt below
    if arch == host_arch():
        sysroot = Sysroot()
    else:
        root = sysroot_dir(arch)
        if not root.is_dir() and arch in foreign_architectures():
            prepare_sysroot(arch)
        if not root.is_dir():
            raise BundleUnavailable(
                f"There is no tcpdump bundle for {arch} nodes in {directory} and this "
                f"{host_arch()} machine has no {arch} sysroot to build one from ({root}); "
                f"let multisniff make one from Debian's packages (dpkg --add-architecture "
                f"{arch} && apt-get update) or use the ephemeral mode."
            )
        sysroot = Sysroot(root)
    watchdog = compile_watchdog(arch)
    try:
        bundle = build_bundle(sysroot=sysroot, programs=programs,
                              static_programs={WATCHDOG_NAME: watchdog})
    except BundleError as exc:
        raise BundleUnavailable(
            f"A bundle of {', '.join(programs)} for {arch} nodes cannot be built here: {exc}"
        ) from exc
    targz = bundle.targz
    _store(archive, targz)
    _store(index, _index(bundle, hashlib.sha256(targz).hexdigest()))
    _store(stamp, (source_digest + "\n").encode())
    return bundle


def foreign_architectures() -> list[str]:
    """The architectures dpkg was told about besides its own (none where there is no dpkg)."""
    if shutil.which("dpkg") is None:
        return []
    result = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                            text=True, check=False)
    return result.stdout.split() if result.returncode == 0 else []


def _step(argv: list[str], *, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundleUnavailable(
            f"Making a sysroot failed at `{' '.join(argv)}` (exit {result.returncode}): "
            f"{result.stderr.strip()[-1500:]}"
        )
    return result.stdout


def prepare_sysroot(arch: str, *, program: str = "tcpdump") -> Path:
    """Unpack ``program:arch`` and every package it depends on into `sysroot_dir(arch)`."""
    listing = _step(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                     "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                     f"{program}:{arch}"])
    # Top-level lines name packages; <virtual> ones have no file, and packages without the
    # :arch suffix are the host's (Multi-Arch: foreign, no libraries of this architecture).
    packages = sorted({line.strip() for line in listing.splitlines()
                       if line and not line.startswith((" ", "<")) and line.endswith(f":{arch}")})
    root = sysroot_dir(arch)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"msnf-sysroot-{arch}-",
                                     dir=root.parent) as tmp:
        downloads = Path(tmp) / "debs"
        unpacked = Path(tmp) / "root"
        downloads.mkdir()
        unpacked.mkdir()
        _step(["apt-get", "download", "-q", *packages], cwd=downloads)
        for deb in sorted(downloads.glob("*.deb")):
            _step(["dpkg-deb", "-x", str(deb), str(unpacked)])
        unpacked.rename(root)
    return root
