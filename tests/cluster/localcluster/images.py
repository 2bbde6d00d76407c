"""Container images: built by tests/cluster/images/build, imported into our containerd on up.

The builder writes docker-archive tarballs and ``index.json`` (reference -> tarball) into
``$MULTISNIFF_CACHE/images``. containerd's root is wiped on every down, so every up imports them
all before the kubelet starts; no image can ever be pulled (see processes.NO_REGISTRY_ENV).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .layout import Layout


class ImageError(Exception):
    pass


def index(layout: Layout) -> dict[str, Path]:
    try:
        entries = json.loads((layout.images_dir / "index.json").read_text())
    except FileNotFoundError:
        return {}
    return {ref: Path(tarball) for ref, tarball in entries.items()}


def import_all(layout: Layout) -> list[str]:
    refs = index(layout)
    missing = [str(t) for t in refs.values() if not t.exists()]
    if missing:
        raise ImageError(f"index.json names tarballs that are gone: {', '.join(missing)}; "
                         "run tests/cluster/clusterctl build.")
    ctr = ["ctr", "--address", str(layout.containerd_socket), "-n", "k8s.io"]
    for ref, tarball in sorted(refs.items()):
        result = subprocess.run([*ctr, "images", "import", str(tarball)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ImageError(f"ctr could not import {tarball} ({ref}): {result.stderr.strip()}")
    listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True,
                            check=True).stdout.split()
    absent = [r for r in refs if r not in listed]
    if absent:
        raise ImageError(f"after import, containerd does not list {', '.join(absent)}; "
                         f"it lists {', '.join(listed)}.")
    return sorted(refs)
