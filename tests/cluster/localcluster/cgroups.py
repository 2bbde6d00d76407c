"""The kubelet's cgroups (cgroup v1, cgroupfs driver): who is in them, and removing them.

The kubelet creates ``kubepods`` under the root of every hierarchy and never removes it; pods'
processes outlive a killed kubelet and containerd inside them. down kills those and removes the
directories bottom-up, so that a later up starts from nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def kubepods_dirs() -> list[Path]:
    """Every kubepods* directory, deepest first."""
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if not hierarchy.is_dir():
            continue
        for top in sorted(hierarchy.glob("kubepods*")):
            if not top.is_dir():
                continue
            for dirpath, _dirnames, _files in os.walk(top):
                found.append(Path(dirpath))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def pids_inside() -> set[int]:
    pids: set[int] = set()
    for d in kubepods_dirs():
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return pids


def kill_everything_inside(*, timeout: float = 10.0) -> set[int]:
    """SIGKILL every process in the kubepods cgroups until none is left; return what remains."""
    deadline = time.monotonic() + timeout
    while (pids := pids_inside()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return pids_inside()


def remove_all(*, timeout: float = 5.0) -> list[Path]:
    """rmdir the kubepods trees bottom-up; return the directories that would not go."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for d in kubepods_dirs():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
