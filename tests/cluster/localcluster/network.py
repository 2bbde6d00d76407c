"""The host side of containment: node address, service blackhole, FORWARD guard; and their removal.

Nothing here sends a packet. Pods have no default route (see configs.cni_conflist); this module
makes sure that even a pod that adds one itself gets nowhere: the host drops, in its own chain at
the top of FORWARD, anything from the pod range that is not for the pod range, and routes the
service range into a blackhole. Nothing is masqueraded.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from .layout import Layout

FORWARDING_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _link_exists(name: str) -> bool:
    return _run("ip", "link", "show", "dev", name, check=False).returncode == 0


CNI_CACHE = Path("/var/lib/cni")  # libcni's result cache; containerd 1.6 cannot move it


def _host_before(layout: Layout) -> Path:
    # Kept outside run/ so that a crash between up and down cannot lose the original values.
    return layout.state / "host-before.json"


def set_up(layout: Layout) -> None:
    # The CNI bridge plugin turns on IP forwarding when it sets up a gateway, and libcni creates
    # its cache directory: remember how the host was, so that down puts it back.
    saved = _host_before(layout)
    if not saved.exists():
        before = {
            "sysctls": {k: Path("/proc/sys", k).read_text().strip() for k in FORWARDING_SYSCTLS},
            "cni_cache_existed": CNI_CACHE.exists(),
        }
        saved.write_text(json.dumps(before) + "\n")
    sysctls_before = json.loads(saved.read_text())["sysctls"]

    if not _link_exists(layout.node_interface):
        # A bridge with no ports: this kernel has no dummy interfaces, and an address on a
        # port-less bridge is just as local and just as unable to send anything anywhere.
        _run("ip", "link", "add", layout.node_interface, "type", "bridge")
        _run("ip", "link", "set", layout.node_interface, "addrgenmode", "none")
    _run("ip", "addr", "replace", f"{layout.node_ip}/32", "dev", layout.node_interface)
    _run("ip", "link", "set", layout.node_interface, "up")
    _run("ip", "route", "replace", "blackhole", layout.service_cidr)

    chain, pods = layout.firewall_chain, layout.pod_cidr
    for tool, rules, forwarding in (
        ("iptables", [
            ["-s", pods, "-d", pods, "-j", "ACCEPT"],
            ["-s", pods, "-j", "DROP"],
            ["-d", pods, "-j", "DROP"],
        ], sysctls_before["net/ipv4/ip_forward"]),
        # Pods have no IPv6 addresses beyond link-local; nothing of theirs is to be routed.
        ("ip6tables", [
            ["-i", layout.bridge, "-j", "DROP"],
            ["-o", layout.bridge, "-j", "DROP"],
        ], sysctls_before["net/ipv6/conf/all/forwarding"]),
    ):
        if forwarding == "0":
            # The host forwarded nothing before we came; the bridge plugin switching forwarding
            # on must not change that for anyone. (Pod to pod is bridged, pod to host is local:
            # neither needs the host to route.)
            rules = [*rules, ["-j", "DROP"]]
        _remove_chain(tool, chain)
        _run(tool, "-w", "-N", chain)
        for rule in rules:
            _run(tool, "-w", "-A", chain, *rule)
        _run(tool, "-w", "-I", "FORWARD", "1", "-j", chain)


def firewall_rules(layout: Layout, tool: str = "iptables") -> list[str]:
    """The rules of our chain as iptables -S prints them, empty if it does not exist."""
    out = _run(tool, "-w", "-S", layout.firewall_chain, check=False)
    return out.stdout.splitlines() if out.returncode == 0 else []


def forward_jumps_to_chain(layout: Layout, tool: str = "iptables") -> bool:
    out = _run(tool, "-w", "-S", "FORWARD", check=False).stdout.splitlines()
    return bool(out) and f"-A FORWARD -j {layout.firewall_chain}" in out[1:2]


def _remove_chain(tool: str, chain: str) -> None:
    while _run(tool, "-w", "-D", "FORWARD", "-j", chain, check=False).returncode == 0:
        pass
    _run(tool, "-w", "-F", chain, check=False)
    _run(tool, "-w", "-X", chain, check=False)


def tear_down(layout: Layout) -> list[str]:
    """Remove everything set_up and the CNI plugin made; return what could not be removed."""
    problems: list[str] = []
    for tool in ("iptables", "ip6tables"):
        _remove_chain(tool, layout.firewall_chain)
        if firewall_rules(layout, tool):
            problems.append(f"{tool} chain {layout.firewall_chain} is still there")
    # Host ends of pod veths whose namespace is already gone have vanished with it; any left are
    # still enslaved to our bridge.
    if _link_exists(layout.bridge):
        links = json.loads(_run("ip", "-j", "link", "show", "master", layout.bridge).stdout or "[]")
        for link in links:
            _run("ip", "link", "del", link["ifname"], check=False)
        _run("ip", "link", "del", layout.bridge, check=False)
    if _link_exists(layout.node_interface):
        _run("ip", "link", "del", layout.node_interface, check=False)
    for name in (layout.bridge, layout.node_interface):
        if _link_exists(name):
            problems.append(f"interface {name} is still there (ip link del {name})")
    _run("ip", "route", "del", "blackhole", layout.service_cidr, check=False)

    _forget_cni_results(layout)
    saved = _host_before(layout)
    if saved.exists():
        before = json.loads(saved.read_text())
        for key, value in before["sysctls"].items():
            Path("/proc/sys", key).write_text(value + "\n")
        if not before["cni_cache_existed"]:
            for d in (CNI_CACHE / "results", CNI_CACHE):
                with contextlib.suppress(OSError):  # not ours alone any more, or already gone
                    d.rmdir()
        saved.unlink()
    return problems


def _forget_cni_results(layout: Layout) -> None:
    """Remove libcni's cached results for our sandboxes: NETWORK-ID-eth0 and cni-loopback-ID-lo."""
    results = CNI_CACHE / "results"
    prefix = f"{layout.cni_network}-"
    for cached in results.glob(f"{prefix}*"):
        sandbox = cached.name[len(prefix):].rsplit("-", 1)[0]
        for loopback in results.glob(f"cni-loopback-{sandbox}-*"):
            loopback.unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
