"""The Python API, `multisniff.capture(...)`, with fakes of our own interfaces: started and
awaited from a test, ready(), stop(), pods, outputs of every kind, the result after an error,
the blocking wrapper, and the mode's session ending once on every way out."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from enginefakes import FakeCapture, FakeMode, registered
from fakes import FakeCluster, make_pod

import multisniff
from multisniff import api
from multisniff.capture.model import Target
from multisniff.engine.session import NothingMatches
from multisniff.errors import ExitCode, MultisniffError, OutputError, UsageError
from multisniff.pcap.reading import CaptureReader, packet_fields

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cluster_with(*names: str) -> FakeCluster:
    cluster = FakeCluster()
    for i, name in enumerate(names):
        cluster.add_pod(make_pod(name, namespace="shop", labels={"app": "web"},
                                 ip=f"10.1.0.{i + 10}"))
    return cluster


@pytest.fixture
def mode() -> Iterator[FakeMode]:
    def make(target: Target) -> FakeCapture:
        return FakeCapture(name=target.pod.ref.name, total=20, interval=0.01, forever=True)

    with registered(FakeMode(make=make)) as fake:
        yield fake


def packets_by_interface(data: bytes) -> dict[str, int]:
    reader = CaptureReader()
    batch = reader.feed(data)
    assert reader.finish() is None
    names = [info.name or "" for info in reader.interfaces]
    counts: dict[str, int] = {}
    for packet in batch.packets:
        name = names[packet_fields(packet)[0]]
        counts[name] = counts.get(name, 0) + 1
    return counts


async def test_a_capture_started_readied_stopped_and_awaited(tmp_path: Path,
                                                              mode: FakeMode) -> None:
    out = tmp_path / "web.pcapng"
    async with multisniff.capture("app=web", namespace="shop", output=out, mode="fake",
                                  cluster=cluster_with("web-a", "web-b")) as cap:
        with anyio.fail_after(10):
            await cap.ready(timeout=5)
        assert sorted(run.label for run in cap.pods) == ["shop/web-a", "shop/web-b"]
        assert {run.state for run in cap.pods} == {"capturing"}
        await anyio.sleep(0.2)
        cap.stop("enough for the test")
        result = await cap.wait()
    assert cap.result is result
    assert result.exit_code == ExitCode.OK
    assert result.stop_reason == "enough for the test"
    assert {run.state for run in result.runs} == {"done"}
    counts = packets_by_interface(out.read_bytes())
    assert counts == {run.label: run.packets for run in result.runs}
    assert all(count > 0 for count in counts.values())
    assert mode.sessions_closed == 1
    assert all(capture.closed for capture in mode.opened)


async def test_leaving_the_block_stops_the_capture_and_keeps_its_packets(
        mode: FakeMode) -> None:
    sink = io.BytesIO()
    async with multisniff.capture("app=web", namespace="shop", output=sink, mode="fake",
                                  cluster=cluster_with("web-a")) as cap:
        await cap.ready(timeout=5)
        await anyio.sleep(0.2)
    assert cap.result.stop_reason == "the capture's block ended"
    assert cap.result.exit_code == ExitCode.OK
    written = packets_by_interface(sink.getvalue())
    assert written == {"shop/web-a": cap.result.runs[0].packets}
    assert mode.sessions_closed == 1


async def test_an_async_writer_gets_the_live_stream(mode: FakeMode) -> None:
    class Writer:
        def __init__(self) -> None:
            self.data = bytearray()

        async def write(self, data: bytes) -> None:
            self.data += data

    writer = Writer()
    async with multisniff.capture("app=web", namespace="shop", output=writer, mode="fake",
                                  cluster=cluster_with("web-a", "web-b"), duration=0.3) as cap:
        result = await cap.wait()
    assert result.stop_reason == "--duration 0.3s reached"
    assert packets_by_interface(bytes(writer.data)) == {
        run.label: run.packets for run in result.runs}


async def test_keywords_are_profile_keys_and_override_the_profile(mode: FakeMode,
                                                                  tmp_path: Path) -> None:
    cap = multisniff.capture("app=web", namespace="shop", output=tmp_path / "o",
                             profile="dns", mode="fake", duration="2m", snaplen=96)
    assert cap.settings.filter == "port 53"  # from the dns profile
    assert cap.settings.duration == 120 and cap.settings.snaplen == 96
    assert cap.settings.labels == "app=web"
    with pytest.raises(TypeError, match="unexpected keyword argument 'durration'"):
        multisniff.capture("app=web", output="x", durration=3)
    with pytest.raises(UsageError, match="duration: 'soon' is not a duration"):
        multisniff.capture("app=web", output="x", duration="soon")
    with pytest.raises(UsageError, match="Say where the capture goes"):
        multisniff.capture("app=web")
    with pytest.raises(UsageError, match="Say which pods to capture"):
        multisniff.capture(output="x")


async def test_an_error_before_the_start_raises_and_leaves_a_result(tmp_path: Path,
                                                                    mode: FakeMode) -> None:
    cap = multisniff.capture("app=nothing", namespace="shop", output=tmp_path / "o",
                             mode="fake", follow=False, cluster=cluster_with("web-a"))
    with pytest.raises(NothingMatches, match="No pod in namespace shop matches app=nothing"):
        async with cap:
            pytest.fail("the block must not run")
    assert cap.done
    assert cap.result.exit_code == ExitCode.NOTHING
    assert "No pod in namespace shop matches app=nothing" in cap.result.error
    assert cap.result.runs == []
    assert mode.sessions_closed == 1


async def test_an_error_during_the_capture_raises_at_the_end_and_leaves_a_result(
        mode: FakeMode) -> None:
    class FullDisk:
        async def write(self, data: bytes) -> None:
            raise OutputError("Cannot write the disk: no space left on device; free space.")

    cap = multisniff.capture("app=web", namespace="shop", output=FullDisk(), mode="fake",
                             cluster=cluster_with("web-a"))
    with pytest.raises(MultisniffError):
        async with cap:
            with anyio.fail_after(10):
                await cap.wait()
    assert cap.result.error.startswith("Cannot write the disk")
    assert cap.result.exit_code == ExitCode.NOTHING
    assert mode.sessions_closed == 1


async def test_ready_times_out_naming_the_pods_still_starting(tmp_path: Path,
                                                              mode: FakeMode) -> None:
    mode.open_delay["web-b"] = 30
    async with multisniff.capture("app=web", namespace="shop", output=tmp_path / "o",
                                  mode="fake", cluster=cluster_with("web-a", "web-b"),
                                  stop_grace=1) as cap:
        with pytest.raises(api.NotReady, match=r"1 pod had no tcpdump listening after 0.3 s: "
                                               r"shop/web-b"):
            await cap.ready(timeout=0.3)
        cap.stop("test over")
    assert cap.result.stop_reason == "test over"


async def test_cancelling_the_caller_still_ends_the_mode_and_writes_the_file(
        tmp_path: Path, mode: FakeMode) -> None:
    out = tmp_path / "o.pcapng"
    with anyio.move_on_after(0.5):
        async with multisniff.capture("app=web", namespace="shop", output=out, mode="fake",
                                      cluster=cluster_with("web-a")):
            await anyio.sleep_forever()
    assert mode.sessions_closed == 1
    assert all(capture.closed for capture in mode.opened)
    assert sum(packets_by_interface(out.read_bytes()).values()) > 0


def test_the_blocking_wrapper_for_plain_scripts(tmp_path: Path, mode: FakeMode) -> None:
    out = tmp_path / "o.pcapng"
    result = multisniff.run_capture("app=web", namespace="shop", output=out, mode="fake",
                                    cluster=cluster_with("web-a"), duration=0.3)
    assert result.exit_code == ExitCode.OK
    assert packets_by_interface(out.read_bytes()) == {"shop/web-a": result.runs[0].packets}


def test_the_public_names() -> None:
    for name in multisniff.__all__:
        assert getattr(multisniff, name) is not None, name
    assert callable(multisniff.capture)
    # The capture modes' subpackage shares the name and is still reachable through it.
    from multisniff.capture.upload import UploadMode

    assert multisniff.capture.upload.UploadMode is UploadMode
    assert "upload" in multisniff.mode_names() and multisniff.mode_names()[0] == "auto"


def test_the_modes_named_everywhere_come_from_the_registry(
        capsys: pytest.CaptureFixture[str]) -> None:
    from multisniff import cli
    from multisniff.capture import registry

    names = registry.mode_names()
    assert names == multisniff.mode_names()
    parser = cli.build_capture_parser()
    help_text = parser.format_help()
    assert "{" + ",".join(names) + "}" in help_text
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("### Capture modes"):readme.index("### Profiles")]
    for name in names:
        assert f"| `{name}`" in table, name
    for entry in registry.entries():
        assert entry.summary
    with pytest.raises(UsageError, match="is not a mode; use one of auto, upload, ephemeral"):
        api.settings_for(labels="app=web", mode="sideways")
