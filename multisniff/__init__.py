"""multisniff: capture packets from every Kubernetes pod matched by a selector into one pcapng.

    import multisniff

    async with multisniff.capture("app=web", namespace="shop", output="web.pcapng") as cap:
        await cap.ready()
        ...
    print(cap.result.exit_code)

`capture`, `run_capture` (blocking) and `dry_run` are documented in `multisniff.api`. The names
below are imported on first use, so that `multisniff merge` and `--version` stay quick.
"""

from __future__ import annotations

import importlib

# The subpackage of the capture modes shares its name with the function that starts a capture.
# It is loaded here, before the name is bound below, so that the import system never binds it
# again; the object bound there calls `api.capture` and hands every other attribute to the
# subpackage, so `multisniff.capture.upload` and friends still resolve.
from multisniff import capture as _modes
from multisniff._version import __version__

# `typing` only for the type checker: `multisniff merge` does not import it (memory, start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from multisniff.api import Capture, Output


__all__ = [
    "Capture",
    "CaptureRun",
    "CaptureSettings",
    "Event",
    "EventKind",
    "NotReady",
    "Profile",
    "SessionResult",
    "__version__",
    "capture",
    "dry_run",
    "mode_names",
    "run_capture",
    "settings_for",
]

_LAZY = {
    "Capture": "multisniff.api",
    "NotReady": "multisniff.api",
    "dry_run": "multisniff.api",
    "mode_names": "multisniff.api",
    "run_capture": "multisniff.api",
    "settings_for": "multisniff.api",
    "Event": "multisniff.engine.events",
    "EventKind": "multisniff.engine.events",
    "CaptureRun": "multisniff.engine.runs",
    "SessionResult": "multisniff.engine.session",
    "CaptureSettings": "multisniff.engine.settings",
    "Profile": "multisniff.profiles",
}


class _CaptureEntry:
    """`multisniff.capture(...)`: see `multisniff.api.capture`."""

    def __call__(self, selector: str | None = None, *, output: Output | None = None,
                 **arguments: Any) -> Capture:
        from multisniff.api import capture as start

        return start(selector, output=output, **arguments)

    def __getattr__(self, name: str) -> Any:
        return getattr(_modes, name)

    def __repr__(self) -> str:
        return "<function multisniff.capture>"


capture = _CaptureEntry()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'multisniff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
