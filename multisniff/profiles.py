"""Capture profiles: TOML files of settings -> one frozen `Profile`, with no global settings.

A profile names what to capture and how (selector, filter, limits, buffer sizes). It is looked
up by name in ./configs, then in the user's ~/.config/multisniff/profiles (XDG_CONFIG_HOME is
honoured), then among the profiles shipped in the package (multisniff/configs, package data);
a NAME containing a slash or ending in .toml is a path. Command-line flags override what the
profile says. A key that is unknown or has the wrong type is a usage error that names the file,
the key and its line (tomllib gives no positions, so the line is found by scanning the file).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multisniff.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_PROFILES = Path(__file__).resolve().parent / "configs"
MODES = ("auto", "upload", "ephemeral")


@dataclass(frozen=True, slots=True)
class Profile:
    """Every setting of a capture session. Defaults are the values without any profile."""

    description: str = ""
    labels: str = ""
    field_selector: str = ""
    namespace: str | None = None
    """None: the kubeconfig context's namespace (else "default")."""
    all_namespaces: bool = False
    container: str | None = None
    interface: str = "any"
    filter: str = ""
    snaplen: int = 262144
    mode: str = "auto"
    ephemeral_image: str | None = None
    """Image with tcpdump for the ephemeral mode (None: the mode's default)."""
    duration: float | None = None
    count: int | None = None
    max_size: int | None = None
    """Bytes of packet data (captured lengths) in total."""
    follow: bool = True
    buffer_chunks: int = 64
    """Chunks of pcap held between the capture readers and the output, all targets together."""
    reorder_window: float = 2.0
    """Live output: seconds a packet is held so that later-arriving earlier packets fit in."""
    flush_interval: float = 0.25
    """Live output: how often the clock releases packets that idle pods would hold back."""
    max_pending: int = 100_000
    """Live output: packets held for reordering at most; older ones are written early."""
    flush_delay: float = 0.05
    """Seconds a packet may wait on the pod's side to go on with the next ones in one frame."""
    max_lifetime: float = 3600.0
    """Seconds a remote tcpdump may live when no --duration bounds it."""
    lifetime_margin: float = 60.0
    """Seconds added to --duration for the remote tcpdump's own bound."""
    stop_grace: float = 15.0
    """Seconds allowed for stopping, draining and cleaning up before work is cut off."""
    startup_timeout: float = 120.0
    """--duration starts once the pods found at the start capture, or after this at most."""

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "description": (str,),
    "labels": (str,),
    "field_selector": (str,),
    "namespace": (str,),
    "all_namespaces": (bool,),
    "container": (str,),
    "interface": (str,),
    "filter": (str,),
    "snaplen": (int,),
    "mode": (str,),
    "ephemeral_image": (str,),
    "duration": (int, float, str),
    "count": (int,),
    "max_size": (int, str),
    "follow": (bool,),
    "buffer_chunks": (int,),
    "reorder_window": (int, float),
    "flush_interval": (int, float),
    "max_pending": (int,),
    "flush_delay": (int, float),
    "max_lifetime": (int, float, str),
    "lifetime_margin": (int, float),
    "stop_grace": (int, float),
    "startup_timeout": (int, float),
}

_REPLACED = {
    "batch_interval": "flush_delay, the seconds a packet may wait on the pod's side (0.05 by "
                      "default; packets waiting longer die with a crashing container)",
}

_TYPE_WORDS = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """"30", "30s", "500ms", "5m", "1h" -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; write e.g. 30s, 5m or 1h")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) * unit


def parse_size(text: str) -> int:
    """"1000", "10k", "10KiB", "5M", "2G" -> bytes (k/M/G are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 500k, 10M or 1G")
    unit = (match.group(2) or "b")[0].lower()
    factor = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(match.group(1)) * factor)


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=", re.MULTILINE)
    match = pattern.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line is not None else str(path)


def profile_from_mapping(data: Mapping[str, Any], *, path: Path, text: str,
                         base: Profile | None = None) -> Profile:
    """Check every key and type, convert durations and sizes, and build the Profile."""
    changes: dict[str, Any] = {}
    for key, value in data.items():
        where = _where(path, text, key)
        types = _KEY_TYPES.get(key)
        if key in _REPLACED:
            raise UsageError(f"{where}: {key} was replaced by {_REPLACED[key]}; fix the profile "
                             f"{path.name}.")
        if types is None:
            known = ", ".join(sorted(_KEY_TYPES))
            raise UsageError(f"{where}: unknown key {key!r} in profile {path.name}; "
                             f"the keys are {known}.")
        # bool is an int in Python; a profile saying `count = true` is still wrong.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(_TYPE_WORDS[t] for t in types)
            raise UsageError(f"{where}: {key} must be {wanted}, not {type(value).__name__} "
                             f"{value!r}; fix the profile {path.name}.")
        try:
            changes[key] = _convert(key, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {key}: {exc}; fix the profile {path.name}.") from exc
    return (base or Profile()).replace(**changes)


def _convert(key: str, value: Any) -> Any:
    if key in ("duration", "max_lifetime"):
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
        if seconds <= 0:
            raise ValueError("must be more than 0 seconds")
        return seconds
    if key == "max_size":
        size = parse_size(value) if isinstance(value, str) else value
        if size <= 0:
            raise ValueError("must be more than 0 bytes")
        return size
    if key == "mode" and value not in MODES:
        raise ValueError(f"{value!r} is not a mode; use one of {', '.join(MODES)}")
    if key in ("snaplen", "count", "buffer_chunks", "max_pending") and value <= 0:
        raise ValueError("must be more than 0")
    if key in ("reorder_window", "flush_interval", "lifetime_margin", "stop_grace",
               "startup_timeout", "flush_delay"):
        if value < 0 or (key == "flush_interval" and value == 0):
            raise ValueError("must be a positive number of seconds")
        return float(value)
    return value


def load_profile(path: Path, *, base: Profile | None = None) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise UsageError(f"Cannot read profile {path}: {reason}; check the path.") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}); fix the profile.") from exc
    return profile_from_mapping(data, path=path, text=text, base=base)


def search_dirs() -> list[Path]:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path("configs"), Path(config_home) / "multisniff" / "profiles", PACKAGE_PROFILES]


def available() -> Iterator[tuple[str, Path]]:
    """(name, path) of every profile found, the first of each name winning."""
    seen: set[str] = set()
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            if path.stem not in seen:
                seen.add(path.stem)
                yield path.stem, path


def find_profile(name: str) -> Path:
    if "/" in name or name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"Profile file {name} does not exist; check the path.")
        return path
    for found, path in available():
        if found == name:
            return path
    names = ", ".join(sorted(found for found, _ in available())) or "none"
    places = ", ".join(str(d) for d in search_dirs())
    raise UsageError(f"No profile named {name!r}; the profiles found are {names} (searched "
                     f"{places}).")


def resolve(name: str | None) -> tuple[Profile, Path | None]:
    """The profile `name` (or the defaults for None) and the file it came from."""
    if name is None:
        return Profile(), None
    path = find_profile(name)
    return load_profile(path), path


def describe(profile: Profile) -> dict[str, Any]:
    """The resolved settings as plain data, for `profiles show`."""
    return dataclasses.asdict(profile)
