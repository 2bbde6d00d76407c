"""Where upload bundles come from at run time: shipped, cached, or built on demand.

A bundle is tcpdump with its libraries and loader (see `bundle`) plus the static watchdog
compiled from ``watchdog.c`` next to this file. For the architecture of the node a target runs
on, the first of these is used (see `bundlestore` for the layout):

1. the bundle shipped in the package (the wheel's, made by the package build);
2. the user's cache, ``$MULTISNIFF_BUNDLES`` (default ``~/.cache/multisniff/bundles``):
   bundles built here before or imported with ``multisniff bundles import``;
3. built now from Debian's packages on this machine (see `bundlebuild`) and cached.

A bundle or watchdog is used only if its watchdog was compiled from this version's
``watchdog.c``. Building is blocking work (files, gzip, a compiler); callers run it in a
worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from multisniff.capture import bundlestore
from multisniff.capture.bundle import Bundle
from multisniff.capture.bundlebuild import (
    WATCHDOG_NAME,
    WATCHDOG_SOURCE,
    BundleUnavailable,
    build_from_packages,
    cache_dir,
    compile_watchdog,
    foreign_architectures,
    host_arch,
    prepare_sysroot,
    sysroot_dir,
)
from multisniff.errors import MultisniffError
from multisniff.kube.model import Cluster, PodInfo

__all__ = [
    "WATCHDOG_NAME",
    "WATCHDOG_SOURCE",
    "BundleUnavailable",
    "PerArchitecture",
    "bundle_for",
    "cache_dir",
    "compile_watchdog",
    "foreign_architectures",
    "host_arch",
    "prepare_sysroot",
    "sysroot_dir",
    "watchdog_for",
]

T = TypeVar("T")


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


def watchdog_for(arch: str) -> bytes:
    """The static watchdog for nodes of ``arch``: shipped or cached, else compiled now."""
    found = bundlestore.find_watchdog(arch)
    if found is not None:
        return found
    program = compile_watchdog(arch)
    bundlestore.save_watchdog(cache_dir() / arch, program)
    return program


def bundle_for(arch: str) -> Bundle:
    """The bundle for nodes of ``arch``: shipped or cached, else built now and cached."""
    found = bundlestore.find(arch)
    if found is not None:
        return found.bundle
    bundle = build_from_packages(arch)
    watchdog = next(f.data for f in bundle.files if f.name == WATCHDOG_NAME)
    bundlestore.save(cache_dir() / arch, bundle, watchdog=watchdog)
    return bundle


AGENT_PROGRAMS = ("tcpdump", "nsenter")


def agent_bundle_for(arch: str) -> Bundle:
    """The privileged mode's bundle for nodes of ``arch``: tcpdump, nsenter (util-linux) and
    the watchdog, so that the agent's image needs only a shell and tar. Made from this
    machine's Debian packages on first use and kept in the cache beside the upload bundles
    (``agent/ARCH``); the wheel does not ship it."""
    directory = cache_dir() / "agent" / arch
    found = bundlestore.load(directory, arch=arch, source="cache")
    if found is not None:
        return found.bundle
    bundle = build_from_packages(arch, programs=AGENT_PROGRAMS)
    bundlestore.save(directory, bundle, watchdog=None)
    return bundle
