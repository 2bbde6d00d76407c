"""The errors multisniff tells its user about, and the exit code each one ends the process with.

Every class here carries a message that is one full sentence naming the problem and the way out.
Library errors are translated into these at the IO edge (``raise ... from exc``); the command line
prints the message and exits with the class's code, and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes, documented in the README; stable for scripts and CI."""

    OK = 0
    """Everything asked for was done: every input read, every target captured."""
    PARTIAL = 1
    """Output was written, but some of the input was damaged or some targets failed."""
    USAGE = 2
    """The command line or a profile is wrong; nothing was started."""
    NOTHING = 3
    """Nothing could be captured or read at all."""
    REFUSED = 4
    """The cluster refused (RBAC, Pod Security, no such namespace); nothing was started."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM ended the run early; what was captured until then is kept."""


class MultisniffError(Exception):
    """An error with a user-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.NOTHING


class UsageError(MultisniffError):
    """The command line or a profile asks for something impossible."""

    exit_code = ExitCode.USAGE


class InputError(MultisniffError):
    """An input file cannot be opened or is not a capture at all."""

    exit_code = ExitCode.NOTHING


class OutputError(MultisniffError):
    """The output cannot be written (disk full, permission, closed pipe)."""

    exit_code = ExitCode.NOTHING


class RefusedError(MultisniffError):
    """The cluster said no: RBAC, Pod Security, or a namespace that does not exist."""

    exit_code = ExitCode.REFUSED


class ClusterError(MultisniffError):
    """The cluster cannot be reached, or it failed a request that it did not refuse."""

    exit_code = ExitCode.NOTHING
