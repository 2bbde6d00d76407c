"""Upload mode: carry tcpdump into the target container itself and run it there.

Nothing is added to the pod: the bundle (tcpdump, its libraries and loader, and the static
watchdog; see `bundle` and `bundlecache`) is unpacked over exec stdin into
``/tmp/.multisniff-<digest12>`` of the target container, which needs only ``sh``, ``tar`` and an
``/etc/passwd``, and must run as root with CAP_NET_RAW. An identical bundle already there (its
manifest names the same digest; the probe of `assess` looks) is not sent again. One exec does
the rest: a shell receives the bundle on stdin when it is sent (``head -c SIZE | tar -xz``), then
runs::

    DIR/msnf-watchdog --lifetime L --batch B --remove DIR --pidfile DIR/run-X.pid -- \\
        DIR/lib/ld-linux-... --library-path DIR/lib DIR/tcpdump -Z root -U \
        --time-stamp-precision=nano --buffer-timeout=25 -B 8192 -w - -i IFACE ...

with stdin open: closing it (or the stream ending, or the client dying) makes the watchdog stop
tcpdump and delete DIR. tcpdump gets packets from the kernel soon after they came (see
`handover_arguments`) and writes them at once (-U) into the watchdog, which passes them on in
batches (see watchdog.c): both run in the target container and die with it, so what they
hold when it is killed is lost. The shell outlives ``head``, ``tar`` and the watchdog, the
readers of its stdin, because containerd can cut short the stdin of an exec process that reads
it itself (containerd#13934); the bundle goes into a side directory renamed into place only once
complete, so a manifest in DIR means a whole bundle. One exec instead of three (presence check,
upload, capture): each exec is a TLS connection the client pays for.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

from multisniff.capture.bundle import MANIFEST_NAME, Bundle
from multisniff.capture.bundlebuild import BUFFER_TIMEOUT_PATCH, tcpdump_patches
from multisniff.capture.bundlecache import WATCHDOG_NAME, PerArchitecture, bundle_for
from multisniff.capture.execcapture import (
    ExecCapture,
    StderrLog,
    run_to_end,
    signal_by_pidfile,
)
from multisniff.capture.model import (
    Assessment,
    CaptureSpec,
    Leftovers,
    ModeOptions,
    Target,
)
from multisniff.errors import MultisniffError
from multisniff.kube.model import Cluster, ExecChannel, PodRef

log = logging.getLogger(__name__)

_CAP_NET_RAW = 1 << 13
CAPTURE_BUFFER_KIB = 8192
MIN_BUFFER_TIMEOUT_MS = 10
MAX_BUFFER_TIMEOUT_MS = 1000
_UPLOAD_CHUNK = 64 * 1024
_NEEDED_COMMANDS = ("tar", "head", "mkdir", "mv", "rm")
_PROBE = (
    'for c in {commands}; do command -v "$c" >/dev/null 2>&1 || echo "missing=$c"; done; '
    "[ -f /etc/passwd ] || echo nopasswd; "
    "[ -d {directory} ] && [ -w {directory} ] || echo readonly; "
    "while read -r k r e rest; do case $k in "
    'Uid:) echo "uid=$e";; CapEff:) echo "capeff=$r";; esac; done < /proc/self/status; '
    "{present}"
)


def presence_check(directory: str, digest: str) -> str:
    """Shell that prints "present" when this bundle (by digest) is unpacked at ``directory``;
    exits 0 either way. The manifest is sorted JSON with one key a line: "digest" is line 2."""
    manifest = shlex.quote(posixpath.join(directory, MANIFEST_NAME))
    line = shlex.quote(f'"digest": "{digest}"')
    return (f'{{ read -r a; read -r b; }} < {manifest} 2>/dev/null && '
            f'case "$b" in *{line}*) echo present;; esac; true')


class UploadError(MultisniffError):
    """The bundle could not be put into a target, or tcpdump not started there."""


def capture_arguments(spec: CaptureSpec, *, handover: Sequence[str] = ()) -> list[str]:
    """tcpdump's arguments after ``-Z root`` for a capture spec: pcap to stdout, unbuffered,
    with nanosecond timestamps (the merge's own unit: no conversion per packet), then the
    ``handover`` options (`handover_arguments`): the arguments before them are those `cleanup`
    knows a multisniff tcpdump by."""
    args = ["-U", "--time-stamp-precision=nano", *handover, "-w", "-", "-i", spec.interface,
            "-s", str(spec.snaplen)]
    if spec.packet_count is not None:
        args += ["-c", str(spec.packet_count)]
    if spec.bpf_filter:
        args.append(spec.bpf_filter)
    return args


def buffer_timeout_ms(flush_delay: float) -> int:
    """The packet buffer timeout for a tcpdump whose watchdog holds output ``flush_delay``
    seconds: half of that, so that a packet waits at most one and a half flush delays on the
    pod's side, within MIN_BUFFER_TIMEOUT_MS (each timeout that ends a block with packets in it
    wakes tcpdump) and MAX_BUFFER_TIMEOUT_MS (tcpdump's own)."""
    return max(MIN_BUFFER_TIMEOUT_MS, min(MAX_BUFFER_TIMEOUT_MS, round(flush_delay * 500)))


def handover_arguments(spec: CaptureSpec, *, buffer_timeout: bool) -> list[str]:
    """Options for a tcpdump that dies with the container it captures: what the kernel holds
    for it then is lost, and by default it holds packets until a block of its ring fills or a
    second has passed. With ``buffer_timeout`` (a tcpdump with multisniff's patch, see
    `bundlebuild.BUFFER_TIMEOUT_PATCH`) the blocks are handed over after `buffer_timeout_ms`
    instead; they stay packed, so a flood fills them densely. Otherwise, or when the watchdog
    holds nothing (``flush_delay`` 0), immediate mode, in which libpcap's ring (TPACKET_V2)
    has one frame of the snapshot length per packet: with ``any``, the default 2 MiB hold 8
    packets of 256 KiB. In both, the ring is CAPTURE_BUFFER_KIB: 32 such frames, or 32 blocks
    of 256 KiB that each take a buffer timeout's packets at light load."""
    if buffer_timeout and spec.flush_delay > 0:
        timeout = f"--buffer-timeout={buffer_timeout_ms(spec.flush_delay)}"
        return [timeout, "-B", str(CAPTURE_BUFFER_KIB)]
    return ["--immediate-mode", "-B", str(CAPTURE_BUFFER_KIB)]


def watchdog_arguments(spec: CaptureSpec, *, remove: str | None = None,
                       pidfile: str | None = None) -> list[str]:
    """The watchdog's options for a capture spec (before ``--`` and the program)."""
    args = ["--lifetime", f"{spec.lifetime:g}"]
    if spec.flush_delay > 0:
        args += ["--batch", f"{spec.flush_delay:g}"]
    if remove is not None:
        args += ["--remove", remove]
    if pidfile is not None:
        args += ["--pidfile", pidfile]
    return args


def capture_script(bundle: Bundle, directory: str, spec: CaptureSpec, *, pidfile: str,
                   upload: int) -> str:
    """The shell script of the capture exec: receive ``upload`` bytes of bundle on stdin (none:
    it is there already), unpack them into ``directory``, run the watched tcpdump."""
    run = shlex.join(capture_command(bundle, directory, spec, pidfile=pidfile))
    manifest = shlex.quote(posixpath.join(directory, MANIFEST_NAME))
    if not upload:
        # Another capture of ours may still be unpacking it: wait up to 30 s for it to land.
        return (f'i=0; while [ ! -f {manifest} ] && [ $i -lt 300 ]; do sleep 0.1; '
                f'i=$((i+1)); done; {run}')
    return (
        f'd={shlex.quote(directory)}; t="$d.part.$$"; rm -rf "$t" && mkdir -p "$t" || exit 125; '
        f'if head -c {upload} | tar -xzf - -C "$t" && [ -f "$t"/{MANIFEST_NAME} ]; then '
        f'if [ -f {manifest} ]; then rm -rf "$t"; '
        f'else rm -rf "$d"; mv "$t" "$d" || {{ rm -rf "$t"; exit 125; }}; fi; '
        f'else rm -rf "$t"; echo "multisniff: the bundle did not unpack whole" >&2; exit 125; '
        f'fi; {run}'
    )


def capture_command(bundle: Bundle, directory: str, spec: CaptureSpec, *,
                    pidfile: str | None = None) -> list[str]:
    """The argv of the watched tcpdump run from the bundle unpacked at ``directory``."""
    handover = handover_arguments(
        spec, buffer_timeout=BUFFER_TIMEOUT_PATCH in tcpdump_patches(bundle))
    return [posixpath.join(directory, WATCHDOG_NAME),
            *watchdog_arguments(spec, remove=directory, pidfile=pidfile), "--",
            *bundle.command("tcpdump", capture_arguments(spec, handover=handover),
                            root=directory)]


class UploadMode:
    """Runs tcpdump inside the target container from an uploaded bundle."""

    name = "upload"

    def __init__(
        self,
        cluster: Cluster,
        *,
        directory: str = "/tmp",
        bundles: Callable[[str], Bundle] = bundle_for,
        upload_timeout: float = 120.0,
        cleanup_timeout: float = 10.0,
        leftovers: Leftovers | None = None,
    ) -> None:
        self._cluster = cluster
        self._leftovers = leftovers or Leftovers()
        self._directory = directory
        self._upload_timeout = upload_timeout
        self._cleanup_timeout = cleanup_timeout
        self._bundles = PerArchitecture(cluster, bundles)
        self._locks: dict[tuple[str, str], anyio.Lock] = {}
        self._present_at_probe: dict[tuple[str, str], bool] = {}
        """Per (pod uid, container): whether the last probe found this bundle there."""
        self._running: dict[tuple[str, str], int] = {}
        """Per (pod uid, container): our captures there that have sent or found the bundle."""
        self.bytes_uploaded = 0
        """Bytes of bundles sent to targets so far (0 when every target had it already)."""

    @classmethod
    def from_options(cls, cluster: Cluster, options: ModeOptions) -> UploadMode:
        return cls(cluster, leftovers=options.leftovers)

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        return set(namespaces)

    async def aclose(self) -> None:
        """Nothing lives for the session: each capture's watchdog removes its bundle."""

    async def assess(self, target: Target) -> Assessment:
        name = target.container
        container = target.pod.container(name)
        if container is None:
            return Assessment(False, f"pod {target.label} has no container {name}")
        if not container.running:
            return Assessment(False, f"container {name} is not running")
        if container.run_as_non_root:
            return Assessment(False, f"container {name} must run as non-root (runAsNonRoot), "
                                     f"and capturing needs root")
        if "NET_RAW" in container.dropped_capabilities or "ALL" in container.dropped_capabilities:
            return Assessment(False, f"container {name} drops CAP_NET_RAW, which capturing needs")
        # Without a bundle for the node (none can be had on this client) the probe still runs,
        # so that a container that could never take one says why, not what this client lacks.
        bundle: Bundle | None = None
        unavailable: MultisniffError | None = None
        try:
            bundle = await self._bundle(target)
        except MultisniffError as exc:
            unavailable = exc
        script = _PROBE.format(
            commands=" ".join(_NEEDED_COMMANDS), directory=shlex.quote(self._directory),
            present="true" if bundle is None else
            presence_check(self.bundle_directory(bundle), bundle.digest))
        try:
            code, out, message = await run_to_end(self._cluster, target.pod.ref, name,
                                            ["sh", "-c", script])
        except MultisniffError as exc:
            return Assessment(False, f"container {name} cannot be probed: {exc}")
        if code is None and ("not found" in message or "no such file" in message.lower()):
            return Assessment(False, f"container {name} has no shell (sh)")
        if code != 0:
            return Assessment(False, f"container {name} could not run the probe: "
                                     f"{message or f'sh exited with {code}'}")
        facts = dict(line.partition("=")[::2] for line in out.decode(errors="replace").split())
        self._present_at_probe[(target.pod.uid, name)] = "present" in facts
        missing = [line.partition("=")[2] for line in out.decode(errors="replace").split()
                   if line.startswith("missing=")]
        if missing:
            return Assessment(False, f"container {name} has no {', '.join(missing)}")
        if "nopasswd" in facts:
            return Assessment(False, f"container {name} has no /etc/passwd, which tcpdump "
                                     f"-Z root needs")
        if "readonly" in facts:
            return Assessment(False, f"container {name} cannot write to {self._directory}")
        uid, capeff = facts.get("uid", ""), facts.get("capeff", "")
        if uid != "0":
            return Assessment(False, f"container {name} runs as uid {uid or 'unknown'}, "
                                     f"not root")
        try:
            if capeff and not int(capeff, 16) & _CAP_NET_RAW:
                return Assessment(False, f"container {name} runs as root without CAP_NET_RAW")
        except ValueError:
            pass
        if unavailable is not None:
            why = str(unavailable).rstrip(".")
            return Assessment(False, f"container {name} could take tcpdump, but "
                                     f"{why[:1].lower()}{why[1:]}")
        return Assessment(True, f"container {name} has tar and runs as root",
                          creates=(f"{self._directory}/.multisniff-<digest> in container {name} "
                                   f"(removed when the capture ends)",))

    async def _bundle(self, target: Target) -> Bundle:
        return await self._bundles.for_pod(target.pod)

    def bundle_directory(self, bundle: Bundle) -> str:
        return posixpath.join(self._directory, f".multisniff-{bundle.digest[:12]}")

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[ExecCapture]:
        ref, name = target.pod.ref, target.container
        bundle = await self._bundle(target)
        directory = self.bundle_directory(bundle)
        pidfile = posixpath.join(directory, f"run-{secrets.token_hex(4)}.pid")
        stderr = StderrLog()
        key = (target.pod.uid, name)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with AsyncExitStack() as stack:
            # One bundle per container: concurrent opens must not upload over each other.
            async with lock:
                try:
                    present = self._present_at_probe.pop(key, None)
                    if self._running.get(key):
                        present = True  # sent by a capture of ours: there, or unpacking
                    elif present is None:  # not probed just now: look
                        present = await self._present(ref, name, directory, bundle.digest)
                    data = b"" if present else bundle.targz
                    command = ["sh", "-c", capture_script(bundle, directory, spec,
                                                          pidfile=pidfile, upload=len(data))]
                    channel = await stack.enter_async_context(self._cluster.exec(
                        ref, name, command, stdin=True, on_stderr=stderr,
                        linger=spec.read_linger))
                    if data:
                        await self._send(channel, data, ref, name, directory, stderr)
                except BaseException:
                    if not self._running.get(key):
                        await self._remove(ref, name, directory)
                    raise
                self._running[key] = self._running.get(key, 0) + 1
                stack.callback(self._done, key)
            # A v4 exec cannot close stdin alone: then signal the watchdog by its PID file.
            stop = signal_by_pidfile(pidfile, "INT")
            yield ExecCapture(self._cluster, ref, name, channel, stderr, stop_command=stop,
                              bound_to_container=True, spec=spec)
            # Leaving the exec closes the stream: the watchdog stops tcpdump and removes DIR.

    def _done(self, key: tuple[str, str]) -> None:
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]

    async def _send(self, channel: ExecChannel, data: bytes, ref: PodRef, container: str,
                    directory: str, stderr: StderrLog) -> None:
        try:
            with anyio.fail_after(self._upload_timeout):
                for start in range(0, len(data), _UPLOAD_CHUNK):
                    await channel.write(data[start:start + _UPLOAD_CHUNK])
        except TimeoutError:
            raise UploadError(
                f"Sending the tcpdump bundle into {directory} of {ref} container {container} "
                f"took over {self._upload_timeout:g} s; retry, or use --mode ephemeral."
            ) from None
        except MultisniffError as exc:  # the shell ended early: say what it said
            with anyio.move_on_after(self._cleanup_timeout):
                await channel.wait()
            said = bytes(stderr.data).decode(errors="replace").strip() or str(exc)
            raise UploadError(
                f"Unpacking the tcpdump bundle into {directory} of {ref} container "
                f"{container} failed ({said}); check that it can write there, or use "
                f"--mode ephemeral."
            ) from exc
        self.bytes_uploaded += len(data)

    async def _present(self, ref: PodRef, container: str, directory: str, digest: str) -> bool:
        code, out, _ = await run_to_end(self._cluster, ref, container,
                                        ["sh", "-c", presence_check(directory, digest)])
        return code == 0 and "present" in out.decode(errors="replace").split()

    async def _remove(self, ref: PodRef, container: str, directory: str) -> None:
        try:
            with anyio.fail_after(self._cleanup_timeout, shield=True):
                await run_to_end(self._cluster, ref, container, ["rm", "-rf", directory])
        except Exception as exc:
            command = (f"kubectl exec -n {ref.namespace} {ref.name} -c {container} -- "
                       f"rm -rf {directory}")
            log.warning("Could not remove %s from %s container %s (%s); remove it with: %s",
                        directory, ref, container, exc, command)
            self._leftovers.add(f"{directory} in {ref} container {container}", command)
