"""Finding and removing what earlier capture sessions left behind (`multisniff cleanup`).

A session removes what it created on every way out, and what outlives a client killed with -9
ends by itself at the remote bound (watchdogs, agent pods' activeDeadlineSeconds). What can
still be found afterwards, and is removed here:

* agent Jobs and pods of the privileged mode, by their labels (``app.kubernetes.io/managed-by=
  multisniff``, and ``multisniff/session=ID`` with a session): deleted, also once finished;
* in every running container reachable by exec (and the ephemeral containers we added):
  watchdogs and tcpdumps started by multisniff, known by their arguments, are stopped;
  unpacked bundles and run directories in /tmp are deleted; an ephemeral container's sleeper
  is told to end.

Processes and bundles carry no session id (ephemeral containers and files cannot carry labels),
so with a session only that session's agent pods are looked at. A capture still running is
ended too: run this when no capture is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from multisniff.capture.execcapture import run_to_end
from multisniff.capture.model import MANAGED_BY, MANAGED_BY_LABEL, SESSION_LABEL
from multisniff.errors import MultisniffError
from multisniff.kube.model import Cluster, PodInfo, PodRef, PodSelector

log = logging.getLogger(__name__)

EXEC_LIMIT = 8
"""Containers searched at once."""

# NULs between arguments vanish when a shell reads /proc/PID/cmdline, so the argument lists
# are matched run together: the watchdog's own name then its first option, and the
# arguments every multisniff tcpdump starts with (see upload.capture_arguments).
_SEARCH = (
    'me=$$; for d in /proc/[0-9]*; do p=${{d#/proc/}}; [ "$p" = "$me" ] && continue; c=; '
    'IFS= read -r c < "$d/cmdline"; case $c in '
    '*msnf-watchdog--lifetime*) echo "watchdog $p"; {kill_watchdog};; '
    '*tcpdump-Zroot-U--time-stamp-precision=nano*) echo "tcpdump $p"; {kill_tcpdump};; '
    'esac; done 2>/dev/null; '
    'for b in /tmp/.multisniff-* /tmp/msnf-run-*; do [ -e "$b" ] || continue; '
    'echo "directory $b"; {remove}; done; '
    's=; read -r s < /tmp/msnf-sleeper.pid 2>/dev/null; '
    'if [ -n "$s" ] && [ ! -e /tmp/msnf-done ] && kill -0 "$s" 2>/dev/null; then '
    'echo "sleeper $s"; '
    '{end_sleeper}; fi; true'
)


def search_script(*, remove: bool) -> str:
    """Shell that lists (and with `remove`, stops or deletes) what multisniff left in a
    container: ``KIND WHAT`` lines."""
    if remove:
        return _SEARCH.format(kill_watchdog='kill -TERM "$p"', kill_tcpdump='kill -TERM "$p"',
                              remove='rm -rf "$b"', end_sleeper="touch /tmp/msnf-done")
    return _SEARCH.format(kill_watchdog=":", kill_tcpdump=":", remove=":", end_sleeper=":")


@dataclass(frozen=True, slots=True)
class Leftover:
    what: str
    """"agent job", "agent pod", "watchdog", "tcpdump", "directory", "sleeper"."""
    where: str
    """namespace/pod, and the container for what is inside one."""
    detail: str = ""
    removed: bool = False
    error: str = ""

    def line(self, *, dry_run: bool) -> str:
        text = f"{self.what} {self.detail} in {self.where}".replace("  ", " ")
        if dry_run:
            return f"would remove {text}"
        if self.error:
            return f"could not remove {text}: {self.error}"
        return f"removed {text}"


@dataclass
class CleanupReport:
    found: list[Leftover] = field(default_factory=list)
    searched: int = 0
    """Containers searched by exec."""
    unsearchable: list[str] = field(default_factory=list)
    """Containers that could not be searched (no shell, exec refused), with why."""
    dry_run: bool = False
    session: str | None = None

    def lines(self) -> list[str]:
        lines = [item.line(dry_run=self.dry_run) for item in self.found]
        if self.session is None:
            unsearched = (f"; {len(self.unsearchable)} could not be searched (no shell, or "
                          f"exec refused)" if self.unsearchable else "")
            lines.append(f"Searched {self.searched} container{'s' if self.searched != 1 else ''}"
                         f" for multisniff's processes and files{unsearched}.")
        else:
            lines.append(f"Only agent pods of session {self.session} were looked for: processes "
                         f"and files in containers carry no session id.")
        if not self.found:
            lines.append("Nothing was left behind.")
        return lines

    @property
    def failed(self) -> list[Leftover]:
        return [item for item in self.found if item.error]


def agent_selector(namespace: str | None, session: str | None) -> PodSelector:
    labels = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    if session:
        labels += f",{SESSION_LABEL}={session}"
    return PodSelector(namespace, labels=labels)


async def cleanup(cluster: Cluster, *, namespace: str | None, session: str | None = None,
                  dry_run: bool = False) -> CleanupReport:
    """Find (and unless `dry_run`, remove) what multisniff left in `namespace` (None: all)."""
    report = CleanupReport(dry_run=dry_run, session=session)
    selector = agent_selector(namespace, session)
    for job in await cluster.list_jobs(namespace, selector.labels):
        error = ""
        if not dry_run:
            try:
                await cluster.delete_job(job.namespace, job.name)
            except MultisniffError as exc:
                error = str(exc)
        report.found.append(Leftover("agent job", str(job), f"({job.state})",
                                     removed=not dry_run and not error, error=error))
    agents = (await cluster.list_pods(selector)).pods
    for pod in agents:
        error = ""
        if not dry_run:
            try:
                await cluster.delete_pod(pod.ref, grace_seconds=0)
            except MultisniffError as exc:
                error = str(exc)
        report.found.append(Leftover("agent pod", str(pod.ref), f"({pod.phase})",
                                     removed=not dry_run and not error, error=error))
    if session is not None:
        return report
    agent_uids = {pod.uid for pod in agents}
    pods = [pod for pod in (await cluster.list_pods(PodSelector(namespace))).pods
            if pod.phase == "Running" and pod.uid not in agent_uids and not pod.deleting]
    limiter = anyio.CapacityLimiter(EXEC_LIMIT)
    async with anyio.create_task_group() as tg:
        for pod in pods:
            for name in _containers(pod):
                tg.start_soon(_search, cluster, pod.ref, name, dry_run, report, limiter)
    report.found.sort(key=lambda item: (item.where, item.what, item.detail))
    return report


def _containers(pod: PodInfo) -> list[str]:
    names = [c.name for c in pod.containers if c.running]
    names += [c.name for c in pod.ephemeral_containers
              if c.running and c.name.startswith("msnf-")]
    return names


async def _search(cluster: Cluster, ref: PodRef, container: str, dry_run: bool,
                  report: CleanupReport, limiter: anyio.CapacityLimiter) -> None:
    where = f"{ref} container {container}"
    async with limiter:
        try:
            with anyio.fail_after(30):
                code, out, message = await run_to_end(
                    cluster, ref, container, ["sh", "-c", search_script(remove=not dry_run)])
        except (MultisniffError, TimeoutError) as exc:
            report.unsearchable.append(f"{where}: {exc or 'timed out'}")
            return
    if code != 0:
        report.unsearchable.append(f"{where}: {message or f'exit {code}'}")
        return
    report.searched += 1
    for line in out.decode(errors="replace").splitlines():
        kind, _, detail = line.strip().partition(" ")
        if kind in ("watchdog", "tcpdump", "directory", "sleeper"):
            detail = {"watchdog": f"(PID {detail})", "tcpdump": f"(PID {detail})",
                      "sleeper": f"(PID {detail}, an ephemeral container's)"}.get(kind, detail)
            report.found.append(Leftover(kind, where, detail, removed=not dry_run))
