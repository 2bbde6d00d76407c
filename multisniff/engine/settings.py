"""What a capture does, in one frozen object, and everything derived from it.

`CaptureSettings` is the engine's own view of a capture: which pods, what to capture, the limits
and the tuning. A profile (`multisniff.profiles.Profile`) is these settings plus a description,
read from TOML; the engine never reads profiles itself. Values derived from several settings
(how long a remote tcpdump may live, how long the remote side may batch) are computed here and
only here, and `--dry-run`, the log and the README quote them from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

_S = TypeVar("_S", bound="CaptureSettings")


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """Every setting of a capture session. Defaults are the values without any profile."""

    labels: str = ""
    """Label selector, kubectl syntax (app=web,tier!=cache)."""
    field_selector: str = ""
    namespace: str | None = None
    """None: the kubeconfig context's namespace (else "default")."""
    all_namespaces: bool = False
    container: str | None = None
    """The container a pod is entered through (None: its first running one)."""
    interface: str = "any"
    filter: str = ""
    snaplen: int = 262144
    mode: str = "auto"
    """A capture mode's name (see `multisniff.capture.registry`), or auto."""
    ephemeral_image: str | None = None
    """Image with tcpdump for the ephemeral mode (None: the mode's default)."""
    agent_image: str | None = None
    """Image of the privileged mode's agent pods: sh, tar and head suffice (None: the mode's
    default)."""
    agent_namespace: str | None = None
    """Namespace of the privileged mode's agent pods (None: the node's first target's)."""
    allow_privileged: bool = False
    """Let auto use the privileged mode (a privileged pod per node) as its last resort."""
    duration: float | None = field(default=None, metadata={"positive": True})
    count: int | None = None
    max_size: int | None = field(default=None, metadata={"unit": "bytes"})
    """Bytes of packet data (captured lengths) in total."""
    follow: bool = True
    rotate_size: int | None = field(default=None, metadata={"unit": "bytes"})
    """Ring buffer (dumpcap -b filesize:): the next file begins once the current one has this
    many bytes."""
    rotate_every: float | None = field(default=None, metadata={"positive": True})
    """Ring buffer (dumpcap -b duration:): the next file begins after this many seconds."""
    keep_files: int | None = None
    """Ring buffer (dumpcap -b files:): only the newest this many files are kept."""
    events: bool = False
    """Write pod churn and the pods' captures starting and ending as events on the interface
    multisniff/events (marks are written whenever they are made)."""
    buffer_chunks: int = 64
    """Chunks of pcap held between the capture readers and the output, all targets together."""
    reorder_window: float = 2.0
    """Live output: seconds a packet is held so that later-arriving earlier packets fit in."""
    flush_interval: float = field(default=0.25, metadata={"positive": True})
    """Live output: how often the clock releases packets that idle pods would hold back."""
    max_pending: int = 100_000
    """Live output: packets held for reordering at most; older ones are written early."""
    flush_delay: float = 0.05
    """Seconds a packet may wait on the pod's side to go on with the next ones in one frame."""
    read_linger: float = 1.0
    """Seconds the client lets a pod's small frames gather before it reads them all in one go
    (frames that reached the client are safe from a crashing container; for live output at
    most an eighth of reorder_window)."""
    max_lifetime: float = field(default=3600.0, metadata={"positive": True})
    """Seconds a remote tcpdump may live when no --duration bounds it."""
    lifetime_margin: float = 60.0
    """Seconds added to --duration (and startup_timeout) for the remote tcpdump's own bound."""
    stop_grace: float = 15.0
    """Seconds allowed for stopping, draining and cleaning up before work is cut off."""
    startup_timeout: float = 120.0
    """--duration starts once the pods found at the start capture, or after this at most."""
    reconnect_timeout: float = field(default=120.0, metadata={"positive": True})
    """Seconds a capture whose exec stream broke (the API server or the kubelet restarted), and
    the pod watch, keep trying to reconnect before they give up."""

    @property
    def rotating(self) -> bool:
        """The output is a ring of files (rotate_size or rotate_every)."""
        return self.rotate_size is not None or self.rotate_every is not None

    def replace(self: _S, **changes: Any) -> _S:
        return dataclasses.replace(self, **changes)

    def settings(self) -> CaptureSettings:
        """These settings alone, as the engine takes them (a Profile drops its description)."""
        if type(self) is CaptureSettings:
            return self
        return CaptureSettings(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(CaptureSettings)})

    # --- derived values: computed here only ---------------------------------------------------

    @property
    def remote_lifetime(self) -> float:
        """Seconds a remote tcpdump lives at most, counted from its start: the watchdog's bound.
        With --duration, the duration timer may start up to startup_timeout after the first
        tcpdump, so the bound covers that too."""
        if self.duration is None or math.isinf(self.duration):
            return self.max_lifetime
        return self.duration + self.startup_timeout + self.lifetime_margin

    def remote_lifetime_text(self) -> str:
        """The remote bound and the settings it comes from, as one clause."""
        if self.duration is None or math.isinf(self.duration):
            return (f"{self.remote_lifetime:g} s (max_lifetime, as no --duration is given; a "
                    "profile may change it)")
        return (f"{self.remote_lifetime:g} s (--duration {self.duration:g} s plus "
                f"startup_timeout {self.startup_timeout:g} s plus lifetime_margin "
                f"{self.lifetime_margin:g} s)")

    def client_read_linger(self, *, live: bool) -> float:
        """Seconds a capture's reads wait for small frames to gather. Live output keeps it
        short: packets gathered longer would reach the reorder window late."""
        if live:
            return min(self.read_linger, self.reorder_window / 8)
        return self.read_linger

    def remote_flush_delay(self, *, live: bool) -> float:
        """Seconds the remote side may hold output. For live output at most a quarter of the
        reorder window: batches held longer would make the live output's packets late."""
        if live:
            return min(self.flush_delay, self.reorder_window / 4)
        return self.flush_delay
