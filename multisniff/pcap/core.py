"""Which core does the per-packet work: the compiled extension `multisniff._core` (Rust, built
with the package where a Rust compiler exists) or the pure-Python code of this package, which is
complete on its own and stays the reference the compiled core is tested against.

MULTISNIFF_CORE=python forces the pure-Python core; MULTISNIFF_CORE=compiled refuses to run
without the extension (for benchmarks and CI, where silently falling back would hide a broken
build). Readers and mergers take the core when they are made, so tests switch it with `use()`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

ABI = 6
"""The extension's interface version this package was written against (`_core.ABI`)."""

COMPILED = "compiled"
PYTHON = "python"


class CoreUnavailable(RuntimeError):
    """MULTISNIFF_CORE=compiled, but the extension is missing or from another build."""


def _load() -> tuple[ModuleType | None, str]:
    """The extension and, when it cannot be used, why not in words."""
    try:
        # by name: import-linter would read `from multisniff import _core` as an import of
        # the package `multisniff` (and so of every layer), the extension having no source
        _core = importlib.import_module("multisniff._core")
    except ImportError as exc:
        return None, f"not built ({exc})"
    if getattr(_core, "ABI", None) != ABI:
        return None, (f"built for interface {getattr(_core, 'ABI', '?')}, this package needs "
                      f"{ABI}: reinstall the package to rebuild it")
    return _core, ""


_extension, _why_not = _load()
_active: str | None = None
"""Chosen on first use (so that a wrong MULTISNIFF_CORE is said where it matters), or by `use`."""


def _choose() -> str:
    wanted = os.environ.get("MULTISNIFF_CORE", "").strip().lower()
    if wanted == PYTHON:
        return PYTHON
    if wanted not in ("", "auto", COMPILED):
        raise CoreUnavailable(f"MULTISNIFF_CORE={wanted!r} is not a core: use 'compiled', "
                              "'python' or leave it unset")
    if _extension is None:
        if wanted == COMPILED:
            raise CoreUnavailable(f"MULTISNIFF_CORE=compiled, but the compiled core is "
                                  f"{_why_not}")
        return PYTHON
    return COMPILED


def active() -> str:
    """"compiled" or "python": the core that readers and mergers made now will use."""
    global _active
    if _active is None:
        _active = _choose()
    return _active


def compiled() -> ModuleType | None:
    """The extension module when it is the active core, else None."""
    return _extension if active() == COMPILED else None


def available() -> bool:
    return _extension is not None


def describe() -> str:
    """One line for --version: which core is active, and why the compiled one is not."""
    if active() == COMPILED:
        assert _extension is not None
        return f"compiled core {_extension.VERSION} (Rust)"
    if _extension is None:
        return f"pure-Python core (the compiled core is {_why_not})"
    return "pure-Python core (MULTISNIFF_CORE=python)"


@contextmanager
def use(name: str) -> Iterator[None]:
    """Make readers and mergers created inside the block use core `name` (tests, benchmarks)."""
    global _active
    if name == COMPILED and _extension is None:
        raise CoreUnavailable(f"the compiled core is {_why_not}")
    if name not in (COMPILED, PYTHON):
        raise ValueError(name)
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous
