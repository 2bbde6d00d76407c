"""Making upload bundles: tcpdump, its libraries and loader, and the static watchdog.

Two recipes, both for amd64 and arm64 from an amd64 or arm64 Debian machine:

* **from Debian's source packages** (what the package build ships in the wheel): libpcap and
  tcpdump are fetched with ``apt-get source`` and compiled here, libpcap without D-Bus, systemd,
  RDMA, Bluetooth, netlink and USB and linked into tcpdump statically, tcpdump without libcrypto,
  libsmi and libcap-ng, and with multisniff's own patch to tcpdump, ``--buffer-timeout``
  (`BUFFER_TIMEOUT_PATCH`; the manifest lists it under ``built_from.tcpdump_patches``). The
  bundle is then tcpdump, libc and the loader. Needs the compiler, ``flex``, ``bison``,
  ``make``, ``patch`` and ``dpkg-source`` (dpkg-dev). The source index is kept in a
  private apt state below the cache, made from the Debian entries of the machine's own apt
  sources, so the machine's apt configuration is not changed.
* **from Debian's binary packages** (the fallback on a client): the host's installed tcpdump, or
  another architecture's unpacked packages (see `prepare_sysroot`), with every library they
  load. Needs only the compiler for the watchdog.

Only the standard library and `bundle` are imported here: the package build (``setup.py``)
runs this without the package's dependencies installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from multisniff.capture.bundle import Bundle, BundleError, Sysroot, build_bundle
from multisniff.errors import MultisniffError

WATCHDOG_NAME = "msnf-watchdog"
WATCHDOG_SOURCE = Path(__file__).resolve().with_name("watchdog.c")
ARCHITECTURES = ("amd64", "arm64")
"""The node architectures multisniff makes bundles for."""

_GNU_TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
_MACHINE_TO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}

SOURCE_PACKAGES = ("libpcap", "tcpdump")
LIBPCAP_CONFIGURE = ("--disable-shared", "--with-pcap=linux", "--disable-dbus", "--disable-rdma",
                     "--disable-bluetooth", "--without-libnl", "--disable-usb", "--disable-netmap")
TCPDUMP_CONFIGURE = ("--without-crypto", "--without-smi", "--without-cap-ng")
BUFFER_TIMEOUT_PATCH = "buffer-timeout"
"""multisniff's patch that gives tcpdump ``--buffer-timeout=MS`` (libpcap's packet buffer
timeout, fixed at 1 s in tcpdump): the file ``tcpdump-buffer-timeout.diff`` next to this one."""
TCPDUMP_PATCHES = {BUFFER_TIMEOUT_PATCH: Path(__file__).resolve().with_name(
    f"tcpdump-{BUFFER_TIMEOUT_PATCH}.diff")}
_ONE_LINE_DEB = re.compile(
    r"deb\s+(?:\[(?P<options>[^\]]*)\]\s*)?(?P<uri>\S+)\s+(?P<suite>\S+)\s*(?P<components>.*)")
_SOURCE_TOOLS = {"make": "make", "flex": "flex", "bison": "bison", "patch": "patch",
                 "apt-get": "apt", "dpkg-source": "dpkg-dev"}


class BundleUnavailable(MultisniffError):
    """No bundle for a node's architecture exists and none can be built on this machine."""


def host_arch() -> str:
    """The host's architecture in the nodes' (GOARCH) spelling."""
    machine = platform.machine()
    return _MACHINE_TO_ARCH.get(machine, machine)


def arch_of(multiarch: object) -> str | None:
    """The node architecture of a Debian multiarch triplet (a bundle's manifest says one)."""
    return next((arch for arch, triplet in _GNU_TRIPLETS.items() if triplet == multiarch), None)


def cache_dir() -> Path:
    configured = os.environ.get("MULTISNIFF_BUNDLES")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "multisniff" / "bundles"


def sysroot_dir(arch: str) -> Path:
    return cache_dir() / "sysroots" / arch


def watchdog_source_digest() -> str:
    return hashlib.sha256(WATCHDOG_SOURCE.read_bytes()).hexdigest()


def compiler_for(arch: str) -> str:
    """The C compiler that makes programs for ``arch`` here."""
    if arch == host_arch():
        return "gcc"
    triplet = _GNU_TRIPLETS.get(arch)
    if triplet is None:
        raise BundleUnavailable(
            f"multisniff cannot build a bundle for {arch} nodes: it knows the compilers for "
            f"{', '.join(sorted(_GNU_TRIPLETS))} only; use the ephemeral mode for those nodes."
        )
    return f"{triplet}-gcc"


def _need_compiler(arch: str, purpose: str) -> str:
    compiler = compiler_for(arch)
    if shutil.which(compiler) is None:
        package = "gcc" if arch == host_arch() else f"gcc-{_GNU_TRIPLETS[arch]}"
        raise BundleUnavailable(
            f"Building {purpose} for {arch} nodes needs {compiler}, which is not installed "
            f"here; install it (Debian: apt-get install {package} libc6-dev"
            f"{'' if arch == host_arch() else '-' + arch + '-cross'}), import bundles made "
            f"elsewhere (multisniff bundles import DIR) or use the ephemeral mode."
        )
    return compiler


def compile_watchdog(arch: str) -> bytes:
    """The watchdog as a static, stripped program for ``arch``."""
    compiler = _need_compiler(arch, "the watchdog")
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


def foreign_architectures() -> list[str]:
    """The architectures dpkg was told about besides its own (none where there is no dpkg)."""
    if shutil.which("dpkg") is None:
        return []
    result = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                            text=True, check=False)
    return result.stdout.split() if result.returncode == 0 else []


def _step(argv: Sequence[str], *, cwd: Path | None = None, what: str = "Making a sysroot",
          env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False,
                            env=env)
    if result.returncode != 0:
        raise BundleUnavailable(
            f"{what} failed at `{' '.join(argv)}` (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-1500:]}"
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


def build_from_packages(arch: str, programs: Sequence[str] = ("tcpdump",)) -> Bundle:
    """The bundle of ``programs`` for ``arch`` from Debian's binary packages (see the module
    docstring)."""
    if arch == host_arch():
        sysroot = Sysroot()
    else:
        root = sysroot_dir(arch)
        if not root.is_dir() and arch in foreign_architectures():
            prepare_sysroot(arch)
        if not root.is_dir():
            raise BundleUnavailable(
                f"There is no tcpdump bundle for {arch} nodes and this {host_arch()} machine "
                f"has no {arch} sysroot to build one from ({root}); let multisniff make one "
                f"from Debian's packages (dpkg --add-architecture {arch} && apt-get update), "
                f"import bundles made elsewhere (multisniff bundles import DIR) or use the "
                f"ephemeral mode."
            )
        sysroot = Sysroot(root)
    watchdog = compile_watchdog(arch)
    try:
        return build_bundle(sysroot=sysroot, programs=programs,
                            static_programs={WATCHDOG_NAME: watchdog},
                            notes=_notes({"recipe": "debian-packages"}))
    except BundleError as exc:
        raise BundleUnavailable(
            f"A bundle of {', '.join(programs)} for {arch} nodes cannot be built here: {exc}"
        ) from exc


def _notes(built_from: dict[str, object]) -> dict[str, object]:
    return {"built_from": built_from, "watchdog_source_sha256": watchdog_source_digest()}


def tcpdump_patches(bundle: Bundle) -> set[str]:
    """The names of multisniff's patches (`TCPDUMP_PATCHES`) that a bundle's tcpdump was built
    with, as its manifest says: none for one built from Debian's binary packages or by a
    multisniff that had none."""
    built_from = bundle.manifest.get("built_from")
    patches = built_from.get("tcpdump_patches") if isinstance(built_from, dict) else None
    return {str(name) for name in patches} if isinstance(patches, dict) else set()


# --- from Debian's source packages ------------------------------------------------------------


def _os_codename() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    raise BundleUnavailable(
        "Building tcpdump from Debian's sources needs a Debian machine (/etc/os-release names "
        "no release codename here); build from packages (multisniff bundles build) instead."
    )


def debian_source_entries() -> str:
    """deb822 ``deb-src`` stanzas for the Debian archives this machine's apt uses.

    Taken from the ``deb`` entries in ``/etc/apt/sources.list`` and ``sources.list.d`` whose
    suites are this release's (``bookworm``, ``bookworm-updates``, ``bookworm-security``), so
    other vendors' repositories are left out."""
    codename = _os_codename()
    suites = {codename, f"{codename}-updates", f"{codename}-security"}
    stanzas: list[str] = []
    etc = Path("/etc/apt")
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            wanted = [s for s in fields.get("suites", "").split() if s in suites]
            if ("deb" in fields.get("types", "").split() and wanted and fields.get("uris")
                    and fields.get("enabled", "yes").lower() != "no"):
                stanzas.append(_stanza(fields["uris"], wanted, fields.get("components", "main"),
                                       fields.get("signed-by")))
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            entry = _ONE_LINE_DEB.match(line.split("#", 1)[0].strip())
            if entry is None or entry["suite"] not in suites:
                continue
            signed_by = None
            for option in (entry["options"] or "").split():
                key, _, value = option.partition("=")
                if key == "signed-by":
                    signed_by = value
            stanzas.append(_stanza(entry["uri"], [entry["suite"]],
                                   entry["components"] or "main", signed_by))
    if not stanzas:
        raise BundleUnavailable(
            f"No Debian archive for {codename} is configured in /etc/apt/sources.list*, so "
            f"tcpdump's source cannot be fetched; build from packages (multisniff bundles "
            f"build) instead."
        )
    return "\n".join(dict.fromkeys(stanzas))


def _stanza(uris: str, suites: list[str], components: str, signed_by: str | None) -> str:
    text = f"Types: deb-src\nURIs: {uris}\nSuites: {' '.join(suites)}\nComponents: {components}\n"
    if signed_by and "\n" not in signed_by:
        text += f"Signed-By: {signed_by}\n"
    return text


def fetch_debian_sources(into: Path) -> dict[str, Path]:
    """The unpacked Debian source trees of libpcap and tcpdump in ``into``, fetched once."""
    trees = {name: sorted(into.glob(f"{name}-[0-9]*/")) for name in SOURCE_PACKAGES}
    if all(trees.values()):
        return {name: found[-1] for name, found in trees.items()}
    for tool in ("apt-get", "dpkg-source"):
        if shutil.which(tool) is None:
            raise BundleUnavailable(
                f"Fetching Debian's sources of {' and '.join(SOURCE_PACKAGES)} needs {tool} "
                f"(Debian: apt-get install {_SOURCE_TOOLS[tool]}); build from packages "
                f"(multisniff bundles build) instead."
            )
    apt = into / "apt"
    (apt / "sources.list.d").mkdir(parents=True, exist_ok=True)
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text("")
    (apt / "sources.list.d" / "debian-src.sources").write_text(debian_source_entries())
    options = ["-q", "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
               "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
               "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", "Debug::NoLocking=1"]
    what = "Fetching Debian's sources"
    _step(["apt-get", *options, "update"], what=what)
    with tempfile.TemporaryDirectory(prefix="msnf-sources-", dir=into) as tmp:
        _step(["apt-get", *options, "source", *SOURCE_PACKAGES], cwd=Path(tmp), what=what)
        for entry in sorted(Path(tmp).iterdir()):
            if entry.is_dir() or entry.suffix == ".dsc":
                entry.rename(into / entry.name)
    return fetch_debian_sources(into)


def _debian_version(tree: Path) -> str:
    """``1.10.3-1`` for a tree ``libpcap-1.10.3`` beside ``libpcap_1.10.3-1.dsc``."""
    name, _, upstream = tree.name.partition("-")
    dsc = sorted(tree.parent.glob(f"{name}_{upstream}-*.dsc"))
    return dsc[-1].stem.partition("_")[2] if dsc else upstream


def build_tcpdump_from_source(arch: str) -> tuple[Path, dict[str, object]]:
    """tcpdump for ``arch`` with libpcap linked in, compiled from Debian's sources.

    The program is kept in ``<cache>/source-builds/<arch>`` and compiled again only when the
    recipe (source versions, configure options, compiler) changes. Returns its path and what
    it was built from."""
    compiler = _need_compiler(arch, "tcpdump")
    for tool in ("make", "flex", "bison", "patch"):
        if shutil.which(tool) is None:
            raise BundleUnavailable(
                f"Building tcpdump from source needs {tool} (Debian: apt-get install "
                f"{_SOURCE_TOOLS[tool]}); build from packages (multisniff bundles build) "
                f"instead."
            )
    builds = cache_dir() / "source-builds"
    trees = fetch_debian_sources(builds / "sources")
    built_from: dict[str, object] = {
        "recipe": "debian-source",
        **{name: _debian_version(tree) for name, tree in trees.items()},
        "libpcap_configure": list(LIBPCAP_CONFIGURE),
        "tcpdump_configure": list(TCPDUMP_CONFIGURE),
        "tcpdump_patches": {name: hashlib.sha256(path.read_bytes()).hexdigest()
                            for name, path in sorted(TCPDUMP_PATCHES.items())},
        "compiler": compiler,
    }
    out = builds / arch / "tcpdump"
    stamp = out.with_name("tcpdump.recipe.json")
    recipe = json.dumps(built_from, sort_keys=True)
    if out.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return out, built_from
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"msnf-tcpdump-{arch}-", dir=builds) as tmp:
        work = Path(tmp)
        # tcpdump's configure takes the libpcap in a sibling directory ../libpcap-*.
        copies = {name: work / tree.name for name, tree in trees.items()}
        for name, tree in trees.items():
            shutil.copytree(tree, copies[name], symlinks=True)
        for patch in TCPDUMP_PATCHES.values():
            _step(["patch", "-p1", "--forward", "--batch", "--quiet", "-i", str(patch)],
                  cwd=copies["tcpdump"], what=f"Applying {patch.name} to tcpdump")
        # Paths of this temporary directory must not end up in the program: the same
        # sources give the same bytes, and so the same bundle digest.
        flags = {"CC": compiler, "CFLAGS": f"-O2 -ffile-prefix-map={work}=.", "LDFLAGS": "-s"}
        env = {**os.environ, **flags}
        cross = [] if arch == host_arch() else [f"--host={_GNU_TRIPLETS[arch]}"]
        what = f"Building tcpdump for {arch} from source"
        jobs = f"-j{min(os.cpu_count() or 1, 4)}"
        _step(["./configure", "--quiet", *cross, *LIBPCAP_CONFIGURE], cwd=copies["libpcap"],
              what=what, env=env)
        _step(["make", "-s", jobs, "libpcap.a"], cwd=copies["libpcap"], what=what, env=env)
        _step(["./configure", "--quiet", *cross, *TCPDUMP_CONFIGURE], cwd=copies["tcpdump"],
              what=what, env=env)
        _step(["make", "-s", jobs, "tcpdump"], cwd=copies["tcpdump"], what=what, env=env)
        partial = out.with_name(f"tcpdump.{os.getpid()}.part")
        shutil.copyfile(copies["tcpdump"] / "tcpdump", partial)
        partial.replace(out)
    stamp.write_text(recipe)
    return out, built_from


def libc_sysroot(arch: str) -> Sysroot:
    """Where the libc that a tcpdump built here for ``arch`` links against lives."""
    if arch == host_arch():
        return Sysroot()
    return Sysroot(Path("/usr") / _GNU_TRIPLETS[arch])  # Debian's libc6-<arch>-cross


def build_from_source(arch: str) -> Bundle:
    """The bundle for ``arch`` with tcpdump compiled from Debian's sources (a small one)."""
    compiler_for(arch)  # says which architectures there are compilers for
    tcpdump, built_from = build_tcpdump_from_source(arch)
    watchdog = compile_watchdog(arch)
    try:
        return build_bundle(sysroot=libc_sysroot(arch), programs=(),
                            built_programs={"tcpdump": tcpdump},
                            static_programs={WATCHDOG_NAME: watchdog}, notes=_notes(built_from))
    except BundleError as exc:
        raise BundleUnavailable(
            f"A tcpdump bundle for {arch} nodes cannot be built here: {exc}"
        ) from exc


def build(arch: str, *, from_source: bool) -> Bundle:
    """The bundle for ``arch`` by the recipe asked for (see the module docstring)."""
    return build_from_source(arch) if from_source else build_from_packages(arch)
