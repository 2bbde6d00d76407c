"""Auto mode's reasons read as one sentence even when a mode's own reason is a full sentence
(an API refusal ends with a full stop)."""

from __future__ import annotations

from typing import Any

import pytest

from multisniff.capture.auto import AutoMode, NoUsableMode
from multisniff.capture.model import Assessment, CaptureSpec, Target
from multisniff.kube.model import PodInfo, PodRef

REFUSAL = ("container app cannot be probed: You may not create pods/exec in namespace web "
           "(RBAC): ask for it, or use a kubeconfig that has it.")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class AssessedMode:
    """A capture mode that only assesses, with a fixed answer."""

    def __init__(self, name: str, assessment: Assessment) -> None:
        self.name = name
        self.assessment = assessment

    async def assess(self, target: Target) -> Assessment:
        return self.assessment


def auto(upload: Assessment, ephemeral: Assessment) -> Any:
    return AutoMode(AssessedMode("upload", upload),  # type: ignore[arg-type]
                    AssessedMode("ephemeral", ephemeral))  # type: ignore[arg-type]


def target() -> Target:
    return Target(PodInfo(ref=PodRef("web", "app-0"), uid="u1", phase="Running", node="n1",
                          ip="10.0.0.5"), "app")


@pytest.mark.anyio
async def test_two_refusals_join_without_a_stray_full_stop() -> None:
    mode = auto(Assessment(False, REFUSAL), Assessment(False, "you may not exec into pods."))
    assessment = await mode.assess(target())
    assert assessment.reason == (
        "upload: container app cannot be probed: You may not create pods/exec in namespace "
        "web (RBAC): ask for it, or use a kubeconfig that has it; ephemeral: you may not "
        "exec into pods")
    with pytest.raises(NoUsableMode) as caught:
        async with mode.open(target(), CaptureSpec()):
            pass
    assert str(caught.value).endswith("has it; ephemeral: you may not exec into pods.")
    assert ".;" not in str(caught.value) and ".." not in str(caught.value)


@pytest.mark.anyio
async def test_fallback_to_ephemeral_names_the_upload_reason_as_a_clause() -> None:
    mode = auto(Assessment(False, REFUSAL), Assessment(True, "may add one"))
    assessment = await mode.assess(target())
    assert assessment.usable
    assert assessment.reason.startswith("ephemeral: container app cannot be probed: You may")
    assert assessment.reason.endswith("a kubeconfig that has it")
