"""Upload mode against a FakeCluster whose exec runs locally: the real bundle, watchdog and
tcpdump unpack into a temporary directory and capture on this machine's loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import anyio
import pytest
from fakes import FakeCluster, make_pod

from multisniff.capture.bundlebuild import BUFFER_TIMEOUT_PATCH, tcpdump_patches
from multisniff.capture.bundlecache import bundle_for, host_arch
from multisniff.capture.execcapture import ExecCapture
from multisniff.capture.model import CaptureReport, CaptureSpec, Target
from multisniff.capture.upload import UploadMode, capture_command, handover_arguments

pytestmark = pytest.mark.skipif(
    shutil.which("tcpdump") is None or shutil.which("gcc") is None or os.geteuid() != 0,
    reason="needs tcpdump, gcc and root (captures on lo)",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("bundles")
    old = os.environ.get("MULTISNIFF_BUNDLES")
    os.environ["MULTISNIFF_BUNDLES"] = str(cache)
    bundle_for(host_arch())  # built once for the module
    yield cache
    if old is None:
        del os.environ["MULTISNIFF_BUNDLES"]
    else:
        os.environ["MULTISNIFF_BUNDLES"] = old


def _send_udp(port: int, count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(f"MSNF unit {i}".encode(), ("127.0.0.1", port))


async def stop_and_wait(capture: ExecCapture) -> CaptureReport:
    """Stop a capture, drain what it still sends, and return how it ended."""
    await capture.stop()
    with anyio.fail_after(20):
        while await capture.read():
            pass
    return await capture.wait()


def _no_process_runs(directory: Path) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return str(directory) not in ps


@pytest.mark.anyio
async def test_assess_says_why_the_local_container_is_usable(tmp_path: Path) -> None:
    mode = UploadMode(FakeCluster(), directory=str(tmp_path))
    target = Target(make_pod(), "app")

    assessment = await mode.assess(target)

    assert assessment.usable, assessment.reason
    assert assessment.reason == "container app has tar and runs as root"


@pytest.mark.anyio
async def test_assess_names_a_missing_tool(tmp_path: Path) -> None:
    # The probe runs with a PATH where only sh exists.
    shbin = tmp_path / "bin"
    shbin.mkdir()
    (shbin / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    cluster = FakeCluster(rewrite=lambda pod, c, argv: ["env", f"PATH={shbin}", *argv])
    mode = UploadMode(cluster, directory=str(tmp_path))

    assessment = await mode.assess(Target(make_pod(), "app"))

    assert not assessment.usable
    assert assessment.reason == "container app has no tar, head, mkdir, mv, rm"


@pytest.mark.anyio
async def test_capture_counts_packets_skips_a_second_upload_and_cleans_up(
        tmp_path: Path, bundle_cache: Path) -> None:
    cluster = FakeCluster()
    mode = UploadMode(cluster, directory=str(tmp_path))
    target = Target(make_pod(), "app")
    port = 47000 + os.getpid() % 1000
    spec = CaptureSpec(interface="lo", bpf_filter=f"udp port {port}", packet_count=5,
                       lifetime=30)

    async with mode.open(target, spec) as first:
        uploaded = mode.bytes_uploaded
        bundle_dirs = list(tmp_path.glob(".multisniff-*"))
        assert len(bundle_dirs) == 1
        # A second capture while the first runs finds the bundle and sends nothing.
        async with mode.open(target, CaptureSpec(interface="lo", bpf_filter="tcp port 9",
                                                 lifetime=30)) as second:
            assert mode.bytes_uploaded == uploaded
            await anyio.sleep(1)  # tcpdump opens the device
            await anyio.to_thread.run_sync(_send_udp, port, 5)
            pcap = bytearray()
            with anyio.fail_after(20):
                while chunk := await first.read():
                    pcap += chunk
            report = await first.wait()
            second_report = await stop_and_wait(second)

    assert report.exit_code == 0, report.message
    assert report.captured == 5
    assert pcap[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    assert pcap.count(b"MSNF unit") == 5
    assert second_report.exit_code == 0 and second_report.captured == 0
    assert uploaded == len(bundle_for(host_arch()).targz)
    with anyio.fail_after(10):
        while list(tmp_path.glob(".multisniff-*")) or not _no_process_runs(tmp_path):
            await anyio.sleep(0.1)


@pytest.mark.anyio
async def test_after_the_probe_one_exec_uploads_and_captures(tmp_path: Path,
                                                             bundle_cache: Path) -> None:
    # Each exec is a TLS connection: probe, then one exec that unpacks and captures.
    cluster = FakeCluster()
    mode = UploadMode(cluster, directory=str(tmp_path))
    target = Target(make_pod(), "app")

    assert (await mode.assess(target)).usable
    async with mode.open(target, CaptureSpec(interface="lo", bpf_filter="tcp port 9",
                                             lifetime=30, read_linger=0.75)) as capture:
        await anyio.sleep(1)  # tcpdump opens the device
        assert len(list(tmp_path.glob(".multisniff-*/msnf-watchdog"))) == 1
        report = await stop_and_wait(capture)

    assert report.exit_code == 0, report.message
    assert len(cluster.execs) == 2
    # the capture's reads gather as the spec says; the probe is a short command that does not
    assert [record.linger for record in cluster.execs] == [None, 0.75]
    assert mode.bytes_uploaded == len(bundle_for(host_arch()).targz)


@pytest.mark.anyio
async def test_stop_without_half_close_signals_the_watchdog(tmp_path: Path,
                                                            bundle_cache: Path) -> None:
    cluster = FakeCluster(can_close_stdin=False)
    mode = UploadMode(cluster, directory=str(tmp_path))
    target = Target(make_pod(), "app")

    async with mode.open(target, CaptureSpec(interface="lo", bpf_filter="tcp port 9",
                                             lifetime=30)) as capture:
        await anyio.sleep(1)
        report = await stop_and_wait(capture)

    assert report.exit_code == 0, report.message
    assert report.captured == 0
    assert any("kill -INT" in " ".join(e.command) for e in cluster.execs)


def test_the_capture_command_runs_tcpdump_under_the_watchdog(bundle_cache: Path) -> None:
    bundle = bundle_for(host_arch())
    d = "/tmp/.multisniff-0123456789ab"
    spec = CaptureSpec(interface="eth0", bpf_filter="udp", lifetime=60, packet_count=3)
    argv = capture_command(bundle, d, spec)
    handover = handover_arguments(
        spec, buffer_timeout=BUFFER_TIMEOUT_PATCH in tcpdump_patches(bundle))

    assert argv[:7] == [f"{d}/msnf-watchdog", "--lifetime", "60", "--batch", "0.05",
                        "--remove", d]
    assert argv[7] == "--"
    assert argv[8:11] == [f"{d}/{bundle.loader}", "--library-path", f"{d}/lib"]
    assert argv[11:] == [f"{d}/tcpdump", "-Z", "root", "-U", "--time-stamp-precision=nano",
                         *handover, "-w", "-", "-i", "eth0", "-s", "262144", "-c", "3", "udp"]
