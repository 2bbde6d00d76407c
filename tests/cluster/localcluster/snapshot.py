"""What the host looks like, as far as a cluster could change it: taken before up and after down.

Each section is a sorted list of lines, so two snapshots compare as plain text. Sections leave out
what changes on a busy shared machine for reasons of its own (packet counters, other people's
processes, interface statistics), and keep everything a cluster could leave behind.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
from pathlib import Path

from . import cgroups, network, processes
from .layout import Layout

SYSCTLS = (
    "net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
)

def _out(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    return result.stdout


def _processes(layout: Layout) -> list[str]:
    """Our daemons (found as processes.ours finds them), anything in a pod, anything run from
    our binaries. Not other people's containerd or etcd: they come and go on a shared machine."""
    pids = {pid for pid, _ in processes.ours(layout)} | cgroups.pids_inside()
    lines = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        if pid in pids or exe.startswith(str(layout.bin_dir)):
            lines.append(f"{os.path.basename(exe)}: {cmd}")
    # Exiting ones have no exe or command line left, only a name: shims and runc after down.
    lines.extend(f"{name} (not gone yet)" for _, name in processes.lingering(layout))
    return sorted(lines)


def _mounts() -> list[str]:
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        # mount point, options, propagation, fs type, source; not the ids, which are reused.
        lines.append(" ".join([fields[4], fields[5], *fields[6:sep], *fields[sep + 1:sep + 3]]))
    return sorted(lines)


def _links() -> list[str]:
    links = json.loads(_out("ip", "-j", "-d", "link", "show") or "[]")
    lines = []
    for link in links:
        kind = link.get("linkinfo", {}).get("info_kind", link.get("link_type", ""))
        lines.append(f"{link['ifname']} {kind} master={link.get('master', '-')} "
                     f"flags={','.join(sorted(link.get('flags', [])))}")
    return sorted(lines)


def _addresses() -> list[str]:
    lines = []
    for link in json.loads(_out("ip", "-j", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            lines.append(f"{link['ifname']} {a['family']} {a['local']}/{a['prefixlen']}")
    return sorted(lines)


def _routes() -> list[str]:
    return sorted(_out("ip", "route", "show", "table", "all").splitlines() +
                  _out("ip", "-6", "route", "show", "table", "all").splitlines())


def _rules(tool: str) -> list[str]:
    """Rules by table, without counters. A table with no rules and every policy ACCEPT filters
    nothing, so it counts as absent: iptables-nft creates such a table on first use and has no
    command to delete it again."""
    lines: list[str] = []
    table: list[str] = []
    for line in _out(tool).splitlines():
        if line.startswith("#"):
            continue
        line = re.sub(r"\[\d+:\d+\]", "", line).rstrip()  # chain counters
        table.append(line)
        if line == "COMMIT":
            name, body = table[0], table[1:-1]
            if any(not (t.startswith(":") and t.endswith("ACCEPT")) for t in body):
                lines += [f"{name} {t}" for t in body]
            table = []
    return sorted(lines)


def _cgroups() -> list[str]:
    return sorted(str(d) for d in cgroups.kubepods_dirs())


def _sysctls() -> list[str]:
    lines = []
    for key in SYSCTLS:
        try:
            lines.append(f"{key}={Path('/proc/sys', key).read_text().strip()}")
        except OSError:
            lines.append(f"{key} absent")
    return lines


def take(layout: Layout) -> dict[str, list[str]]:
    return {
        "processes": _processes(layout),
        "mounts": _mounts(),
        "links": _links(),
        "addresses": _addresses(),
        "routes": _routes(),
        "netns": sorted(_out("ip", "netns", "list").splitlines()),
        "iptables": _rules("iptables-save"),
        "ip6tables": _rules("ip6tables-save"),
        "kubepods-cgroups": _cgroups(),
        "sysctls": _sysctls(),
        "cni-cache": sorted(str(p) for p in [network.CNI_CACHE, *network.CNI_CACHE.rglob("*")]
                            if p.exists()),
    }


def save(layout: Layout, path: Path) -> None:
    path.write_text(json.dumps(take(layout), indent=1) + "\n")


def compare(before: dict[str, list[str]], after: dict[str, list[str]]) -> str:
    """A unified diff per section that differs; empty when the host is as it was."""
    out = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section, []), after.get(section, [])
        if a != b:
            out += difflib.unified_diff(a, b, f"before/{section}", f"after/{section}", lineterm="")
    return "\n".join(out)
