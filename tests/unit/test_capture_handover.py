"""How the upload mode's tcpdump hands packets over, chosen by what the bundle's manifest says
its tcpdump was built with: a short buffer timeout where it has multisniff's patch, immediate
mode where it does not (Debian's binary packages, or a bundle made before the patch)."""

from __future__ import annotations

import fnmatch
import re

import pytest

from multisniff.capture.bundle import Bundle
from multisniff.capture.bundlebuild import BUFFER_TIMEOUT_PATCH, TCPDUMP_PATCHES, tcpdump_patches
from multisniff.capture.cleanup import search_script
from multisniff.capture.model import CaptureSpec
from multisniff.capture.upload import (
    MAX_BUFFER_TIMEOUT_MS,
    MIN_BUFFER_TIMEOUT_MS,
    buffer_timeout_ms,
    capture_arguments,
    capture_command,
)

DIRECTORY = "/tmp/.multisniff-0123456789ab"
SOURCE_RECIPE = {"recipe": "debian-source", "tcpdump": "4.99.3-1",
                 "tcpdump_patches": {BUFFER_TIMEOUT_PATCH: "0" * 64}}


def bundle_with(notes: dict[str, object]) -> Bundle:
    return Bundle(manifest={"format": 1, "digest": "0" * 64, "loader": "lib/ld.so",
                            "programs": {"tcpdump": {}}, **notes},
                  digest="0" * 64, loader="lib/ld.so", programs=("tcpdump",))


def tcpdump_argv(bundle: Bundle, spec: CaptureSpec) -> list[str]:
    argv = capture_command(bundle, DIRECTORY, spec)
    return argv[argv.index(f"{DIRECTORY}/tcpdump"):]


def test_a_patched_tcpdump_hands_blocks_over_after_half_the_flush_delay() -> None:
    argv = tcpdump_argv(bundle_with({"built_from": SOURCE_RECIPE}),
                        CaptureSpec(interface="any", flush_delay=0.05))

    assert argv[:5] == [f"{DIRECTORY}/tcpdump", "-Z", "root", "-U",
                        "--time-stamp-precision=nano"]
    assert argv[5:8] == ["--buffer-timeout=25", "-B", "8192"]
    assert "--immediate-mode" not in argv


@pytest.mark.parametrize("notes", [
    {"built_from": {"recipe": "debian-packages"}},
    {"built_from": {"recipe": "debian-source", "tcpdump": "4.99.3-1"}},  # before the patch
    {"built_from": {"recipe": "debian-source", "tcpdump_patches": {"another": "0" * 64}}},
    {"built_from": {"recipe": "debian-source", "tcpdump_patches": [BUFFER_TIMEOUT_PATCH]}},
    {},  # imported from a build that recorded nothing
])
def test_a_tcpdump_without_the_patch_runs_in_immediate_mode(notes: dict[str, object]) -> None:
    argv = tcpdump_argv(bundle_with(notes), CaptureSpec(flush_delay=0.05))

    assert argv[5:8] == ["--immediate-mode", "-B", "8192"]
    assert not any(a.startswith("--buffer-timeout") for a in argv)


def test_no_flush_delay_asks_for_immediate_mode_even_with_the_patch() -> None:
    argv = tcpdump_argv(bundle_with({"built_from": SOURCE_RECIPE}), CaptureSpec(flush_delay=0))

    assert argv[5:8] == ["--immediate-mode", "-B", "8192"]


@pytest.mark.parametrize(("flush_delay", "expected"), [
    (0.05, 25), (1.0, 500), (0.03, 15), (0.001, MIN_BUFFER_TIMEOUT_MS),
    (2.0, MAX_BUFFER_TIMEOUT_MS), (60.0, MAX_BUFFER_TIMEOUT_MS),
])
def test_the_buffer_timeout_is_half_the_flush_delay_within_bounds(
        flush_delay: float, expected: int) -> None:
    assert buffer_timeout_ms(flush_delay) == expected
    argv = tcpdump_argv(bundle_with({"built_from": SOURCE_RECIPE}),
                        CaptureSpec(flush_delay=flush_delay))
    assert f"--buffer-timeout={expected}" in argv


def test_the_manifest_names_the_patches_it_was_built_with() -> None:
    assert tcpdump_patches(bundle_with({"built_from": SOURCE_RECIPE})) == {BUFFER_TIMEOUT_PATCH}
    assert tcpdump_patches(bundle_with({"built_from": {"recipe": "debian-packages"}})) == set()
    assert tcpdump_patches(bundle_with({"built_from": "debian-source"})) == set()
    assert tcpdump_patches(bundle_with({})) == set()
    assert set(TCPDUMP_PATCHES) == {BUFFER_TIMEOUT_PATCH}
    assert TCPDUMP_PATCHES[BUFFER_TIMEOUT_PATCH].read_text().count("+++ b/tcpdump.c") == 1


def test_modes_whose_tcpdump_outlives_the_target_keep_the_kernels_blocks() -> None:
    # The ephemeral and privileged modes' tcpdumps survive the target: no handover options.
    argv = capture_arguments(CaptureSpec(interface="any"))

    assert argv[:2] == ["-U", "--time-stamp-precision=nano"]
    assert "--immediate-mode" not in argv
    assert not any(a.startswith("--buffer-timeout") or a == "-B" for a in argv)


@pytest.mark.parametrize("notes", [{"built_from": SOURCE_RECIPE}, {}])
def test_cleanup_knows_the_upload_modes_tcpdump_by_its_arguments(
        notes: dict[str, object]) -> None:
    patterns = re.findall(r"(\*[^)]*tcpdump[^)]*)\)", search_script(remove=False))
    # What a shell reads from /proc/PID/cmdline: the arguments run together, NULs dropped.
    cmdline = "".join(tcpdump_argv(bundle_with(notes), CaptureSpec()))

    assert patterns
    assert any(fnmatch.fnmatchcase(cmdline, p) for p in patterns), (cmdline, patterns)
