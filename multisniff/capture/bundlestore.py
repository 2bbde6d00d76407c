"""Where made bundles are kept, and the order in which a run looks for them.

A *store* is a directory with one subdirectory per node architecture, each holding:

* ``bundle.tar.gz``, the bundle as uploaded;
* ``bundle.index.json``: the archive's sha256, its manifest and its origin (``built``,
  ``imported``), so that a run need not unpack the archive to know it;
* ``watchdog.sha256``: the sha256 of the ``watchdog.c`` the bundle's watchdog was compiled from
  (a bundle whose watchdog is not this version's is not used);
* ``msnf-watchdog`` and ``msnf-watchdog.sha256``: the watchdog alone (the ephemeral mode sends
  just that), in the cache; the package's store has only the bundle, which holds the watchdog
  too (kept once, the wheel is 0.6 MB smaller).

There are two stores, looked in in this order: the one shipped in the package
(``multisniff/capture/bundles``, made by the package build) and the user's cache
(``$MULTISNIFF_BUNDLES``, default ``~/.cache/multisniff/bundles``), where bundles built on this
machine or imported go. Only the standard library and `bundle` are imported here: the package
build writes the shipped store with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from multisniff.capture.bundle import Bundle, BundleError, bundle_from_archive, load_bundle
from multisniff.capture.bundlebuild import WATCHDOG_NAME, cache_dir, watchdog_source_digest

SHIPPED_DIR = Path(__file__).resolve().with_name("bundles")
"""The store inside the package (a wheel's package data, or the tree of an editable install)."""

ARCHIVE = "bundle.tar.gz"
INDEX = "bundle.index.json"
STAMP = "watchdog.sha256"
WATCHDOG_STAMP = f"{WATCHDOG_NAME}.sha256"


@dataclass(frozen=True)
class StoredBundle:
    """A bundle found in a store."""

    arch: str
    bundle: Bundle
    path: Path
    """The archive."""
    size: int
    """Bytes of the archive, as uploaded."""
    source: str
    """``wheel`` (shipped in the package), ``cache`` (built here) or ``imported``."""


def stores() -> list[tuple[str, Path]]:
    """The stores in lookup order, each with the name `StoredBundle.source` gives it."""
    return [("wheel", SHIPPED_DIR), ("cache", cache_dir())]


def _store_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def save(directory: Path, bundle: Bundle, *, watchdog: bytes | None,
         origin: str = "built") -> Path:
    """Keep ``bundle`` (and its ``watchdog`` beside it, if given) in ``directory``, a store's
    arch subdirectory."""
    targz = bundle.targz
    index = {"archive_sha256": hashlib.sha256(targz).hexdigest(), "manifest": bundle.manifest,
             "origin": origin}
    source_digest = (watchdog_source_digest() + "\n").encode()
    _store_file(directory / ARCHIVE, targz)
    _store_file(directory / INDEX, json.dumps(index, sort_keys=True).encode())
    _store_file(directory / STAMP, source_digest)
    if watchdog is not None:
        save_watchdog(directory, watchdog)
    return directory / ARCHIVE


def save_watchdog(directory: Path, watchdog: bytes) -> None:
    _store_file(directory / WATCHDOG_NAME, watchdog)
    _store_file(directory / WATCHDOG_STAMP, (watchdog_source_digest() + "\n").encode())


def _current(stamp: Path) -> bool:
    try:
        return stamp.read_text().strip() == watchdog_source_digest()
    except OSError:
        return False


def load(directory: Path, *, arch: str, source: str) -> StoredBundle | None:
    """The bundle kept in ``directory``; None if there is none, or it is damaged or stale."""
    archive = directory / ARCHIVE
    if not archive.is_file() or not _current(directory / STAMP):
        return None
    try:
        targz = archive.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(targz).hexdigest()
    origin = "built"
    try:
        known = json.loads((directory / INDEX).read_text())
        origin = str(known.get("origin", "built"))
        if known.get("archive_sha256") != digest:
            raise ValueError("the index is not this archive's")
        bundle = bundle_from_archive(targz, known["manifest"])
    except (OSError, ValueError, KeyError, AttributeError, BundleError):
        try:
            bundle = load_bundle(targz, name=str(archive))
        except BundleError:
            return None
        if source != "wheel":  # the package's own files are not ours to rewrite
            index = {"archive_sha256": digest, "manifest": bundle.manifest, "origin": origin}
            with contextlib.suppress(OSError):
                _store_file(directory / INDEX, json.dumps(index, sort_keys=True).encode())
    if source == "cache" and origin == "imported":
        source = "imported"
    return StoredBundle(arch=arch, bundle=bundle, path=archive, size=len(targz), source=source)


def find(arch: str) -> StoredBundle | None:
    """The bundle for ``arch`` from the first store that has a usable one."""
    for source, root in stores():
        found = load(root / arch, arch=arch, source=source)
        if found is not None:
            return found
    return None


def find_watchdog(arch: str) -> bytes | None:
    """The watchdog for ``arch`` from the first store that has this version's, alone or in a
    bundle."""
    for source, root in stores():
        directory = root / arch
        if _current(directory / WATCHDOG_STAMP):
            try:
                return (directory / WATCHDOG_NAME).read_bytes()
            except OSError:
                pass
        stored = load(directory, arch=arch, source=source)
        if stored is not None:
            found = [f.data for f in stored.bundle.files if f.name == WATCHDOG_NAME]
            if found:
                return found[0]
    return None


def all_stored() -> list[StoredBundle]:
    """Every usable bundle in every store, in lookup order per architecture."""
    found = []
    for source, root in stores():
        if not root.is_dir():
            continue
        for directory in sorted(p for p in root.iterdir() if p.is_dir()):
            stored = load(directory, arch=directory.name, source=source)
            if stored is not None:
                found.append(stored)
    return found
