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
import difflib
import os
import re
import sys
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multisniff.capture.registry import mode_names
from multisniff.engine.settings import CaptureSettings
from multisniff.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_PROFILES = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True, slots=True)
class Profile(CaptureSettings):
    """Capture settings with a name's worth of words: what `multisniff profiles` shows.
    Every key a profile may set is a field here; defaults are the values without a profile."""

    description: str = ""

    def settings(self, **overrides: Any) -> CaptureSettings:
        """The engine's settings: this profile, overridden by `overrides` (flags, API keywords)."""
        return CaptureSettings.settings(self.replace(**overrides) if overrides else self)


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


@dataclass(frozen=True, slots=True)
class _Key:
    """How a profile key is read, derived from its field in `Profile`."""

    kind: type
    """bool, str, int or float (float keys are seconds)."""
    positive: bool
    bytes: bool

    @property
    def toml_types(self) -> tuple[type, ...]:
        if self.kind is float:
            return (int, float, str)  # seconds, or a duration such as "30s"
        if self.bytes:
            return (int, str)  # bytes, or a size such as "10M"
        return (self.kind,)


def _keys() -> dict[str, _Key]:
    hints = typing.get_type_hints(Profile)
    keys = {}
    for item in dataclasses.fields(Profile):
        kinds = [t for t in typing.get_args(hints[item.name]) or (hints[item.name],)
                 if t is not type(None)]
        keys[item.name] = _Key(kind=kinds[0], positive=bool(item.metadata.get("positive")),
                               bytes=item.metadata.get("unit") == "bytes")
    return keys


KEYS = _keys()
"""Every key a profile may set, and how it is read: the fields of `Profile`, nothing kept apart."""


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=", re.MULTILINE)
    match = pattern.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line is not None else str(path)


def _unknown_key(key: str, where: str, path: Path) -> UsageError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return UsageError(f"{where}: unknown key {key!r} in profile {path.name}; {hint}the keys "
                      f"are {', '.join(sorted(KEYS))}.")


def profile_from_mapping(data: Mapping[str, Any], *, path: Path, text: str,
                         base: Profile | None = None) -> Profile:
    """Check every key and type, convert durations and sizes, and build the Profile."""
    changes: dict[str, Any] = {}
    for key, value in data.items():
        where = _where(path, text, key)
        if key in _REPLACED:
            raise UsageError(f"{where}: {key} was replaced by {_REPLACED[key]}; fix the profile "
                             f"{path.name}.")
        spec = KEYS.get(key)
        if spec is None:
            raise _unknown_key(key, where, path)
        types = spec.toml_types
        # bool is an int in Python; a profile saying `count = true` is still wrong.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(_TYPE_WORDS[t] for t in types)
            raise UsageError(f"{where}: {key} must be {wanted}, not {type(value).__name__} "
                             f"{value!r}; fix the profile {path.name}.")
        try:
            changes[key] = convert(key, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {key}: {exc}; fix the profile {path.name}.") from exc
    return (base or Profile()).replace(**changes)


def convert(key: str, value: Any) -> Any:
    """A profile key's value as the settings hold it; ValueError says what is wrong."""
    spec = KEYS[key]
    if spec.kind is float:
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
        if seconds < 0 or (spec.positive and seconds == 0):
            raise ValueError("must be more than 0 seconds" if spec.positive
                             else "must be a positive number of seconds")
        return seconds
    if spec.kind is int:
        number = parse_size(value) if isinstance(value, str) else value
        if number <= 0:
            raise ValueError("must be more than 0 bytes" if spec.bytes else "must be more than 0")
        return number
    if key == "mode" and value not in mode_names():
        raise ValueError(f"{value!r} is not a mode; use one of {', '.join(mode_names())}")
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
