"""The package build ships the upload mode's tcpdump bundles (amd64, arm64) as package data,
and says in one line of the build log whether it ships the compiled core (`multisniff._core`).

Everything else is declared in pyproject.toml. The bundles are made by
`multisniff.capture.bundlebuild` from Debian's source packages (small: no D-Bus, systemd or
libcrypto), else from Debian's binary packages; where this machine can make neither, the build
goes on without that bundle, says so, and clients build one on first use. An editable install
puts them into the source tree (multisniff/capture/bundles, ignored by git).

MULTISNIFF_WHEEL_BUNDLES=none builds without bundles; =packages skips the source recipe.

The compiled core is optional (pyproject.toml): without a Rust toolchain, or when it fails to
build, the package installs with the pure-Python core. Wheels are tagged abi3 (cp310-abi3): the
extension uses only the stable ABI of CPython 3.10, so one wheel per platform serves 3.10 on.
CARGO_BUILD_TARGET (e.g. aarch64-unknown-linux-gnu, with --plat-name linux_aarch64) cross-builds
it; see `make wheels`. MULTISNIFF_REQUIRE_CORE=1 makes a build without the compiled core fail
(CI, release wheels), where going on without it would hide a broken build.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools_rust import build_rust

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


class BuildCompiledCore(build_rust):
    """setuptools-rust's build, with one line saying what became of the compiled core.

    setuptools-rust already goes on without an optional extension (no rustc: a paragraph about
    pip and rustup; a failed cargo build: its output); this says what that means here. It runs
    twice in a build (as a step of `build` and from `build_ext`); the line is said once."""

    said: ClassVar[set[str]] = set()

    def say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            print(line, file=sys.stderr)

    def run(self) -> None:
        if self.inplace:
            # An editable install's earlier build, under another name (before abi3 tagging,
            # another Python), would be imported before this one: only this build may remain.
            for stale in (ROOT / "multisniff").glob("_core.*.so"):
                stale.unlink()
        rustc = shutil.which("rustc")
        cargo = os.environ.get("CARGO") or shutil.which("cargo")
        required = os.environ.get("MULTISNIFF_REQUIRE_CORE") == "1"
        if rustc is None or cargo is None:
            if required:
                raise SystemExit("multisniff: MULTISNIFF_REQUIRE_CORE=1, but there is no Rust "
                                 "toolchain (cargo, rustc) on PATH: install Rust (rustup).")
            self.say("multisniff: no Rust toolchain (cargo, rustc) on PATH: installing with the "
                     "pure-Python core only; install Rust (rustup) and reinstall for the "
                     "compiled one.")
            return
        self.failures: list[str] = []
        self.built = False
        super().run()  # without a working rustc, it returns having built nothing
        target = os.environ.get("CARGO_BUILD_TARGET") or "the host"
        if not self.built:
            why = self.failures[0] if self.failures else f"`{rustc} -V` failed"
            if required:
                raise SystemExit(f"multisniff: MULTISNIFF_REQUIRE_CORE=1, but the compiled core "
                                 f"failed to build for {target}: {why}")
            self.say(f"multisniff: the compiled core failed to build for {target}, installing "
                     f"with the pure-Python core only: {why}")
            return
        self.say(f"multisniff: built the compiled core (multisniff._core) for {target} with "
                 f"{cargo}.")

    def run_for_extension(self, extension: Any) -> None:
        try:
            super().run_for_extension(extension)
        except Exception as exc:  # setuptools-rust goes on without an optional extension
            lines = str(exc).strip().splitlines()
            self.failures.append(lines[-1] if lines else repr(exc))
            raise
        self.built = True

setup(cmdclass={"build_py": BuildWithBundles, "build_rust": BuildCompiledCore},
      # The extension is built with PyO3's abi3-py310 (rust/Cargo.toml): tag the wheel so.
      options={"bdist_wheel": {"py_limited_api": "cp310"}})
