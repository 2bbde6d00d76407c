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


class UnpreparedMode(AssessedMode):
    """A mode that cannot even be prepared here (no bundle for the node on this client)."""

    async def assess(self, target: Target) -> Assessment:
        from multisniff.capture.bundlecache import BundleUnavailable

        raise BundleUnavailable("gcc could not build the watchdog for amd64 nodes: gcc is not "
                                "installed; install gcc, or use --mode ephemeral.")


@pytest.mark.anyio
async def test_a_mode_that_cannot_be_prepared_says_no_and_auto_moves_on() -> None:
    mode = AutoMode(UnpreparedMode("upload", Assessment(True, "")),  # type: ignore[arg-type]
                    AssessedMode("ephemeral", Assessment(True, "may add one")))  # type: ignore[arg-type]
    assessment = await mode.assess(target())
    assert assessment.usable and assessment.mode == "ephemeral"
    assert assessment.reason == ("ephemeral: gcc could not build the watchdog for amd64 "
                                 "nodes: gcc is not installed; install gcc, or use --mode "
                                 "ephemeral")


@pytest.mark.anyio
async def test_auto_tries_its_modes_in_order_and_names_each_refusal() -> None:
    mode = AutoMode(AssessedMode("a", Assessment(False, "no shell.")),  # type: ignore[arg-type]
                    AssessedMode("b", Assessment(False, "no rights")),  # type: ignore[arg-type]
                    AssessedMode("c", Assessment(True, "yes")))  # type: ignore[arg-type]
    assessment = await mode.assess(target())
    assert assessment.mode == "c"
    assert assessment.reason == "c: a: no shell; b: no rights"
    nothing = AutoMode(AssessedMode("a", Assessment(False, "no shell.")))  # type: ignore[arg-type]
    refused = await nothing.assess(target())
    assert not refused.usable and refused.reason == "a: no shell"


@pytest.mark.anyio
async def test_a_single_mode_that_cannot_be_prepared_is_a_refusal_not_a_crash() -> None:
    from multisniff.capture.auto import assess

    assessment = await assess(UnpreparedMode("upload", Assessment(True, "")),  # type: ignore[arg-type]
                              target())
    assert not assessment.usable and assessment.mode == "upload"
    assert assessment.reason.startswith("gcc could not build the watchdog")
