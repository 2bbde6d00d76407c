"""Single-layer container images written as docker-archive tarballs, without Docker.

The test cluster has no registry and no image builder: containerd imports these files with
``ctr -n k8s.io images import FILE`` and pods use them with ``imagePullPolicy: Never``.
Everything written here is deterministic (sorted entries, mtime 0, owner root, no host user
names), so the same inputs give the same bytes, the same image ID, and nothing to re-import.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class _Entry:
    kind: str  # "file", "dir" or "symlink"
    mode: int
    data: bytes = b""
    target: str = ""


def _clean(path: str) -> str:
    """An archive member name: relative, normalised, never escaping the root."""
    norm = posixpath.normpath("/" + path.lstrip("/")).lstrip("/")
    if not norm or norm == ".":
        raise ValueError(f"{path!r} names the root itself, not something in it")
    return norm


@dataclass
class Layer:
    """The files of one image layer, kept in memory until written as a deterministic tar."""

    _entries: dict[str, _Entry] = field(default_factory=dict)

    def directory(self, path: str, *, mode: int = 0o755) -> None:
        name = _clean(path)
        existing = self._entries.get(name)
        if existing is not None and existing.kind != "dir":
            raise ValueError(f"{name} is already a {existing.kind} in this layer")
        self._parents(name)
        self._entries[name] = _Entry("dir", mode)

    def file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        name = _clean(path)
        self._parents(name)
        self._refuse_dir(name)
        self._entries[name] = _Entry("file", mode, data=data)

    def copy(self, path: str, source: Path, *, mode: int | None = None) -> None:
        """Add the contents of ``source`` (symlinks followed) as a regular file."""
        st = source.stat()
        self.file(path, source.read_bytes(), mode=(st.st_mode & 0o7777) if mode is None else mode)

    def symlink(self, path: str, target: str) -> None:
        name = _clean(path)
        self._parents(name)
        self._refuse_dir(name)
        self._entries[name] = _Entry("symlink", 0o777, target=target)

    def __contains__(self, path: str) -> bool:
        return _clean(path) in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _parents(self, name: str) -> None:
        parent = posixpath.dirname(name)
        while parent:
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = _Entry("dir", 0o755)
            elif existing.kind != "dir":
                raise ValueError(f"{parent} is a {existing.kind}, so {name} cannot be inside it")
            parent = posixpath.dirname(parent)

    def _refuse_dir(self, name: str) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing.kind == "dir":
            raise ValueError(f"{name} is already a directory in this layer")

    def tar(self) -> bytes:
        """The layer as an uncompressed tar; its sha256 is the image's diff_id."""
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self._entries):
                entry = self._entries[name]
                info = tarfile.TarInfo(name)
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = entry.mode
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry.target
                    tar.addfile(info)
                else:
                    info.size = len(entry.data)
                    tar.addfile(info, io.BytesIO(entry.data))
        return out.getvalue()


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config that the images here use."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (f"PATH={DEFAULT_PATH}",)
    working_dir: str = "/"
    labels: tuple[tuple[str, str], ...] = ()
    architecture: str = "amd64"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = 0o644
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Archive:
    data: bytes
    image_id: str
    """The sha256 of the image config, as containerd and crictl show it."""
    diff_id: str
    """The sha256 of the uncompressed layer tar."""


def docker_archive(
    reference: str, layer: Layer, config: ImageConfig, *, created_by: str
) -> Archive:
    """A docker-archive (``docker save`` format) tarball of a one-layer image.

    ``reference`` must be fully qualified (``registry/name:tag``): containerd would rewrite a
    short name to ``docker.io/library/...`` and the pod specs would no longer find it.
    """
    first = reference.split("/", 1)[0]
    if "/" not in reference or not ("." in first or ":" in first) or ":" not in reference:
        raise ValueError(f"{reference!r} is not a fully qualified name like multisniff.local/x:1")
    layer_tar = layer.tar()
    diff_id = hashlib.sha256(layer_tar).hexdigest()
    run_config: dict[str, object] = {"Env": list(config.env), "WorkingDir": config.working_dir}
    if config.entrypoint:
        run_config["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        run_config["Cmd"] = list(config.cmd)
    if config.labels:
        run_config["Labels"] = dict(config.labels)
    image_config: dict[str, object] = {
        "architecture": config.architecture,
        "os": "linux",
        "created": EPOCH,
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": EPOCH, "created_by": created_by}],
    }
    config_bytes = _json(image_config)
    image_id = hashlib.sha256(config_bytes).hexdigest()
    config_name = f"{image_id}.json"
    layer_name = f"{diff_id}/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": [layer_name]}]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, config_name, config_bytes)
        _tar_member(tar, layer_name, layer_tar)
        _tar_member(tar, "manifest.json", _json(manifest))
    return Archive(out.getvalue(), image_id, diff_id)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file, or all of the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
