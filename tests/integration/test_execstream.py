"""Exec streams against the real cluster: bytes intact, exit codes, stderr apart, stdin EOF,
backpressure that bounds our memory, and the refusal sentence for a user without pods/exec."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from kubenamespace import run_sleeper, throwaway_namespace

from multisniff.errors import RefusedError
from multisniff.kube.api import connect
from multisniff.kube.model import PodRef

pytestmark = pytest.mark.cluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def shell(cluster) -> Iterator[PodRef]:  # type: ignore[no-untyped-def]
    with throwaway_namespace(cluster, "msx-exec") as namespace:
        run_sleeper(cluster, namespace)
        yield PodRef(namespace, "shell")


async def run(kubeconfig: Path, pod: PodRef, command: list[str], stdin: bytes | None = None,
              ) -> tuple[bytes, bytes, int | None, str, bool]:
    """stdout, stderr, exit code, message, and whether stdin could be closed."""
    out, err = bytearray(), bytearray()
    closed = False
    async with connect(str(kubeconfig)) as kube, kube.exec(
            pod, "main", command, stdin=stdin is not None, on_stderr=err.extend) as channel:
        async def feed() -> None:
            nonlocal closed
            assert stdin is not None
            await channel.write(stdin)
            closed = await channel.close_stdin()

        async with anyio.create_task_group() as tg:
            if stdin is not None:
                tg.start_soon(feed)
            while chunk := await channel.read():
                out += chunk
        result = await channel.wait()
    return bytes(out), bytes(err), result.exit_code, result.message, closed


@pytest.mark.anyio
async def test_every_byte_value_survives_several_megabytes_through_cat(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    payload = bytes(range(256)) * 8192 + os.urandom(2 << 20)  # 4 MiB
    # `; true`: containerd cuts stdin short when the exec process itself reads it (#13934).
    out, err, code, _, closed = await run(cluster.kubeconfig, shell, ["sh", "-c", "cat; true"],
                                          stdin=payload)

    assert closed, "the server did not offer v5.channel.k8s.io"
    assert len(out) == len(payload)
    assert out == payload
    assert (err, code) == (b"", 0)


@pytest.mark.anyio
async def test_closing_stdin_gives_the_process_eof(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    out, _, code, _, _ = await run(cluster.kubeconfig, shell,
                                   ["sh", "-c", "wc -c; echo eof-seen"], stdin=b"12345")

    assert out.split() == [b"5", b"eof-seen"]
    assert code == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("script", "expected"), [("true", 0), ("exit 3", 3), ("exit 255", 255)])
async def test_exit_codes(cluster, shell, script: str, expected: int) -> None:  # type: ignore[no-untyped-def]
    _, _, code, _, _ = await run(cluster.kubeconfig, shell, ["sh", "-c", script])

    assert code == expected


@pytest.mark.anyio
async def test_a_missing_command_has_no_exit_code_but_the_servers_reason(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    _, _, code, message, _ = await run(cluster.kubeconfig, shell, ["/no/such/binary"])

    assert code is None
    assert "no/such/binary" in message


@pytest.mark.anyio
async def test_stderr_goes_to_the_callback_and_stdout_stays_clean(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    out, err, code, _, _ = await run(
        cluster.kubeconfig, shell, ["sh", "-c", "echo out; echo err >&2; echo out2; exit 1"])

    assert (out, err, code) == (b"out\nout2\n", b"err\n", 1)


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.anyio
async def test_not_reading_stops_the_remote_writer_and_bounds_our_memory(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    total = 300 << 20
    pid_line = bytearray()
    async with connect(str(cluster.kubeconfig)) as kube:
        async def written(pid: int) -> int:
            """Bytes the remote producer has written so far (its /proc/PID/io wchar)."""
            out, _, _, _, _ = await run(cluster.kubeconfig, shell,
                                        ["cat", f"/proc/{pid}/io"])
            match = re.search(rb"wchar: (\d+)", out)
            assert match, out
            return int(match.group(1))

        command = ["sh", "-c", f"echo $$ >&2; exec head -c {total} /dev/zero"]
        async with kube.exec(shell, "main", command, on_stderr=pid_line.extend) as channel:
            received = len(await channel.read())
            while not pid_line.endswith(b"\n"):
                received += len(await channel.read())
            pid = int(pid_line)
            before = rss()
            await anyio.sleep(2)  # not reading
            first = await written(pid)
            await anyio.sleep(1)
            second = await written(pid)
            growth = rss() - before

            assert second == first, "the producer kept writing while we did not read"
            # What left it sits in pipes and socket buffers of containerd, kubelet, API server
            # and TCP (about 24 MiB measured here), not in our process.
            assert first < 64 << 20, f"{first} bytes left the producer while we did not read"
            assert growth < 16 << 20, f"our RSS grew by {growth} bytes while we did not read"

            # Reading again lets it go on: we get more than it had written while paused.
            while received <= first + (1 << 20):
                chunk = await channel.read()
                assert chunk, "the stream ended early"
                received += len(chunk)
            assert await written(pid) > first
            await run(cluster.kubeconfig, shell, ["kill", str(pid)])


@pytest.mark.anyio
async def test_a_user_without_pods_exec_gets_the_rbac_sentence(cluster, shell) -> None:  # type: ignore[no-untyped-def]
    async with connect(str(cluster.viewer_kubeconfig)) as kube:
        with pytest.raises(RefusedError) as refused:
            async with kube.exec(shell, "main", ["true"]):
                pass

    assert str(refused.value) == (
        f"You may not create pods/exec in namespace {shell.namespace} (RBAC): ask for `create` "
        "(and `get`) on `pods/exec` there, or use a kubeconfig that has it.")
