"""tcpdump's closing statistics, read from its stderr.

When tcpdump ends (SIGINT, -c reached) it prints to stderr::

    12 packets captured
    15 packets received by filter
    0 packets dropped by kernel

(and "N packets dropped by interface" on some systems). These counts are the only word from the
remote side on what it saw and lost, so every mode parses them into its `CaptureReport`.
Pure functions over text: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(
    r"^\s*(\d+) packets? (captured|received by filter|dropped by kernel)\s*$", re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class TcpdumpStatistics:
    captured: int | None = None
    received: int | None = None
    dropped_by_kernel: int | None = None


def parse_statistics(stderr: str) -> TcpdumpStatistics:
    """The counts from tcpdump's stderr; a count that was not printed is None.

    When a text holds several runs' statistics, the last of each count wins.
    """
    found: dict[str, int] = {}
    for match in _LINE.finditer(stderr):
        found[match.group(2)] = int(match.group(1))
    return TcpdumpStatistics(
        captured=found.get("captured"),
        received=found.get("received by filter"),
        dropped_by_kernel=found.get("dropped by kernel"),
    )


def last_lines(stderr: str, *, count: int = 5, limit: int = 2000) -> str:
    """The last lines of stderr without the statistics, for a failure's message."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not _LINE.match(ln)]
    return "\n".join(lines[-count:])[-limit:]
