"""The capture modes by name: the one place that lists them.

`--mode`, profile validation, `--dry-run`, the summary and the docs read the names from here,
and `auto` tries the modes that take part in it in the order they are listed. A new mode is a
module with a class that has ``name``, ``assess``, ``open`` and ``aclose`` and a
``from_options(cluster, options)`` constructor, plus one line below. Mode modules are imported
only when a mode is made, so that reading the names costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multisniff.errors import UsageError

if TYPE_CHECKING:
    from multisniff.capture.model import CaptureMode, ModeOptions
    from multisniff.kube.model import Cluster

AUTO = "auto"

ModeFactory = Callable[["Cluster", "ModeOptions"], "CaptureMode"]


@dataclass(frozen=True, slots=True)
class ModeEntry:
    name: str
    factory: str | ModeFactory
    """"module:Class" (its ``from_options``), or a callable (cluster, options) -> mode."""
    summary: str
    """One line for the help and the docs: how tcpdump comes to run next to a pod."""
    in_auto: bool = True
    """Whether auto tries this mode (in registry order)."""

    def make(self, cluster: Cluster, options: ModeOptions) -> CaptureMode:
        if callable(self.factory):
            return self.factory(cluster, options)
        module, _, attribute = self.factory.partition(":")
        make: ModeFactory = getattr(importlib.import_module(module), attribute).from_options
        return make(cluster, options)


_MODES: dict[str, ModeEntry] = {entry.name: entry for entry in (
    ModeEntry("upload", "multisniff.capture.upload:UploadMode",
              "tcpdump from a bundle sent over exec into the target container"),
    ModeEntry("ephemeral", "multisniff.capture.ephemeral:EphemeralMode",
              "tcpdump in an ephemeral debug container added to the pod"),
    # In auto only as the last resort, and only where a profile says allow_privileged = true:
    # the mode's assessment checks that (ModeOptions.by_auto).
    ModeEntry("privileged", "multisniff.capture.privileged:PrivilegedMode",
              "tcpdump entering the pod's network from a privileged agent pod on its node"),
)}


def mode_names() -> tuple[str, ...]:
    """Every name --mode takes: auto first, then the modes in the order auto tries them."""
    return (AUTO, *_MODES)


def entries() -> tuple[ModeEntry, ...]:
    return tuple(_MODES.values())


def register(entry: ModeEntry) -> None:
    """Add a mode (or replace one of the same name)."""
    _MODES[entry.name] = entry


def unregister(name: str) -> None:
    _MODES.pop(name, None)


def create(name: str, cluster: Cluster, options: ModeOptions) -> CaptureMode:
    """The mode called `name`, over a connected cluster; auto is the modes it tries, in order."""
    if name == AUTO:
        from multisniff.capture.auto import AutoMode

        for_auto = dataclasses.replace(options, by_auto=True)
        return AutoMode(*(entry.make(cluster, for_auto) for entry in _MODES.values()
                          if entry.in_auto))
    entry = _MODES.get(name)
    if entry is None:
        raise UsageError(f"There is no capture mode {name!r}; use one of "
                         f"{', '.join(mode_names())}.")
    return entry.make(cluster, options)
