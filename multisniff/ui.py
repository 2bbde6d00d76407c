"""What the user sees of a capture: a live table on a terminal, the final summary, the JSON one.

On a terminal, stderr shows a table that rich redraws in place (per pod: state, mode, packets,
bytes, rate, drops) and log lines scroll above it; elsewhere only the plain log lines are
written. The summary JSON (`--summary-json`) is for scripts and CI; its shape is stable:

    {"exit_code": int, "output": str, "duration": float, "stop_reason": str, "error": str,
     "totals": {"pods", "captured", "failed", "packets", "bytes", "dropped", "late"},
     "pods": [{"namespace", "pod", "node", "container", "mode", "reason", "state", "error",
               "ended_by", "resumed", "restarts", "packets", "bytes", "dropped", "late",
               "interface"}],
     "skipped": [{"namespace", "pod", "reason"}],
     "events": [{"time": float, "kind": str, "text": str}]}
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio

if TYPE_CHECKING:  # rich is imported only where a terminal shows the table (50 ms of start-up)
    from rich.console import Console
    from rich.table import Table

from multisniff.engine.runs import CAPTURED, CaptureRun
from multisniff.engine.session import SessionResult


class Watched(Protocol):
    """What the live table watches: a running capture (`multisniff.api.Capture`)."""

    @property
    def pods(self) -> tuple[CaptureRun, ...]: ...


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover


def run_json(run: CaptureRun) -> dict[str, Any]:
    pod = run.target.pod
    return {
        "namespace": pod.ref.namespace,
        "pod": pod.ref.name,
        "node": pod.node,
        "container": run.target.container,
        "interface": run.label,
        "mode": run.mode,
        "reason": run.reason,
        "state": run.state,
        "error": run.error,
        "ended_by": run.ended_by,
        "resumed": run.resumed,
        "restarts": run.restarts,
        "packets": run.packets,
        "bytes": run.bytes,
        "dropped": run.dropped,
        "late": run.late,
    }


def summary_json(result: SessionResult | None, *, exit_code: int, output: str | None,
                 error: str = "", started: float | None = None) -> dict[str, Any]:
    runs = result.runs if result is not None else []
    now = time.time()
    begin = result.started if result is not None else (started or now)
    end = result.ended if result is not None else now
    return {
        "exit_code": int(exit_code),
        "output": output,
        "duration": round(end - begin, 3),
        "stop_reason": result.stop_reason if result is not None else "",
        "error": error,
        "totals": {
            "pods": len(runs),
            "captured": sum(run.state in CAPTURED for run in runs),
            "failed": sum(run.state not in CAPTURED for run in runs),
            "packets": sum(run.packets for run in runs),
            "bytes": sum(run.bytes for run in runs),
            "dropped": sum(run.dropped for run in runs),
            "late": sum(run.late for run in runs),
        },
        "pods": [run_json(run) for run in runs],
        "left_behind": list(result.left_behind) if result is not None else [],
        "skipped": [
            {"namespace": item.pod.ref.namespace, "pod": item.pod.ref.name,
             "reason": item.reason}
            for item in (result.skipped if result is not None else [])
        ],
        "events": [
            {"time": event.time_ns / 1e9, "kind": event.kind.value, "text": event.text}
            for event in (result.events if result is not None else [])
        ],
    }


def write_summary_json(path: str, summary: dict[str, Any]) -> None:
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
        file.write("\n")


def summary_lines(result: SessionResult) -> list[str]:
    lines = []
    for run in result.runs:
        line = (f"{run.label}: {run.outcome}, {run.packets} packets, "
                f"{human_bytes(run.bytes)}, {run.dropped} dropped, {run.late} late "
                f"(mode {run.mode})")
        if run.restarts:
            line += (f", went on across {run.restarts} container restart"
                     f"{'s' if run.restarts != 1 else ''}")
        if run.resumed:
            line += f", resumed {run.resumed}"
        if run.error:
            line += f": {run.error}"
        lines.append(line)
    total = sum(run.packets for run in result.runs)
    dropped = sum(run.dropped for run in result.runs)
    where = "stdout" if result.output == "-" else result.output
    lines.append(f"{total} packets from {len(result.runs)} capture"
                 f"{'s' if len(result.runs) != 1 else ''} written to {where} "
                 f"({dropped} dropped) in {result.ended - result.started:.1f} s; "
                 f"{result.stop_reason or 'done'}.")
    lines.extend(f"Left behind: {entry}" for entry in result.left_behind)
    return lines


class LiveTable:
    """The per-pod table on a terminal, redrawn from the session's runs."""

    def __init__(self, capture: Watched, console: Console) -> None:
        self.capture = capture
        self.console = console
        self._last: dict[int, tuple[float, int]] = {}

    def render(self) -> Table:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        table.add_column("pod", overflow="fold")  # the whole name, wrapped if need be
        for column in ("state", "mode", "packets", "bytes", "rate", "drops"):
            table.add_column(column, no_wrap=True, justify="left" if column in (
                "state", "mode") else "right")
        now = time.monotonic()
        for run in self.capture.pods:
            then, before = self._last.get(run.number, (now, run.bytes))
            rate = (run.bytes - before) / (now - then) if now > then else 0.0
            if now - then >= 1.0 or run.number not in self._last:
                self._last[run.number] = (now, run.bytes)
            table.add_row(run.label, run.state, run.mode, str(run.packets),
                          human_bytes(run.bytes), f"{human_bytes(rate)}/s", str(run.dropped))
        return table

    async def run(self) -> None:
        from rich.live import Live

        with Live(self.render(), console=self.console, refresh_per_second=4,
                  transient=False) as live:
            try:
                while True:
                    await anyio.sleep(0.5)
                    live.update(self.render())
            finally:
                live.update(self.render())


@contextmanager
def terminal_logging(console: Console, *, debug: bool) -> Iterator[None]:
    """Route the log through rich while the live table is drawn, so lines scroll above it."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    handler = RichHandler(console=console, show_time=False, show_path=False,
                          rich_tracebacks=debug)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved
