"""Auto mode: per target, upload where the target container allows it, else ephemeral.

Upload adds nothing to the pod and needs no image pull, so it is preferred; its assessment
(shell, tar, root with CAP_NET_RAW) decides. The reason shown for each pod says which mode was
picked and why, e.g. "upload: container app has tar and runs as root" or
"ephemeral: container coredns has no shell (sh)".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from multisniff.capture.ephemeral import EphemeralMode
from multisniff.capture.model import Assessment, CaptureMode, CaptureSpec, RemoteCapture, Target
from multisniff.capture.upload import UploadMode
from multisniff.errors import MultisniffError


class NoUsableMode(MultisniffError):
    """Neither mode can capture a target."""


def _clause(reason: str) -> str:
    """A mode's reason as a clause of a longer sentence: no full stop of its own (a refusal
    from the API server is a whole sentence)."""
    return reason.strip().rstrip(".")


class AutoMode:
    """Picks upload or ephemeral for each target."""

    name = "auto"

    def __init__(self, upload: UploadMode, ephemeral: EphemeralMode) -> None:
        self._upload = upload
        self._ephemeral = ephemeral
        self._choices: dict[tuple[str, str], tuple[CaptureMode | None, Assessment]] = {}

    async def choose(self, target: Target) -> tuple[CaptureMode | None, Assessment]:
        """The mode for this target (None when neither can) and the assessment in words."""
        key = (target.pod.uid, target.container)
        if key in self._choices:
            return self._choices[key]
        choice: tuple[CaptureMode | None, Assessment]
        upload = await self._upload.assess(target)
        if upload.usable:
            choice = (self._upload, Assessment(True, f"upload: {_clause(upload.reason)}",
                                               upload.creates))
        else:
            ephemeral = await self._ephemeral.assess(target)
            if ephemeral.usable:
                choice = (self._ephemeral, Assessment(True, f"ephemeral: {_clause(upload.reason)}",
                                                      ephemeral.creates))
            else:
                choice = (None, Assessment(False, f"upload: {_clause(upload.reason)}; "
                                                  f"ephemeral: {_clause(ephemeral.reason)}"))
        self._choices[key] = choice
        return choice

    async def assess(self, target: Target) -> Assessment:
        return (await self.choose(target))[1]

    @asynccontextmanager
    async def open(self, target: Target, spec: CaptureSpec) -> AsyncIterator[RemoteCapture]:
        mode, assessment = await self.choose(target)
        if mode is None:
            raise NoUsableMode(f"Pod {target.label} cannot be captured: {assessment.reason}.")
        async with mode.open(target, spec) as capture:
            yield capture
