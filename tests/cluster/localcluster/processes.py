"""Start the cluster's daemons detached, find them again later, and stop them.

A daemon is ours if its executable is one of ``DAEMON_EXECUTABLES`` and its command line names our
state directory or containerd's: that finds them after a crash of clusterctl or a lost pid file,
and never touches a system containerd or another engineer's etcd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout

DAEMON_EXECUTABLES = frozenset({
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
    "containerd", "containerd-shim-runc-v2",
})

# Registries are unreachable on purpose: a pull would resolve a name through the host's resolver,
# which is off this machine. Images are imported instead, and a missing one fails at once.
NO_REGISTRY_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
}


class StartError(Exception):
    """A daemon died or never became ready; the message has the tail of its log."""


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None


def _log_path(layout: Layout, name: str) -> Path:
    return layout.logs / f"{name}.log"


def start(layout: Layout, daemon: Daemon) -> int:
    """Start ``daemon`` in its own session with its output in logs/NAME.log; return its pid."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    log = _log_path(layout, daemon.name)
    if log.exists():
        log.replace(log.with_suffix(".log.prev"))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update(daemon.env or {})
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            list(daemon.argv), stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, close_fds=True,
        )
    (layout.pids / f"{daemon.name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def log_tail(layout: Layout, name: str, lines: int = 15) -> str:
    try:
        text = _log_path(layout, name).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def pid_of(layout: Layout, name: str) -> int | None:
    """The pid recorded for daemon ``name``, if that process is still alive and still ours."""
    try:
        pid = int((layout.pids / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid in {p for p, _ in ours(layout)} else None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def ours(layout: Layout) -> Iterator[tuple[int, str]]:
    """(pid, executable name) of every live daemon that belongs to this cluster."""
    markers = (str(layout.state), str(layout.containerd_state))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        exe = _exe_name(pid)
        if exe not in DAEMON_EXECUTABLES:
            continue
        if any(m in arg for arg in _cmdline(pid) for m in markers):
            yield pid, exe


LINGERING_NAMES = frozenset(name[:15] for name in (*DAEMON_EXECUTABLES, "runc"))
"""The names the kernel keeps for a process (15 characters of it) until its parent reaps it:
our daemons, and runc, which the shims run to delete containers as they go."""


def _comm(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.find("(") + 1:stat.rfind(")")]


def lingering(layout: Layout) -> list[tuple[int, str]]:
    """(pid, name) of this cluster's processes that are still there, exiting ones included.

    A process that is exiting has no executable link and no command line left, only its name:
    one of ours by name without a command line counts (no Docker engine or other runtime runs
    here); one with a command line counts when it names our state directories. Zombies do not:
    they hold nothing, and where PID 1 does not reap (as in some sandboxes) they stay."""
    markers = (str(layout.state), str(layout.containerd_state))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        name = _comm(pid)
        if name not in LINGERING_NAMES or not alive(pid):
            continue
        cmdline = _cmdline(pid)
        if not cmdline or any(m in arg for arg in cmdline for m in markers):
            found.append((pid, name))
    return found


def wait_gone(layout: Layout, *, timeout: float) -> list[tuple[int, str]]:
    """Wait, at most ``timeout`` seconds, until `lingering` finds nothing; what is left."""
    deadline = time.monotonic() + timeout
    while (left := lingering(layout)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate(pids: Sequence[int], *, grace: float) -> list[int]:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the pids that needed KILL."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in killed):
        time.sleep(0.05)
    return killed


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_until(
    layout: Layout, name: str, pid: int, ready: Callable[[], bool], *, timeout: float, what: str
) -> float:
    """Poll ``ready`` until it holds; fail early, with the log, if the daemon dies."""
    start = time.monotonic()
    while True:
        try:
            if ready():
                return time.monotonic() - start
        except OSError:
            pass
        if not alive(pid):
            raise StartError(f"{name} exited before {what}; last lines of "
                             f"{_log_path(layout, name)}:\n{log_tail(layout, name)}")
        if time.monotonic() - start > timeout:
            raise StartError(f"{name} did not become {what} within {timeout:.0f}s; last lines of "
                             f"{_log_path(layout, name)}:\n{log_tail(layout, name)}")
        time.sleep(0.2)
