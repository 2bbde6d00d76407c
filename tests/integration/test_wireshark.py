"""`multisniff --wireshark` with Debian's real Qt Wireshark on a virtual X display (Xvfb).

Wireshark does not read the pipe itself: its dumpcap child reads our stream from the inherited
stdin and writes it to a temporary pcapng (in $TMPDIR) that Wireshark shows. That file is the
observable: tshark must find in it the pod's interface, by name, with the marked datagrams a
workload pod sent. Then Wireshark is killed, as a user closing it, and multisniff must end by
itself with exit 0 ("Wireshark was closed" ends the capture like any other stop) and leave no
tcpdump running in the target.

CI needs: apt-get install --no-install-recommends wireshark xvfb xauth (and tshark).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubenamespace import throwaway_namespace
from workloads import start_pod, wait_for

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("wireshark") is None or shutil.which("xvfb-run") is None,
                       reason="needs wireshark and xvfb-run (apt-get install wireshark xvfb "
                              "xauth)"),
]



def children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every process whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found.append((int(entry.name), comm))
    return found


def descendant(pid: int, comm: str) -> int | None:
    pending = [pid]
    while pending:
        for child, name in children(pending.pop()):
            if name == comm:
                return child
            pending.append(child)
    return None


def marked_packets(capture: Path, interface: str) -> int:
    """Datagrams on `interface` whose payload starts with the workload's marker "MSNF "."""
    result = subprocess.run(
        ["tshark", "-r", str(capture), "-Y",
         f'frame.interface_name == "{interface}" && udp.dstport == 9999 && '
         'udp contains "MSNF "',
         "-T", "fields", "-e", "frame.number"],
        capture_output=True, timeout=60)
    # A file still being written may end in a partial block: tshark then complains but has
    # printed every whole packet before it.
    return len(result.stdout.split())


def tcpdumps_in(cluster: Any, namespace: str, pod: str) -> list[str]:
    ps = cluster.kubectl("exec", "-n", namespace, pod, "--", "ps", "-o", "pid,args").stdout
    return [line for line in ps.decode().splitlines() if "tcpdump" in line]


def test_wireshark_shows_the_live_capture_and_closing_it_ends_multisniff(
        cluster: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    wireshark_tmp = tmp_path / "wireshark-tmp"
    home.mkdir()
    wireshark_tmp.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(wireshark_tmp),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_RUNTIME_DIR": str(home)}
    with throwaway_namespace(cluster, "msnf-wireshark") as namespace:
        target_ip = start_pod(cluster, namespace, "target",
                              ["udp-listen", "-listen", ":9999", "-quiet"])
        stderr_path = tmp_path / "multisniff.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                ["xvfb-run", "-a", sys.executable, "-m", "multisniff",
                 "--kubeconfig", str(cluster.kubeconfig), "-l", "app=target", "-n", namespace,
                 "--mode", "upload", "-f", "udp port 9999", "--wireshark"],
                stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
        try:
            wait_for(stderr_path, "Capturing ", process, 90)
            wireshark = descendant(process.pid, "wireshark")
            assert wireshark is not None, "multisniff started no wireshark"
            # 200 marked datagrams, 50 per second.
            start_pod(cluster, namespace, "sender",
                      ["udp", "-targets", f"{target_ip}:9999", "-count", "200", "-rate", "50",
                       "-report", "0", "-pod", "sender"])
            interface = f"{namespace}/target"
            seen = 0
            deadline = time.monotonic() + 90
            while seen < 200:
                assert process.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, \
                    f"Wireshark's capture file shows {seen} of 200 datagrams"
                time.sleep(1)
                files = sorted(wireshark_tmp.glob("wireshark_*.pcapng"))
                if files:
                    seen = marked_packets(files[-1], interface)
            assert seen == 200
            assert descendant(process.pid, "wireshark") == wireshark

            os.kill(wireshark, signal.SIGTERM)  # the user closes Wireshark
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail("multisniff did not end after Wireshark was closed:\n"
                            + stderr_path.read_text())
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log = stderr_path.read_text()
        assert process.returncode == 0, log
        assert "Wireshark was closed; stopping the capture." in log
        assert f"{namespace}/target: done" in log
        assert tcpdumps_in(cluster, namespace, "target") == []
        left = cluster.kubectl("exec", "-n", namespace, "target", "--", "ls", "-a",
                               "/tmp").stdout.decode()
        assert ".multisniff" not in left
