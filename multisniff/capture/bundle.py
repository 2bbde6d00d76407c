"""Self-contained tcpdump bundles: tcpdump, every library it loads, and the loader that loads them.

The upload capture mode runs tcpdump inside the target container itself, and that container may
have no tcpdump, no libc and no package manager. So we carry all of it: the bundle is a tar.gz
with the program, the transitive closure of its ``DT_NEEDED`` libraries and the ELF interpreter,
started through that interpreter so nothing from the container is loaded::

    ./lib/ld-linux-x86-64.so.2 --library-path ./lib ./tcpdump -Z root -i any -w -

Libraries are resolved the way the dynamic loader would, but inside a *sysroot*: ``/`` for the
host's own architecture, or a directory of unpacked Debian packages of another architecture
(nothing here executes what it bundles). The ELF files are read in pure Python.

Debian's tcpdump drops privileges to the user ``tcpdump`` after opening the capture device, and a
container rarely has that user: every run passes ``-Z root`` (recorded in the manifest). Even then
tcpdump, running as root, looks ``root`` up in the target's ``/etc/passwd`` and exits with
"Couldn't find user 'root'" where there is none (a ``FROM scratch`` image): that is the one file
the bundle needs from the target.

The manifest (``multisniff-bundle.json``) carries a digest of every file's name, mode and
content, so an uploader can see that the same bundle is already in a target and skip sending it.
The tar.gz itself is deterministic: the same inputs give the same bytes.

This module does no I/O beyond reading the sysroot and writing the bundle it is asked for; the
upload mode and the test cluster's tools image both build their tcpdump with it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import posixpath
import struct
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "multisniff-bundle.json"
LIBRARY_DIR = "lib"
BUNDLE_FORMAT = 1
TCPDUMP_ARGS: tuple[str, ...] = ("-Z", "root")
"""Arguments every bundled tcpdump run needs: stay root, there may be no user ``tcpdump``."""

_PT_DYNAMIC = 2
_PT_INTERP = 3
_PT_LOAD = 1
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5
_DT_STRSZ = 10
_DT_SONAME = 14
_DT_RPATH = 15
_DT_RUNPATH = 29

_MACHINES: dict[tuple[int, int], str] = {
    # (e_machine, ELF class): the Debian multiarch triplet of its libraries
    (62, 64): "x86_64-linux-gnu",
    (183, 64): "aarch64-linux-gnu",
    (3, 32): "i386-linux-gnu",
    (40, 32): "arm-linux-gnueabihf",
    (243, 64): "riscv64-linux-gnu",
    (21, 64): "powerpc64le-linux-gnu",
    (22, 64): "s390x-linux-gnu",
}


class BundleError(Exception):
    """A bundle cannot be built; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class ElfInfo:
    """What the dynamic loader reads from an ELF file to load it and its libraries."""

    machine: int
    elf_class: int
    """32 or 64."""
    little_endian: bool
    interpreter: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]

    @property
    def multiarch(self) -> str | None:
        """The Debian multiarch triplet of this machine, e.g. ``x86_64-linux-gnu``."""
        return _MACHINES.get((self.machine, self.elf_class))

    def compatible(self, other: ElfInfo) -> bool:
        """Whether the loader of one could load the other (same machine, class, byte order)."""
        return (self.machine, self.elf_class, self.little_endian) == (
            other.machine,
            other.elf_class,
            other.little_endian,
        )


def read_elf(data: bytes, *, name: str = "<bytes>") -> ElfInfo:
    """Parse the ELF header, program headers and dynamic section of ``data``.

    Works for any class and byte order; a static program has no interpreter and no ``needed``.
    """
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise BundleError(f"{name} is not an ELF file (it starts with {data[:4]!r}).")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise BundleError(f"{name} has an unknown ELF class {ei_class} or byte order {ei_data}.")
    is64 = ei_class == 2
    order = "<" if ei_data == 1 else ">"

    def unpack(fmt: str, offset: int) -> tuple[int, ...]:
        size = struct.calcsize(order + fmt)
        if offset < 0 or offset + size > len(data):
            raise BundleError(
                f"{name} is truncated: a header at offset {offset} needs {size} bytes, "
                f"the file has {len(data)}."
            )
        return struct.unpack_from(order + fmt, data, offset)

    (machine,) = unpack("H", 18)
    if is64:
        (phoff,) = unpack("Q", 32)
        phentsize, phnum = unpack("HH", 54)
        ph_fmt = "IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    else:
        (phoff,) = unpack("I", 28)
        phentsize, phnum = unpack("HH", 42)
        ph_fmt = "IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align

    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    interpreter: str | None = None
    dynamic: tuple[int, int] | None = None  # (offset, size)
    for i in range(phnum):
        fields = unpack(ph_fmt, phoff + i * phentsize)
        if is64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = fields[:5]
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_INTERP:
            interpreter = data[p_offset : p_offset + p_filesz].split(b"\0", 1)[0].decode()
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)

    entries: list[tuple[int, int]] = []
    if dynamic is not None:
        dyn_fmt = "qQ" if is64 else "iI"
        step = struct.calcsize(order + dyn_fmt)
        offset, size = dynamic
        for pos in range(offset, offset + size - step + 1, step):
            tag, value = unpack(dyn_fmt, pos)
            if tag == _DT_NULL:
                break
            entries.append((tag, value))

    def file_offset(vaddr: int) -> int:
        for seg_vaddr, seg_offset, seg_size in loads:
            if seg_vaddr <= vaddr < seg_vaddr + seg_size:
                return vaddr - seg_vaddr + seg_offset
        raise BundleError(f"{name}: address {vaddr:#x} of its string table is in no segment.")

    strtab = next((v for t, v in entries if t == _DT_STRTAB), None)
    strsz = next((v for t, v in entries if t == _DT_STRSZ), None)

    def string(index: int) -> str:
        if strtab is None or strsz is None or index >= strsz:
            raise BundleError(f"{name} names a dynamic string {index} but has no string table.")
        start = file_offset(strtab) + index
        end = data.find(b"\0", start)
        if end < 0:
            raise BundleError(f"{name}: the dynamic string at offset {start} is not terminated.")
        return data[start:end].decode()

    def paths(tag: int) -> tuple[str, ...]:
        return tuple(p for t, v in entries if t == tag for p in string(v).split(":") if p)

    sonames = [string(v) for t, v in entries if t == _DT_SONAME]
    return ElfInfo(
        machine=machine,
        elf_class=64 if is64 else 32,
        little_endian=ei_data == 1,
        interpreter=interpreter,
        needed=tuple(string(v) for t, v in entries if t == _DT_NEEDED),
        soname=sonames[0] if sonames else None,
        rpath=paths(_DT_RPATH),
        runpath=paths(_DT_RUNPATH),
    )


@dataclass(frozen=True)
class Sysroot:
    """A root file system to take programs and libraries from, without running anything in it.

    Absolute symlinks inside it are followed relative to it, as they would be in a chroot, so a
    directory of unpacked ``.deb`` files of another architecture serves as well as ``/``.
    """

    root: Path = Path("/")

    def resolve(self, path: str) -> Path:
        """The real file behind ``path`` (as seen from inside), following symlinks inside."""
        parts = list(PurePosixPath("/", path).parts[1:])
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            if part == ".":
                continue
            here = self.root.joinpath(*done, part)
            if here.is_symlink():
                hops += 1
                if hops > 40:
                    raise BundleError(f"Too many symlinks resolving {path} in {self.root}.")
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                parts[:0] = list(PurePosixPath(target).parts[1 if target.startswith("/") else 0 :])
                continue
            done.append(part)
        return self.root.joinpath(*done)

    def exists(self, path: str) -> bool:
        return self.resolve(path).is_file()

    def library_dirs(self, multiarch: str | None) -> list[str]:
        """Where Debian's loader looks when neither RUNPATH nor the cache names a library."""
        dirs = []
        if multiarch:
            dirs += [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"]
        return [*dirs, "/lib", "/usr/lib", "/lib64", "/usr/lib64"]

    def find_program(self, name: str) -> str:
        """The path inside of a program named ``name``, looked up as on Debian's PATH."""
        if "/" in name:
            if not self.exists(name):
                raise BundleError(f"There is no file {name} in {self.root}.")
            return name
        for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"):
            candidate = f"{directory}/{name}"
            if self.exists(candidate):
                return candidate
        raise BundleError(
            f"There is no {name} in the usual bin and sbin directories of {self.root}; "
            f"install it there (for tcpdump on Debian: apt-get install tcpdump)."
        )


@dataclass(frozen=True)
class ClosureFile:
    """One file of a closure: where it comes from (inside the sysroot), and its ELF facts."""

    path: str
    source: Path
    elf: ElfInfo


@dataclass(frozen=True)
class Closure:
    """Programs, the libraries they load (by soname), and the one loader that loads them all."""

    programs: dict[str, ClosureFile]
    libraries: dict[str, ClosureFile]
    loader: ClosureFile

    @property
    def loader_name(self) -> str:
        return posixpath.basename(self.loader.path)


def resolve_closure(
    sysroot: Sysroot,
    programs: Sequence[str],
    *,
    built_programs: Mapping[str, Path] | None = None,
) -> Closure:
    """Every library the ``programs`` need, recursively, resolved inside ``sysroot``.

    ``programs`` are names looked up on PATH (``tcpdump``) or absolute paths inside the sysroot;
    ``built_programs`` (name -> file) are programs built elsewhere for the sysroot's libraries.
    All of them must be dynamically linked programs of one machine with one interpreter.
    """
    found: dict[str, ClosureFile] = {}
    candidates: list[tuple[str, Path | None]] = [(sysroot.find_program(p), None)
                                                 for p in programs]
    candidates += [(f"/usr/local/sbin/{name}", file)
                   for name, file in sorted((built_programs or {}).items())]
    for path, built in candidates:
        source = built or sysroot.resolve(path)
        info = read_elf(source.read_bytes(), name=str(source))
        if info.interpreter is None:
            raise BundleError(
                f"{source} has no ELF interpreter: it is static (copy it as it is) "
                f"or not a program."
            )
        found[posixpath.basename(path)] = ClosureFile(path, source, info)
    if not found:
        raise BundleError("A bundle needs at least one program.")
    first = next(iter(found.values()))
    for other in found.values():
        if not other.elf.compatible(first.elf) or other.elf.interpreter != first.elf.interpreter:
            raise BundleError(
                f"{other.source} and {first.source} are for different machines or loaders; "
                f"one bundle has one loader."
            )
    interpreter = first.elf.interpreter
    assert interpreter is not None
    loader_source = sysroot.resolve(interpreter)
    if not loader_source.is_file():
        raise BundleError(f"The loader {interpreter} of {first.source} is not in {sysroot.root}.")
    loader = ClosureFile(
        interpreter, loader_source, read_elf(loader_source.read_bytes(), name=interpreter)
    )

    libraries: dict[str, ClosureFile] = {}
    pending: list[ClosureFile] = list(found.values())
    while pending:
        needer = pending.pop(0)
        for soname in needer.elf.needed:
            if soname in libraries:
                continue
            library = _find_library(sysroot, soname, needer)
            libraries[soname] = library
            pending.append(library)
    return Closure(programs=found, libraries=libraries, loader=loader)


def _find_library(sysroot: Sysroot, soname: str, needer: ClosureFile) -> ClosureFile:
    origin = posixpath.dirname(needer.path)
    # DT_RPATH counts only where there is no DT_RUNPATH, as in the loader.
    search = list(needer.elf.runpath or needer.elf.rpath)
    search = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in search]
    search += sysroot.library_dirs(needer.elf.multiarch)
    tried = []
    for directory in search:
        path = posixpath.join(directory, soname)
        source = sysroot.resolve(path)
        tried.append(path)
        if not source.is_file():
            continue
        info = read_elf(source.read_bytes(), name=str(source))
        if info.compatible(needer.elf):
            return ClosureFile(path, source, info)
    raise BundleError(
        f"{needer.path} needs {soname}, which is in none of {', '.join(tried)} "
        f"inside {sysroot.root}; install the package that ships it."
    )


@dataclass(frozen=True)
class BundleFile:
    name: str
    data: bytes
    mode: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A built bundle: its files, its manifest and its deterministic tar.gz."""

    manifest: dict[str, object]
    digest: str
    """sha256 over every file's name, mode and content: equal digests, equal bundles."""
    loader: str
    """The loader's name inside the bundle, e.g. ``lib/ld-linux-x86-64.so.2``."""
    programs: tuple[str, ...]
    unpacked: tuple[BundleFile, ...] | None = field(default=None, repr=False)
    """The files, when known; None for a bundle known by its archive (see `files`)."""

    @functools.cached_property
    def files(self) -> tuple[BundleFile, ...]:
        """Every file with its content, the manifest last; unpacked from `targz` on demand."""
        if self.unpacked is not None:
            return self.unpacked
        return load_bundle(self.targz).files

    @functools.cached_property
    def targz(self) -> bytes:
        """The bundle as a deterministic tar.gz: the same files give the same bytes."""
        return _targz(self.files)

    @property
    def directory_name(self) -> str:
        """A directory name for unpacking it that changes exactly when the bundle does."""
        return f"multisniff-bundle-{self.digest[:16]}"

    def command(self, program: str, args: Iterable[str] = (), *, root: str = ".") -> list[str]:
        """The argv that runs ``program`` from a copy of this bundle unpacked at ``root``.

        tcpdump gets ``-Z root`` first (see the module docstring).
        """
        if program not in self.programs:
            raise BundleError(f"This bundle has {', '.join(self.programs)}, not {program}.")
        prefix = TCPDUMP_ARGS if program == "tcpdump" else ()
        return [
            posixpath.join(root, self.loader),
            "--library-path",
            posixpath.join(root, LIBRARY_DIR),
            posixpath.join(root, program),
            *prefix,
            *args,
        ]


def build_bundle(
    *,
    sysroot: Sysroot | None = None,
    programs: Sequence[str] = ("tcpdump",),
    static_programs: Mapping[str, bytes] | None = None,
    built_programs: Mapping[str, Path] | None = None,
    notes: Mapping[str, object] | None = None,
) -> Bundle:
    """Bundle ``programs`` (tcpdump alone by default) from ``sysroot`` (the host by default).

    Programs go to the top of the bundle under their base names, libraries and the loader to
    ``lib/`` under their sonames. ``static_programs`` (name -> ELF bytes) go to the top as
    they are, run directly: they must be static programs for the same machine (the watchdog).
    ``built_programs`` (name -> file) are dynamic programs built outside the sysroot, bundled
    with the sysroot's libraries. ``notes`` go into the manifest as they are (where the
    programs came from); they do not count in the digest, which covers the files alone.
    """
    closure = resolve_closure(sysroot or Sysroot(), programs, built_programs=built_programs)
    files: dict[str, BundleFile] = {}

    def add(name: str, source: Path, mode: int) -> None:
        if name in files:
            raise BundleError(f"Two files would be {name} in the bundle.")
        files[name] = BundleFile(name, source.read_bytes(), mode)

    for base, program in closure.programs.items():
        add(base, program.source, 0o755)
    first = next(iter(closure.programs.values()))
    for base, data in sorted((static_programs or {}).items()):
        info = read_elf(data, name=base)
        if info.interpreter is not None or not info.compatible(first.elf):
            raise BundleError(
                f"{base} must be a static program for {first.elf.multiarch}, like "
                f"{first.path}; it is {'dynamic' if info.interpreter else 'static'} "
                f"for {info.multiarch}."
            )
        if base in files or "/" in base:
            raise BundleError(f"{base} cannot be a top-level file of the bundle.")
        files[base] = BundleFile(base, data, 0o755)
    loader = posixpath.join(LIBRARY_DIR, closure.loader_name)
    add(loader, closure.loader.source, 0o755)
    for soname, library in sorted(closure.libraries.items()):
        name = posixpath.join(LIBRARY_DIR, soname)
        if name != loader:  # libc needs the loader by the same soname
            add(name, library.source, 0o644)

    ordered = tuple(files[n] for n in sorted(files))
    digest = hashlib.sha256(
        json.dumps([[f.name, f.mode, f.sha256] for f in ordered], separators=(",", ":")).encode()
    ).hexdigest()
    manifest: dict[str, object] = {
        "format": BUNDLE_FORMAT,
        "digest": digest,
        "multiarch": first.elf.multiarch,
        "loader": loader,
        "interpreter": closure.loader.path,
        "library_path": LIBRARY_DIR,
        "programs": {
            base: {"args": list(TCPDUMP_ARGS if base == "tcpdump" else ()), "from": p.path}
            for base, p in closure.programs.items()
        },
        "files": {f.name: {"sha256": f.sha256, "mode": f"{f.mode:04o}"} for f in ordered},
        "static_programs": sorted(static_programs or {}),
        **(notes or {}),
    }
    manifest_file = BundleFile(
        MANIFEST_NAME, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o644
    )
    return Bundle(
        manifest=manifest,
        digest=digest,
        loader=loader,
        programs=tuple(closure.programs),
        unpacked=(*ordered, manifest_file),
    )


def _targz(files: Sequence[BundleFile]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        directories = sorted({posixpath.dirname(f.name) for f in files} - {""})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(_normalised(info))
        for f in files:
            info = tarfile.TarInfo(f.name)
            info.size = len(f.data)
            info.mode = f.mode
            tar.addfile(_normalised(info), io.BytesIO(f.data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def load_bundle(targz: bytes, *, name: str = "<bundle>",
                way_out: str = "delete it to rebuild") -> Bundle:
    """A bundle read back from the tar.gz that `Bundle.targz` wrote (a cached build).

    Every error names ``name`` and ends with ``way_out``."""
    try:
        with tarfile.open(fileobj=io.BytesIO(targz), mode="r:gz") as tar:
            files = []
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                extracted = tar.extractfile(member)
                assert extracted is not None
                files.append(BundleFile(member.name, extracted.read(), member.mode))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(
            f"{name} is not a readable bundle ({exc}); {way_out}."
        ) from exc
    by_name = {f.name: f for f in files}
    if MANIFEST_NAME not in by_name:
        raise BundleError(f"{name} has no {MANIFEST_NAME}; {way_out}.")
    manifest_file = by_name.pop(MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_file.data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise BundleError(f"{name} has a damaged {MANIFEST_NAME} ({exc}); {way_out}.") from exc
    ordered = tuple(by_name[n] for n in sorted(by_name))
    digest = hashlib.sha256(
        json.dumps([[f.name, f.mode, f.sha256] for f in ordered], separators=(",", ":")).encode()
    ).hexdigest()
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("digest") != digest:
        raise BundleError(
            f"{name} does not match its manifest (digest {digest[:12]}, manifest says "
            f"{str(manifest.get('digest'))[:12]}); {way_out}."
        )
    if not isinstance(manifest.get("loader"), str) or not isinstance(
            manifest.get("programs"), dict):
        raise BundleError(f"{name} has a manifest without its loader or programs; {way_out}.")
    bundle = Bundle(
        manifest=manifest,
        digest=digest,
        loader=manifest["loader"],
        programs=tuple(manifest["programs"]),
        unpacked=(*ordered, manifest_file),
    )
    # The archive just verified is the one `targz` would make again: compressing 12 MB anew
    # costs seconds of CPU that every upload would otherwise pay. (cached_property reads the
    # instance dict, which a frozen dataclass leaves writable.)
    bundle.__dict__["targz"] = targz
    return bundle


def bundle_from_archive(targz: bytes, manifest: dict[str, object]) -> Bundle:
    """A bundle from an archive that `load_bundle` verified before, and its manifest.

    For a cache that keeps the archive's own digest next to it: unpacking 12 MB to check every
    file again costs a tenth of a second of CPU per run, which this does not pay. `files`
    unpacks on demand."""
    try:
        programs = manifest["programs"]
        if not isinstance(programs, dict):
            raise TypeError("programs")
        bundle = Bundle(manifest=manifest, digest=str(manifest["digest"]),
                        loader=str(manifest["loader"]), programs=tuple(programs))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"The manifest lacks {exc}; delete the cached bundle.") from exc
    bundle.__dict__["targz"] = targz
    return bundle
