"""Auto mode: per target, the first mode (in registry order) whose assessment says yes.

Upload adds nothing to the pod and needs no image pull, so it comes first; its assessment
(shell, tar, root with CAP_NET_RAW, a bundle for the node) decides. A mode that cannot even be
prepared for a target (no bundle can be had on this client, an access review refused) says no
like any other, and auto moves on. The reason shown for each pod names the mode picked and why,
e.g. "upload: container app has tar and runs as root" or "ephemeral: container coredns has no
shell (sh)" (the reasons the earlier modes said no).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from multisniff.capture.model import Assessment, CaptureMode, CaptureSpec, RemoteCapture, Target
from multisniff.errors import MultisniffError, RefusedError

log = logging.getLogger(__name__)


class NoUsableMode(MultisniffError):
    """No mode can capture a target."""


def _clause(reason: str) -> str:
    """A mode's reason as a clause of a longer sentence: no full stop of its own (a refusal
    from the API server is a whole sentence)."""
    return reason.strip().rstrip(".")


async def assess(mode: CaptureMode, target: Target) -> Assessment:
    """`mode.assess(target)`, where any failure to prepare the mode becomes its "no, because".
    The assessment names the mode."""
    try:
        assessment = await mode.assess(target)
    except MultisniffError as exc:
        assessment = Assessment(False, _clause(str(exc)), refused=isinstance(exc, RefusedError))
    except Exception as exc:  # a mode's bug must not end every capture: it says no, and why
        log.debug("Assessing %s with mode %s failed", target.label, mode.name, exc_info=True)
        assessment = Assessment(False, f"it could not be assessed ({type(exc).__name__}: "
                                       f"{_clause(str(exc))})")
    if not assessment.mode:
        assessment = dataclasses.replace(assessment, mode=mode.name)
    return assessment


class AutoMode:
    """Tries its modes in order for each target and takes the first that can."""

    name = "auto"

    def __init__(self, *modes: CaptureMode) -> None:
        self.modes = modes
        self._choices: dict[tuple[str, str], tuple[CaptureMode | None, Assessment]] = {}

    async def choose(self, target: Target) -> tuple[CaptureMode | None, Assessment]:
        """The mode for this target (None when none can) and the assessment in words."""
        key = (target.pod.uid, target.container)
        if key in self._choices:
            return self._choices[key]
        refusals: list[Assessment] = []
        choice: tuple[CaptureMode | None, Assessment] | None = None
        for mode in self.modes:
            assessment = await assess(mode, target)
            if assessment.usable:
                # The first mode's own reason says why it can; a later one's, why those
                # before it could not.
                why = refusals[0].reason if refusals else assessment.reason
                if len(refusals) > 1:
                    why = "; ".join(f"{no.mode}: {_clause(no.reason)}" for no in refusals)
                choice = (mode, Assessment(True, f"{mode.name}: {_clause(why)}",
                                           assessment.creates, mode=mode.name))
                break
            refusals.append(assessment)
        if choice is None:
            choice = (None, Assessment(False, "; ".join(
                f"{no.mode}: {_clause(no.reason)}" for no in refusals) or "no capture mode",
                mode=self.name, refused=bool(refusals) and all(no.refused for no in refusals)))
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

    def exec_namespaces(self, namespaces: Sequence[str]) -> set[str]:
        return set().union(*(mode.exec_namespaces(namespaces) for mode in self.modes))

    async def aclose(self) -> None:
        """Each mode's session ends, also when an earlier one's cleanup failed."""
        for mode in self.modes:
            try:
                await mode.aclose()
            except Exception as exc:
                log.error("Ending the %s mode's session failed: %s", mode.name, exc)
