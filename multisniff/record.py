"""`multisniff record ... -- COMMAND`: a capture around a command, for chaos tests in CI.

The capture starts first; COMMAND starts once every pod matched at that moment has a tcpdump
listening (or after --ready-timeout: then anyway, or not at all with --require-ready). COMMAND
keeps its own stdin, stdout and stderr, and learns where to send marks from
MULTISNIFF_MARK_SOCKET (`multisniff mark TEXT` sends one). Signals to multisniff go to COMMAND
first (except a terminal's Ctrl-C, which COMMAND gets from the terminal itself). When COMMAND
has ended, the capture goes on for --tail to catch the last replies, then stops. Its start and
its end with the exit code are events on the timeline, as are the marks and the pods' churn.

Exit code: COMMAND's (128+N when a signal N killed it), except where the capture itself failed
while COMMAND succeeded, or COMMAND never ran; see RECORD_EXIT_CODES, which the README quotes.
The pcapng is kept or removed by --keep; the JSON summary is always written; the paths of what
was kept are the last lines on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from multisniff.errors import MultisniffError, UsageError

if TYPE_CHECKING:
    from multisniff.engine.settings import CaptureSettings

MARK_SOCKET_VARIABLE = "MULTISNIFF_MARK_SOCKET"
KEEP_CHOICES = ("on-failure", "always", "never")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
COMMAND_NOT_FOUND = 127
COMMAND_NOT_EXECUTABLE = 126
MAX_MARK = 4096

RECORD_EXIT_CODES = (
    ("COMMAND's own", "COMMAND ran and the recording worked (some pods may have failed: see the "
                      "summary)"),
    ("128+N", "a signal N killed COMMAND"),
    ("COMMAND's own", "COMMAND ran and failed, and the recording failed too (both are logged)"),
    ("3 or 4", "COMMAND succeeded but the recording failed: 4 the cluster refused, 3 nothing "
               "could be recorded (output not written, cluster lost)"),
    ("2", "usage error; nothing was started"),
    ("3 or 4", "the capture could not start (nothing matches with --no-follow, unreachable "
               "cluster; 4: refused): COMMAND did not run"),
    ("3", "--require-ready and some pod had no tcpdump listening after --ready-timeout: "
          "COMMAND did not run"),
    ("126, 127", "COMMAND could not be executed, or was not found"),
    ("130", "interrupted before COMMAND started"),
)
"""(code, when): the exit codes of `multisniff record`, in the README's table."""


def add_record_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the command")
    group.add_argument("--ready-timeout", metavar="D", default="60s",
                       help="how long COMMAND waits for every matched pod to have a tcpdump "
                            "listening (default 60s)")
    group.add_argument("--require-ready", action="store_true",
                       help="do not run COMMAND if some pod is not capturing by then (exit 3); "
                            "by default it runs anyway")
    group.add_argument("--tail", metavar="D", default="2s",
                       help="go on capturing this long after COMMAND ended, for the last "
                            "replies (default 2s)")
    group.add_argument("--keep", choices=KEEP_CHOICES, default="on-failure",
                       help="keep the pcapng when the exit code is not 0 (default), always, "
                            "or never; the JSON summary is always written")


def default_output() -> str:
    return time.strftime("multisniff-record-%Y%m%d-%H%M%S.pcapng")


def summary_path(output: str) -> str:
    stem = output[:-len(".pcapng")] if output.endswith(".pcapng") else output
    return stem + ".json"


def run_record(args: argparse.Namespace, settings: CaptureSettings,
               command: list[str]) -> int:
    from multisniff.profiles import parse_duration

    if not command:
        raise UsageError("record needs a command after --, e.g. multisniff record -l app=web "
                         "-- ./chaos.sh.")
    if args.output == "-":
        raise UsageError("record writes a file that --keep decides about; give -o FILE, not "
                         "-o - (or use multisniff -o - for a live stream).")
    try:
        ready_timeout = parse_duration(args.ready_timeout)
        tail = parse_duration(args.tail)
    except ValueError as exc:
        raise UsageError(f"{exc}.") from exc
    from multisniff.recorder import Recorder

    output = args.output or default_output()
    recorder = Recorder(settings, command, output=output,
                        summary=args.summary_json or summary_path(output),
                        ready_timeout=ready_timeout, require_ready=args.require_ready,
                        tail=tail, keep=args.keep, kubeconfig=args.kubeconfig,
                        context=args.context)
    import anyio

    code: int = anyio.run(recorder.run, backend="asyncio")
    return code


# --- multisniff mark ----------------------------------------------------------------------------


def add_mark_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mark = sub.add_parser(
        "mark", help="put a mark on the timeline of the recording around this command",
        description="Inside `multisniff record -- COMMAND`: puts TEXT as an event at this "
                    f"moment into the recording ({MARK_SOCKET_VARIABLE} says where).")
    mark.add_argument("text", nargs="+", metavar="TEXT")
    mark.set_defaults(run=run_mark)


def run_mark(args: argparse.Namespace) -> int:
    send_mark(" ".join(args.text))
    return 0


def send_mark(text: str, *, path: str | None = None, timeout: float = 10.0) -> None:
    """Send one mark to the recording that set MULTISNIFF_MARK_SOCKET; returns once it is on
    the timeline."""
    path = path or os.environ.get(MARK_SOCKET_VARIABLE)
    if not path:
        raise UsageError(f"multisniff mark works inside `multisniff record ... -- COMMAND`, "
                         f"which sets {MARK_SOCKET_VARIABLE}; it is not set here.")
    data = " ".join(text.split()).encode()
    if not data:
        raise UsageError("multisniff mark needs a TEXT that is not blank.")
    if len(data) > MAX_MARK:
        raise UsageError(f"A mark has at most {MAX_MARK} bytes, not {len(data)}; shorten it.")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(path)
            client.sendall(data + b"\n")
            client.shutdown(socket.SHUT_WR)
            reply = client.recv(16)
    except OSError as exc:
        raise MultisniffError(f"The recording at {path} ({MARK_SOCKET_VARIABLE}) did not take "
                              f"the mark ({(exc.strerror or str(exc)).lower()}); has it "
                              "ended?") from exc
    if reply != b"ok\n":
        raise MultisniffError(f"The recording at {path} did not confirm the mark; has it "
                              "ended?")


def exit_code_table() -> list[str]:
    """The README's table of record's exit codes, from RECORD_EXIT_CODES."""
    lines = ["| exit code | when |", "| --- | --- |"]
    lines += [f"| {code} | {when} |" for code, when in RECORD_EXIT_CODES]
    return lines


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """record's own arguments, and COMMAND ARGS... after the first `--`."""
    arguments = list(argv)
    if "--" not in arguments:
        return arguments, []
    at = arguments.index("--")
    return arguments[:at], arguments[at + 1:]


__all__ = ["RECORD_EXIT_CODES", "add_mark_command", "add_record_options", "run_record",
           "send_mark", "split_command"]
