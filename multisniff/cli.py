"""The command line: argv -> settings -> `multisniff.capture()` -> the UI; errors -> exit codes.

`multisniff -l SELECTOR ...` captures (also as `kubectl multisniff`); `multisniff merge`,
`inspect` and `profiles` are sub-commands. Sub-commands import their modules lazily so that
`merge` and `inspect` never import the Kubernetes client.

Exit codes (multisniff.errors.ExitCode):
  0    every matched pod was captured (or every input read)
  1    output was written, but some pods failed (or some input was damaged)
  2    usage error: the command line or a profile is wrong; nothing was started
  3    nothing was captured or read at all
  4    the cluster refused (RBAC, Pod Security, no such namespace); nothing was started
  130  Ctrl-C, SIGTERM or SIGHUP ended the capture early; what was captured until then is kept
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial

from multisniff import __version__
from multisniff.errors import ExitCode, MultisniffError, UsageError

# `typing` only for the type checker: `multisniff merge` does not import it (memory, start-up).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from multisniff.api import Capture
    from multisniff.engine.session import SessionResult
    from multisniff.engine.settings import CaptureSettings
    from multisniff.profiles import Profile

log = logging.getLogger("multisniff")


SUBCOMMANDS = ("merge", "inspect", "profiles", "bundles", "cleanup", "record", "mark")


class _Version(argparse.Action):
    """--version, with the pcap core in use (compiled or pure Python), looked up only when
    asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from multisniff.pcap import core

        try:
            which = core.describe()
        except core.CoreUnavailable as exc:
            which = str(exc)
        parser.exit(message=f"multisniff {__version__}, {which}\n")


OFFLINE_COMMANDS = ("merge", "inspect")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with the help width found as shutil.get_terminal_size finds it
    (COLUMNS, else the terminal of stdout, else 80) without importing shutil, which imports
    the bz2 and lzma modules: half a MiB of every `multisniff merge`. Sub-commands' parsers
    are of this class too (add_subparsers makes them of the parser's class)."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 0
        return self.formatter_class(prog=self.prog, width=(columns or 80) - 2)  # type: ignore[call-arg]


def build_parser(*, record: bool = False, offline: bool = False) -> argparse.ArgumentParser:
    """The sub-commands' parser; record's capture options (which import the API) only when
    `record` is the command, and with `offline` (merge or inspect is the command) only those
    two, so that they import the pcap core and little else: memory and start-up time."""
    parser: argparse.ArgumentParser = _Parser(
        prog="multisniff",
        description="Capture packets from many Kubernetes pods into one pcapng timeline.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and the active pcap core, and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_offline_commands(sub)
    if offline:
        return parser
    _add_profiles_command(sub)
    _add_bundles_command(sub)
    _add_cleanup_command(sub)
    _add_record_commands(sub, full=record)
    return parser


def _add_cleanup_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cleanup = sub.add_parser(
        "cleanup", help="find and remove what earlier captures left behind",
        description="Deletes multisniff's agent Jobs and pods (by label) and stops multisniff's "
                    "tcpdumps and watchdogs and removes its bundles in every running "
                    "container reachable by exec. It also ends captures still running: use it "
                    "when none is.")
    cleanup.add_argument("-n", "--namespace", metavar="NAMESPACE",
                         help="namespace (default: the kubeconfig context's, else default)")
    cleanup.add_argument("-A", "--all-namespaces", action="store_true",
                         help="every namespace")
    cleanup.add_argument("--session", metavar="ID",
                         help="only the agent Jobs and pods of this session (its id is in their "
                              "multisniff/session label and in the capture's log)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="list what would be removed; remove nothing")
    cleanup.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file (or KUBECONFIG)")
    cleanup.add_argument("--context", metavar="CONTEXT", help="kubeconfig context")
    cleanup.set_defaults(run=run_cleanup)


def run_cleanup(args: argparse.Namespace) -> int:
    import anyio

    from multisniff import api

    report = anyio.run(partial(api.cleanup, namespace=args.namespace,
                               all_namespaces=args.all_namespaces, session=args.session,
                               dry_run=args.dry_run, kubeconfig=args.kubeconfig,
                               context=args.context), backend="asyncio")
    for line in report.lines():
        print(line)
    return ExitCode.PARTIAL if report.failed else ExitCode.OK


def _add_record_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
                         full: bool) -> None:
    from multisniff import record

    parser = sub.add_parser(
        "record", help="capture around a command: start it once the pods capture, stop when "
                       "it ends, exit with its code",
        usage="multisniff record -l SELECTOR [options] -- COMMAND [ARGS...]",
        description="Capture the matched pods while COMMAND runs (a chaos test in CI): COMMAND "
                    "starts once every matched pod has a tcpdump listening, the capture stops "
                    "--tail after COMMAND ends, and the exit code is COMMAND's. The pcapng "
                    "is kept per --keep; the JSON summary is always written. Inside COMMAND, "
                    "`multisniff mark TEXT` puts a mark on the timeline.")
    if full:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show tracebacks and debug logs")
        add_capture_options(parser, record=True)
        record.add_record_options(parser)
    parser.set_defaults(run=run_record, command_argv=[])
    record.add_mark_command(sub)


def _add_profiles_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profiles = sub.add_parser(
        "profiles", help="list the capture profiles, or show one's resolved settings",
        description="Profiles are TOML files searched in ./configs, "
                    "~/.config/multisniff/profiles and the package's own.")
    profiles.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    profiles.add_argument("name", nargs="?", metavar="NAME|PATH",
                          help="the profile to show")
    profiles.set_defaults(run=run_profiles)


def _first_word(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if arg != "--debug"), None)


def _is_subcommand(argv: Sequence[str]) -> bool:
    """`multisniff merge ...` vs `multisniff -l app=web ...`: the first word decides."""
    return _first_word(argv) in SUBCOMMANDS


def _add_offline_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`merge` and `inspect`: work on capture files, no cluster needed."""
    from multisniff import offline  # imports only the pcap core, never the Kubernetes client

    offline.add_commands(sub)


def _add_bundles_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bundles list|build|export|import`: the upload mode's tcpdump bundles, no cluster."""
    from multisniff import bundles

    bundles.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if _first_word(arguments) == "record":
        from multisniff.record import split_command

        arguments, command = split_command(arguments)
    first = _first_word(arguments)
    parser = (build_parser(record=first == "record", offline=first in OFFLINE_COMMANDS)
              if _is_subcommand(arguments) else build_capture_parser())
    args = parser.parse_args(arguments)
    if args.command == "record":
        args.command_argv = command
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


# --- capture ----------------------------------------------------------------------------------


def build_capture_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="multisniff",
        usage="multisniff -l SELECTOR [options] -o FILE | multisniff "
              "{record,mark,merge,inspect,profiles,bundles,cleanup} ...",
        description="Capture packets from every pod matched by a label selector at once into "
                    "one pcapng timeline, each pod its own named interface.",
        epilog="Sub-commands: record (capture around a command: record -l SELECTOR -- "
               "COMMAND), mark (a mark from inside that command), merge (merge capture "
               "files), inspect (summarize one), profiles (list/show), bundles (the upload "
               "bundles: list, build, export, import), cleanup (remove what earlier runs "
               "left). Exit codes: 0 all "
               "captured, 1 some pods failed, 2 usage error, 3 nothing captured, 4 refused "
               "by the cluster, 130 interrupted (record: see its --help and the README).",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and the active pcap core, and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    add_capture_options(parser, record=False)
    parser.set_defaults(command="capture", run=run_capture)
    return parser


def add_capture_options(parser: argparse.ArgumentParser, *, record: bool) -> None:
    """The options of a capture: which pods, what, where to and how long. `record` writes a
    file that --keep decides about, so it has no live outputs and no --dry-run."""
    from multisniff.api import mode_names

    which = parser.add_argument_group("which pods (kubectl conventions)")
    which.add_argument("-l", "--selector", dest="labels", metavar="SELECTOR",
                       help="label selector, e.g. app=web,tier!=cache")
    which.add_argument("--field-selector", metavar="S", help="field selector")
    which.add_argument("-n", "--namespace", metavar="NAMESPACE",
                       help="namespace (default: the kubeconfig context's, else default)")
    which.add_argument("-A", "--all-namespaces", action="store_const", const=True,
                       help="pods of every namespace")
    which.add_argument("-c", "--container", metavar="CONTAINER",
                       help="container to capture through (default: the first running one)")
    which.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file (or KUBECONFIG)")
    which.add_argument("--context", metavar="CONTEXT", help="kubeconfig context")
    what = parser.add_argument_group("what to capture")
    what.add_argument("-i", "--interface", metavar="IFACE", help="interface in the pod (any)")
    what.add_argument("-f", "--filter", metavar="BPF", help="tcpdump filter, e.g. 'port 53'")
    what.add_argument("-s", "--snaplen", type=int, metavar="SNAPLEN",
                      help="bytes kept of each packet")
    what.add_argument("--mode", choices=mode_names(),
                      help="how tcpdump comes to run next to a pod (default: auto, which "
                           "takes the first of the others that can)")
    what.add_argument("--ephemeral-image", metavar="IMAGE",
                      help="image with tcpdump for the ephemeral mode's debug container")
    what.add_argument("--agent-image", metavar="IMAGE",
                      help="image of the privileged mode's agent pods (sh, tar and head suffice)")
    what.add_argument("--agent-namespace", metavar="NAMESPACE",
                      help="namespace of the privileged mode's agent pods (default: the "
                           "namespace of each node's first pod)")
    what.add_argument("--profile", metavar="NAME|PATH",
                      help="settings from a profile; flags override it")
    out = parser.add_argument_group("output and limits")
    if record:
        out.add_argument("-o", "--output", metavar="FILE",
                         help="pcapng file (mode 0600), exactly time-ordered (default "
                              "multisniff-record-DATE-TIME.pcapng)")
    else:
        out.add_argument("-o", "--output", metavar="FILE",
                         help="pcapng file (mode 0600), exactly time-ordered; - for a live "
                              "stream on stdout")
        out.add_argument("--wireshark", action="store_true",
                         help="show the live stream in Wireshark; closing it ends the capture")
    out.add_argument("--duration", metavar="D", help="stop after D (30s, 5m, 1h)")
    out.add_argument("--count", type=int, metavar="N", help="stop after N packets in total")
    out.add_argument("--max-size", metavar="SIZE",
                     help="stop after SIZE of packet blocks in total (500k, 10M, 1G)")
    out.add_argument("--rotate-size", metavar="SIZE",
                     help="a ring of files (as dumpcap -b filesize:): FILE_00001_TIME.pcapng, "
                          "the next once this one has SIZE (100M); merged live, within the "
                          "reorder window")
    out.add_argument("--rotate-every", metavar="D",
                     help="a ring of files (as dumpcap -b duration:): the next after D (10m)")
    out.add_argument("--keep-files", type=int, metavar="N",
                     help="keep only the newest N files of the ring (as dumpcap -b files:)")
    out.add_argument("--no-follow", dest="follow", action="store_const", const=False,
                     help="capture only the pods running now; end when their captures end")
    if not record:  # record always writes them
        out.add_argument("--events", action="store_const", const=True,
                         help="write pods added, deleted and restarted, and each pod's "
                              "capture starting and ending, as events on the interface "
                              "multisniff/events")
    if not record:
        out.add_argument("--dry-run", action="store_true",
                         help="list matched pods, the mode each gets and why, what would be "
                              "created; capture nothing")
    out.add_argument("--summary-json", metavar="PATH",
                     help="write a JSON summary (per pod and totals) to PATH" +
                          (" (default: the output's name with .json)" if record else ""))


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile named by --profile (or the defaults), overridden by the flags given."""
    from multisniff.profiles import parse_duration, parse_size, resolve

    profile, _ = resolve(args.profile)
    changes: dict[str, object] = {}
    for name in ("labels", "field_selector", "namespace", "all_namespaces", "container",
                 "interface", "filter", "snaplen", "mode", "count", "follow", "ephemeral_image",
                 "agent_image", "agent_namespace", "events", "keep_files"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    try:
        if args.duration is not None:
            changes["duration"] = parse_duration(args.duration)
        if args.max_size is not None:
            changes["max_size"] = parse_size(args.max_size)
        if args.rotate_size is not None:
            changes["rotate_size"] = parse_size(args.rotate_size)
        if args.rotate_every is not None:
            changes["rotate_every"] = parse_duration(args.rotate_every)
    except ValueError as exc:
        raise UsageError(f"{exc}.") from exc
    if args.all_namespaces and args.namespace is None:
        changes["namespace"] = None
    for name in ("snaplen", "count", "keep_files", "rotate_size", "rotate_every"):
        value = changes.get(name)
        if isinstance(value, (int, float)) and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be more than 0, not "
                             f"{value:g}.")
    return profile.replace(**changes)


def run_capture(args: argparse.Namespace) -> int:
    import anyio

    from multisniff.api import settings_for

    settings = settings_for(profile_from_args(args))
    code: int = anyio.run(_capture, args, settings, backend="asyncio")
    return code


async def _capture(args: argparse.Namespace, settings: CaptureSettings) -> int:
    import gc

    from multisniff import api, ui

    # The modules just imported live as long as the process: out of the cyclic collector's
    # sight, they are not traversed again by every full collection while captures start.
    # Measured on the local cluster, 10 pods for 5 s: 0.94 -> 0.74 s of CPU (mean of four).
    gc.freeze()

    if args.dry_run:
        for line in await api.dry_run(profile=settings, kubeconfig=args.kubeconfig,
                                      context=args.context):
            print(line)
        return ExitCode.OK
    cap = api.capture(profile=settings, output=args.output, wireshark=args.wireshark,
                      kubeconfig=args.kubeconfig, context=args.context)
    try:
        result = await run_with_ui(cap, debug=args.debug)
    except MultisniffError as exc:
        if args.summary_json:
            ui.write_summary_json(args.summary_json, ui.summary_json(
                cap.result if cap.done else None, exit_code=exc.exit_code,
                output=cap.output_name, error=str(exc)))
        raise
    for line in ui.summary_lines(result):
        log.info("%s", line)
    if args.summary_json:
        ui.write_summary_json(args.summary_json, ui.summary_json(
            result, exit_code=result.exit_code, output=cap.output_name))
    return result.exit_code


async def run_with_ui(cap: Capture, *, debug: bool) -> SessionResult:
    """Run a capture to its end with this process's signals and, on a terminal, the live table:
    the first SIGINT, SIGTERM or SIGHUP (its terminal gone) stops it gently, the second cuts it
    off."""
    import signal

    import anyio

    from multisniff import ui

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                        signal.SIGHUP) as signals:
            async for number in signals:
                name = signal.Signals(number).name
                if cap.done:
                    continue
                session = cap.session
                if session.stop_reason and session.interrupted:
                    log.warning("%s again: cutting the capture off now.", name)
                    cap.abort()
                else:
                    log.info("%s: stopping the captures; press Ctrl-C again to cut them off "
                             "at once.", name)
                    cap.stop(f"interrupted ({name})", interrupted=True)

    console = None
    if not debug and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
    table = console is not None and console.is_terminal
    # The capture's own error comes out of `async with cap` as itself: raised inside the
    # task group, it would come out wrapped in an exception group (a traceback).
    async with cap, anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        if table and console is not None:
            with ui.terminal_logging(console, debug=debug):
                tg.start_soon(ui.LiveTable(cap, console).run)
                with contextlib.suppress(MultisniffError):
                    await cap.wait()
        else:
            with contextlib.suppress(MultisniffError):
                await cap.wait()
        tg.cancel_scope.cancel()
    return cap.result


def run_record(args: argparse.Namespace) -> int:
    from multisniff.api import settings_for
    from multisniff.record import run_record as record

    return record(args, settings_for(profile_from_args(args)), args.command_argv)


def run_profiles(args: argparse.Namespace) -> int:
    import json

    from multisniff import profiles

    if args.action == "list":
        for name, path in profiles.available():
            profile = profiles.load_profile(path)
            print(f"{name:16} {profile.description}  ({path})")
        return ExitCode.OK
    if args.name is None:
        raise UsageError("profiles show needs a NAME or PATH, e.g. multisniff profiles show dns.")
    profile, source = profiles.resolve(args.name)
    print(f"# {source}")
    for key, value in profiles.describe(profile).items():
        print(f"# {key} is unset" if value is None else f"{key} = {json.dumps(value)}")
    return ExitCode.OK
