"""Build what the cluster runs: the Kubernetes binaries from the Go module, then the images.

Both are cached under ``$MULTISNIFF_CACHE`` and skipped when present, so ``build`` is cheap to
repeat. The binaries are built into a scratch directory and renamed into place: a build that is
interrupted leaves nothing that looks finished.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .layout import COMPONENTS, KUBERNETES_VERSION, Layout


class BuildError(Exception):
    pass


def ldflags() -> str:
    # Without these the binaries report v0.0.0 and the kubelet/apiserver version skew checks and
    # `kubectl version` say nonsense.
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    stamps = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in stamps.items()]
    return " ".join(flags)


def binaries(layout: Layout) -> float | None:
    """Build the binaries unless all are cached; return the seconds it took, None if skipped."""
    if all(layout.binary(c).exists() for c in COMPONENTS):
        print(f"build: binaries for {KUBERNETES_VERSION} cached in {layout.bin_dir}",
              file=sys.stderr)
        return None
    running = subprocess.run(["pgrep", "-f", f"go build.*{layout.bin_dir}"], capture_output=True)
    if running.returncode == 0:
        raise BuildError(f"Another go build into {layout.bin_dir} is running (pid "
                         f"{running.stdout.decode().split()[0]}); wait for it and run build again.")
    scratch = layout.bin_dir.with_name("bin.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    packages = [f"k8s.io/kubernetes/cmd/{c}" for c in COMPONENTS]
    print(f"build: compiling {', '.join(COMPONENTS)} {KUBERNETES_VERSION} (about 5 min cold on "
          "2 cores, under a minute with a warm Go build cache)", file=sys.stderr, flush=True)
    started = time.monotonic()
    env = dict(os.environ, GOTOOLCHAIN="local")
    result = subprocess.run(
        ["go", "build", "-mod=readonly", "-trimpath", "-ldflags", ldflags(), "-o", f"{scratch}/",
         *packages],
        cwd=layout.go_module_dir, env=env,
    )
    if result.returncode != 0:
        raise BuildError(f"go build failed (exit {result.returncode}); the output is above.")
    shutil.rmtree(layout.bin_dir, ignore_errors=True)
    scratch.rename(layout.bin_dir)
    seconds = time.monotonic() - started
    print(f"build: binaries built in {seconds:.0f}s into {layout.bin_dir}", file=sys.stderr)
    return seconds


def images(layout: Layout) -> None:
    builder = layout.images_builder
    if not builder.exists():
        print(f"build: no image builder at {builder}; skipping images", file=sys.stderr)
        return
    env = dict(os.environ, MULTISNIFF_CACHE=str(layout.cache))
    result = subprocess.run([sys.executable, str(builder)], env=env)
    if result.returncode != 0:
        raise BuildError(f"{builder} failed (exit {result.returncode}); the output is above.")
