"""`multisniff bundles list|build|export|import`: the upload bundles a client has, and moving them.

The upload mode needs a bundle (tcpdump, its libraries and loader, the watchdog) per node
architecture. A wheel ships them; where it does not (an install from a source tree on a machine
that could not build them) a client builds one from its Debian packages on first use. These
commands show which bundles are where, build them ahead of time, and carry them to machines
that can neither: ``export DIR`` on one that has them, ``import DIR`` on the other.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from multisniff import __version__
from multisniff.capture import bundlestore
from multisniff.capture.bundle import Bundle, BundleError, load_bundle
from multisniff.capture.bundlebuild import (
    ARCHITECTURES,
    WATCHDOG_NAME,
    arch_of,
    build,
    cache_dir,
    watchdog_source_digest,
)
from multisniff.errors import ExitCode, InputError, OutputError, UsageError

log = logging.getLogger("multisniff")

EXPORT_PREFIX = "multisniff-bundle-"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundles = sub.add_parser(
        "bundles", help="list, build, export or import the upload mode's tcpdump bundles",
        description="The upload mode sends a bundle (tcpdump, its libraries and loader, and a "
                    "watchdog) per node architecture. They come from the package itself, else "
                    "from the cache ($MULTISNIFF_BUNDLES, default ~/.cache/multisniff/bundles), "
                    "else they are built on first use from this machine's Debian packages.")
    actions = bundles.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="show which bundles exist where")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=run_list)
    making = actions.add_parser(
        "build", help="build bundles into the cache from this machine's Debian packages",
        description="Build bundles into the cache. By default from the installed tcpdump (and, "
                    "for another architecture, its Debian packages); with --from-source, "
                    "libpcap and tcpdump are compiled from Debian's source packages without "
                    "D-Bus, systemd and libcrypto and with multisniff's --buffer-timeout patch "
                    "to tcpdump, as the package build does (smaller, and the upload mode "
                    "needs no immediate mode, which drops packets under a flood).")
    making.add_argument("--arch", action="append", choices=ARCHITECTURES,
                        help="an architecture to build (repeatable; default: all)")
    making.add_argument("--from-source", action="store_true",
                        help="compile libpcap and tcpdump from Debian's source packages, "
                             "with multisniff's patch to tcpdump")
    making.set_defaults(run=run_build)
    export = actions.add_parser("export", help="write the bundles in use to DIR")
    export.add_argument("directory", metavar="DIR")
    export.set_defaults(run=run_export)
    load = actions.add_parser("import", help="check the bundles in DIR and put them in the cache")
    load.add_argument("directory", metavar="DIR")
    load.set_defaults(run=run_import)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run_list(args: argparse.Namespace) -> int:
    stored = bundlestore.all_stored()
    used = {s.arch: s for s in reversed(stored)}  # the first in lookup order wins
    if args.json:
        rows = [{"arch": s.arch, "digest": s.bundle.digest, "size": s.size, "source": s.source,
                 "path": str(s.path), "used": used[s.arch] is s,
                 "built_from": s.bundle.manifest.get("built_from")} for s in stored]
        print(json.dumps(rows, indent=1))
        return ExitCode.OK
    print(f"{'ARCH':<6} {'DIGEST':<12} {'SIZE':>8}  {'SOURCE':<8} PATH")
    for s in stored:
        mark = "" if used[s.arch] is s else "  (not used: an earlier one is)"
        print(f"{s.arch:<6} {s.bundle.digest[:12]:<12} {_size(s.size):>8}  {s.source:<8} "
              f"{s.path}{mark}")
    for arch in ARCHITECTURES:
        if arch not in used:
            print(f"{arch:<6} {'-':<12} {'-':>8}  {'none':<8} built on first use from this "
                  f"machine's Debian packages, or: multisniff bundles build --arch {arch}")
    return ExitCode.OK


def run_build(args: argparse.Namespace) -> int:
    for arch in args.arch or ARCHITECTURES:
        log.info("building the %s bundle%s ...", arch,
                 " from Debian's sources" if args.from_source else "")
        bundle = build(arch, from_source=args.from_source)
        watchdog = next(f.data for f in bundle.files if f.name == WATCHDOG_NAME)
        path = bundlestore.save(cache_dir() / arch, bundle, watchdog=watchdog)
        print(f"{arch:<6} {bundle.digest[:12]:<12} {_size(path.stat().st_size):>8}  {path}")
    return ExitCode.OK


def run_export(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    found = [s for s in (bundlestore.find(arch) for arch in ARCHITECTURES) if s is not None]
    if not found:
        raise InputError(
            "There is no bundle to export: this package ships none and the cache "
            f"({cache_dir()}) has none; make them with `multisniff bundles build` first."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stored in found:
            name = f"{EXPORT_PREFIX}{stored.arch}-{stored.bundle.digest[:12]}.tar.gz"
            (directory / name).write_bytes(stored.path.read_bytes())
            print(f"{stored.arch:<6} {stored.bundle.digest[:12]:<12} {_size(stored.size):>8}  "
                  f"{directory / name}")
    except OSError as exc:
        raise OutputError(f"Cannot write the bundles to {directory}: {exc.strerror}; choose a "
                          f"directory you may write to.") from exc
    missing = sorted(set(ARCHITECTURES) - {s.arch for s in found})
    if missing:
        log.warning("No %s bundle here to export; build it with `multisniff bundles build "
                    "--arch %s` where that is possible.", ", ".join(missing), missing[0])
    return ExitCode.OK


def run_import(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory; name the one `multisniff bundles "
                         f"export` wrote to.")
    files = sorted(p for p in directory.iterdir() if p.name.endswith(".tar.gz"))
    if not files:
        raise InputError(f"{directory} has no bundle (*.tar.gz) in it; name the directory "
                         f"`multisniff bundles export` wrote to.")
    checked = []
    for path in files:
        checked.append(_check_import(path))
    for arch, bundle, watchdog in checked:
        bundlestore.save(cache_dir() / arch, bundle, watchdog=watchdog, origin="imported")
        stored = bundlestore.load(cache_dir() / arch, arch=arch, source="cache")
        assert stored is not None
        print(f"{arch:<6} {bundle.digest[:12]:<12} {_size(stored.size):>8}  imported into "
              f"{stored.path}")
    return ExitCode.OK


def _check_import(path: Path) -> tuple[str, Bundle, bytes]:
    way_out = ("export it again with `multisniff bundles export` and copy it whole; nothing "
               "was imported")
    try:
        bundle = load_bundle(path.read_bytes(), name=str(path), way_out=way_out)
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror}; make it readable.") from exc
    except BundleError as exc:
        raise InputError(str(exc)) from exc
    arch = arch_of(bundle.manifest.get("multiarch"))
    if arch is None:
        raise InputError(
            f"{path} is a bundle for {bundle.manifest.get('multiarch')}, not one of the "
            f"architectures multisniff uploads to ({', '.join(ARCHITECTURES)}); nothing was "
            f"imported.")
    watchdogs = [f.data for f in bundle.files if f.name == WATCHDOG_NAME]
    if "tcpdump" not in bundle.programs or not watchdogs:
        raise InputError(f"{path} is a bundle without tcpdump or the watchdog, not an upload "
                         f"bundle; export it with `multisniff bundles export`; nothing was "
                         f"imported.")
    if bundle.manifest.get("watchdog_source_sha256") != watchdog_source_digest():
        raise InputError(
            f"{path} was made by another version of multisniff (its watchdog is not this "
            f"version's); export the bundles with the same multisniff version as this one "
            f"({__version__}); nothing was imported.")
    return arch, bundle, watchdogs[0]

