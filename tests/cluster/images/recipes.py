"""The container images of the test cluster, and how each one is made from this repository.

Each image is one layer assembled from files built here (gcc, go) or taken from Debian packages,
written as a docker-archive tarball into ``$MULTISNIFF_CACHE/images``. A tarball's name carries
the digest of its image config, which names the layer's digest: an unchanged image is neither
rewritten nor re-imported. Compiler outputs are cached by the digest of their sources and
toolchain, so a second run of ``build`` compiles nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dockerarchive import ImageConfig, Layer, docker_archive, write_atomically

HERE = Path(__file__).resolve().parent
REGISTRY = "multisniff.local"


def cache_root() -> Path:
    return Path(os.environ.get("MULTISNIFF_CACHE", "/var/cache/multisniff"))


def images_dir() -> Path:
    return cache_root() / "images"


def log(message: str) -> None:
    print(f"build: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a build step; on failure, say which step and show what it printed."""
    proc = subprocess.run(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        raise BuildError(
            f"{' '.join(argv)} (in {cwd or Path.cwd()}) exited with {proc.returncode}:\n"
            f"{proc.stdout[-4000:]}"
        )
    return proc.stdout


class BuildError(Exception):
    """A build step failed; the message says which one and what it printed."""


def digest_of(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """The regular files under ``root`` in a stable order (inputs of a cached build)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def cached_build(kind: str, key: str, produce: Callable[[Path], None]) -> Path:
    """The output directory of a build step, produced once per input digest ``key``."""
    out = cache_root() / "build" / f"{kind}-{key[:16]}"
    if (out / ".done").exists():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    produce(tmp)
    (tmp / ".done").write_text(key + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for stale in out.parent.glob(f"{kind}-*"):
        if stale != out and (stale / ".done").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return out


# --- pause ------------------------------------------------------------------------------------


def pause_binary() -> Path:
    source = HERE / "pause" / "pause.c"
    flags = ["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror"]
    gcc_version = run(["gcc", "--version"]).splitlines()[0]
    key = digest_of([source.read_bytes(), " ".join(flags).encode(), gcc_version.encode()])

    def produce(out: Path) -> None:
        run(["gcc", *flags, "-o", str(out / "pause"), str(source)])

    return cached_build("pause", key, produce) / "pause"


def pause_image() -> tuple[Layer, ImageConfig]:
    layer = Layer()
    layer.copy("pause", pause_binary(), mode=0o755)
    return layer, ImageConfig(entrypoint=("/pause",), env=())


# --- Go programs ------------------------------------------------------------------------------


def go_binary(module: Path, name: str, *, package: str = ".") -> Path:
    """A static, stripped build of a Go module here, cached by its sources and the toolchain.

    ``go build -p 1`` by default (GO_BUILD_P overrides): the machine has two cores and other
    builds run beside this one.
    """
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=readonly")
    go_version = run(["go", "env", "GOVERSION", "GOARCH"], env=env).split()
    flags = ["-trimpath", "-buildvcs=false", "-ldflags=-s -w"]
    files = [
        f
        for f in tree_files(module)
        if (f.suffix == ".go" and not f.name.endswith("_test.go")) or f.name in ("go.mod", "go.sum")
    ]
    key = digest_of(
        [
            *(str(f.relative_to(module)).encode() + b"\0" + f.read_bytes() for f in files),
            " ".join([*go_version, *flags, package]).encode(),
        ]
    )

    def produce(out: Path) -> None:
        parallel = os.environ.get("GO_BUILD_P", "1")
        log(f"go build {name} from {module} (-p {parallel}; this can take minutes)")
        run(
            ["go", "build", "-p", parallel, *flags, "-o", str(out / name), package],
            cwd=module,
            env=env,
        )

    return cached_build(f"go-{name}", key, produce) / name


# --- coredns ----------------------------------------------------------------------------------


def coredns_image() -> tuple[Layer, ImageConfig]:
    source = HERE / "coredns"
    layer = Layer()
    layer.copy("coredns", go_binary(source, "coredns"), mode=0o755)
    layer.copy("etc/coredns/Corefile", source / "Corefile", mode=0o644)
    layer.copy("etc/coredns/demo.test.zone", source / "demo.test.zone", mode=0o644)
    config = ImageConfig(entrypoint=("/coredns",), cmd=("-conf", "/etc/coredns/Corefile"), env=())
    return layer, config


# --- Debian packages and busybox ---------------------------------------------------------------


def debian_package(name: str) -> Path:
    """The .deb of ``name`` for this machine's architecture, downloaded once into the cache.

    ``apt-get download`` only fetches the file: nothing is installed on the host.
    """
    debs = cache_root() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    arch = run(["dpkg", "--print-architecture"]).strip()
    found = sorted(debs.glob(f"{name}_*_{arch}.deb"))
    if not found:
        try:
            run(["apt-get", "download", f"{name}:{arch}"], cwd=debs)
        except BuildError:
            log("apt-get download failed; updating the package lists once and retrying")
            run(["apt-get", "update"])
            run(["apt-get", "download", f"{name}:{arch}"], cwd=debs)
        found = sorted(debs.glob(f"{name}_*_{arch}.deb"))
    if not found:
        raise BuildError(f"apt-get download {name} left no {name}_*_{arch}.deb in {debs}")
    return found[-1]


def deb_member(deb: Path, member: str) -> bytes:
    """One regular file from a .deb's data, read with dpkg-deb (no host install)."""
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if proc.returncode != 0:
        raise BuildError(f"dpkg-deb --fsys-tarfile {deb}: {proc.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for info in tar.getmembers():
            if info.name.lstrip("./") == member.lstrip("/") and info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                return extracted.read()
    raise BuildError(f"{deb} has no file {member}")


def busybox() -> Path:
    """Debian's busybox-static: one static binary, a shell, tar and the usual applets."""
    deb = debian_package("busybox-static")
    key = digest_of([deb.read_bytes()])

    def produce(out: Path) -> None:
        (out / "busybox").write_bytes(deb_member(deb, "bin/busybox"))
        (out / "busybox").chmod(0o755)
        (out / "applets").write_text(run([str(out / "busybox"), "--list-full"]))

    return cached_build("busybox", key, produce)


def add_busybox(layer: Layer, *, keep: Iterable[str] = ()) -> None:
    """busybox at /bin/busybox and a symlink for each applet, except where ``layer`` has a file
    already or the applet is named in ``keep`` (real programs of the image win)."""
    built = busybox()
    layer.copy("bin/busybox", built / "busybox", mode=0o755)
    skip = set(keep)
    for applet in (built / "applets").read_text().split():
        if posixpath.basename(applet) in skip or applet in layer:
            continue
        layer.symlink(applet, "/bin/busybox")


def add_base_files(layer: Layer, *, users: Iterable[tuple[str, int]] = ()) -> None:
    """/etc/passwd and /etc/group with root, nobody and ``users``, and a /tmp for everyone.

    Even a container without libc gets these: tcpdump running as root looks up a user to
    switch to (``-Z root``) before it captures anything.
    """
    accounts = [("root", 0), *users, ("nobody", 65534)]
    passwd = "".join(
        f"{name}:x:{uid}:{uid}:{name}:{'/root' if uid == 0 else '/nonexistent'}:"
        f"{'/bin/sh' if uid == 0 else '/bin/false'}\n"
        for name, uid in accounts
    )
    group = "".join(f"{name}:x:{gid}:\n" for name, gid in [*accounts[:-1], ("nogroup", 65534)])
    layer.file("etc/passwd", passwd.encode())
    layer.file("etc/group", group.encode())
    layer.directory("tmp", mode=0o1777)
    layer.directory("root", mode=0o700)


# --- tools ------------------------------------------------------------------------------------


def tools_image() -> tuple[Layer, ImageConfig]:
    """tcpdump, nsenter and ip where Debian puts them, for ephemeral and privileged capture.

    Their files come from the same bundle builder the upload mode uses, installed under their
    Debian paths (programs where they were, libraries in /lib/<multiarch>, the loader where
    the programs' ELF interpreter says), so they run by name without a wrapper.
    """
    from multisniff.capture.bundle import LIBRARY_DIR, build_bundle

    programs = ("tcpdump", "nsenter", "ip")
    bundle = build_bundle(programs=programs)
    manifest = bundle.manifest
    multiarch = str(manifest["multiarch"])
    interpreter = str(manifest["interpreter"])
    origins = {name: str(entry["from"]) for name, entry in dict(manifest["programs"]).items()}
    layer = Layer()
    for f in bundle.files:
        if f.name in origins:
            layer.file(origins[f.name], f.data, mode=f.mode)
        elif f.name.startswith(LIBRARY_DIR + "/"):
            soname = posixpath.basename(f.name)
            layer.file(f"lib/{multiarch}/{soname}", f.data, mode=f.mode)
        else:  # the manifest: says where all of this came from
            layer.file(f"usr/share/multisniff/{f.name}", f.data, mode=f.mode)
    loader = f"/lib/{multiarch}/{posixpath.basename(bundle.loader)}"
    if interpreter != loader:
        layer.symlink(interpreter, loader)
    add_base_files(layer, users=[("tcpdump", 101)])
    add_busybox(layer, keep=programs)
    return layer, ImageConfig(cmd=("/bin/sh",), labels=(("multisniff.bundle", bundle.digest),))


# --- workload ---------------------------------------------------------------------------------


def workload_image() -> tuple[Layer, ImageConfig]:
    """The demo's clients and servers: a static Go program and busybox, and no libc at all.

    This is the "container without libc" that the upload mode must be able to capture in:
    busybox's tar unpacks the bundle, and nothing in the image could load a shared library.
    """
    layer = Layer()
    layer.copy("usr/local/bin/workload", go_binary(HERE / "workload", "workload"), mode=0o755)
    add_base_files(layer)
    add_busybox(layer)
    config = ImageConfig(entrypoint=("/usr/local/bin/workload",), cmd=("http-serve",))
    return layer, config


# --- the list ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    tag: str
    make: Callable[[], tuple[Layer, ImageConfig]]
    about: str

    @property
    def reference(self) -> str:
        return f"{REGISTRY}/{self.name}:{self.tag}"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("pause", "1", pause_image, "the pod sandbox: sleeps, reaps, exits on SIGTERM"),
        Recipe("coredns", "1", coredns_image, "CoreDNS answering demo.test. only, no forward"),
        Recipe("tools", "1", tools_image, "tcpdump, nsenter, ip and a busybox shell"),
        Recipe("workload", "1", workload_image, "demo traffic: busybox + a static Go program"),
    ]
}


@dataclass(frozen=True)
class Built:
    reference: str
    path: Path
    size: int
    seconds: float
    fresh: bool


def build_image(recipe: Recipe) -> Built:
    started = time.monotonic()
    layer, config = recipe.make()
    archive = docker_archive(
        recipe.reference, layer, config, created_by=f"tests/cluster/images/build {recipe.name}"
    )
    path = images_dir() / f"{recipe.name}-{recipe.tag}-{archive.image_id[:12]}.tar"
    fresh = not path.exists()
    if fresh:
        write_atomically(path, archive.data)
        for stale in images_dir().glob(f"{recipe.name}-{recipe.tag}-*.tar"):
            if stale != path:
                stale.unlink()
    return Built(recipe.reference, path, len(archive.data), time.monotonic() - started, fresh)


def update_index(built: list[Built]) -> Path:
    """Record ``reference -> tarball`` in images/index.json for the cluster's ``up``."""
    index_path = images_dir() / "index.json"
    try:
        index: dict[str, str] = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    for b in built:
        index[b.reference] = str(b.path)
    index = {ref: p for ref, p in index.items() if Path(p).exists()}
    write_atomically(index_path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return index_path
