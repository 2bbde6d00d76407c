"""The package build ships the upload mode's tcpdump bundles (amd64, arm64) as package data.

Everything else is declared in pyproject.toml. The bundles are made by
`multisniff.capture.bundlebuild` from Debian's source packages (small: no D-Bus, systemd or
libcrypto), else from Debian's binary packages; where this machine can make neither, the build
goes on without that bundle, says so, and clients build one on first use. An editable install
puts them into the source tree (multisniff/capture/bundles, ignored by git).

MULTISNIFF_WHEEL_BUNDLES=none builds without bundles; =packages skips the source recipe.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _bundle_modules() -> tuple[Any, Any]:
    """bundlebuild and bundlestore, imported without running the package's __init__ files
    (they may import dependencies that the isolated build environment does not have)."""
    for name, directory in (("multisniff", ROOT / "multisniff"),
                            ("multisniff.capture", ROOT / "multisniff" / "capture")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(directory)]
            sys.modules[name] = package
    return (importlib.import_module("multisniff.capture.bundlebuild"),
            importlib.import_module("multisniff.capture.bundlestore"))


class BuildWithBundles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            target = ROOT / "multisniff" / "capture" / "bundles"
        else:
            target = Path(self.build_lib) / "multisniff" / "capture" / "bundles"
        make_bundles(target)


def make_bundles(target: Path) -> None:
    recipe = os.environ.get("MULTISNIFF_WHEEL_BUNDLES", "source")
    if recipe == "none":
        print("multisniff: MULTISNIFF_WHEEL_BUNDLES=none: this build ships no upload bundles; "
              "clients build them on first use.", file=sys.stderr)
        return
    bundlebuild, bundlestore = _bundle_modules()
    for arch in bundlebuild.ARCHITECTURES:
        shutil.rmtree(target / arch, ignore_errors=True)  # an earlier build's is not this one's
        reasons = []
        for from_source in (True, False) if recipe == "source" else (False,):
            try:
                bundle = bundlebuild.build(arch, from_source=from_source)
            except Exception as exc:  # whatever it is, the package builds without the bundle
                reasons.append(str(exc) or repr(exc))
                continue
            path = bundlestore.save(target / arch, bundle, watchdog=None, origin="built")
            print(f"multisniff: shipping the {arch} upload bundle {bundle.digest[:12]} "
                  f"({path.stat().st_size} bytes, "
                  f"{bundle.manifest['built_from']['recipe']}).", file=sys.stderr)
            if reasons:
                print(f"multisniff: (not from source: {reasons[0]})", file=sys.stderr)
            break
        else:
            print(f"multisniff: this build ships no {arch} upload bundle, clients build one on "
                  f"first use: {' / '.join(reasons)}", file=sys.stderr)


setup(cmdclass={"build_py": BuildWithBundles})
