"""The package as users get it, for the packaging tests: this tree as git sees it, built by pip
in an isolated build environment, installed into a fresh venv that has this venv's
dependencies but not its editable multisniff."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[2]


def copy_tree(into: Path) -> Path:
    """A copy of the tree as git sees it: no build/, bundles or extension of an earlier build."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def build_sdist(tree: Path, out: Path, *, timeout: float = 300) -> Path:
    """The sdist that `python -m build` makes from `tree` (no bundles: they are built with
    the wheel)."""
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(tree)],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "MULTISNIFF_WHEEL_BUNDLES": "none"})
    assert result.returncode == 0, result.stderr[-5000:]
    (built,) = out.glob("multisniff-*.tar.gz")
    return built


def build_wheel(tree: Path, out: Path, *, env: dict[str, str] | None = None,
                options: tuple[str, ...] = (), timeout: float = 880) -> tuple[Path, str]:
    """The wheel pip builds from `tree` (a directory or an sdist), and the build's log lines
    that multisniff wrote."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", str(tree), "-w", str(out),
         *options],
        capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    log = "\n".join(line.strip() for line in (result.stdout + result.stderr).splitlines()
                    if "multisniff:" in line)
    (built,) = out.glob("multisniff-*.whl")
    return built, log


def fresh_venv(venv: Path) -> Path:
    """A venv whose site-packages has this venv's dependencies, as a plain path (this venv's
    editable multisniff is not there: that needs the .pth files, which a plain path does not
    run). Returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    dependencies = Path(anyio.__file__).parents[1]
    (site_packages,) = venv.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text(f"{dependencies}\n")
    return site_packages


def client_env(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: the venv's bin on PATH and the system's, nothing of this one's."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"), **extra}
