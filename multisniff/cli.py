"""The command line: argv -> a command object -> run it; error classes -> exit codes.

Sub-commands import their modules lazily so that `merge` and `inspect` never import the
Kubernetes client.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from multisniff import __version__
from multisniff.errors import ExitCode, MultisniffError

log = logging.getLogger("multisniff")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multisniff",
        description="Capture packets from many Kubernetes pods into one pcapng timeline.",
    )
    parser.add_argument("--version", action="version", version=f"multisniff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_offline_commands(sub)
    return parser


def _add_offline_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`merge` and `inspect`: work on capture files, no cluster needed."""
    from multisniff import offline  # imports only the pcap core, never the Kubernetes client

    offline.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="multisniff: %(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        code: int = args.run(args)
        return code
    except MultisniffError as exc:
        if args.debug:
            log.exception("%s", exc)
        else:
            log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("Interrupted; what was written so far is kept.")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away; nothing more can be said there.
        return ExitCode.PARTIAL
