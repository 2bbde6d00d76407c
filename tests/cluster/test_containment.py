"""Nothing from a pod can leave this machine, proved without sending anything anywhere.

Pods have routes to the pod and service ranges and the node's own address only; the host drops
forwarded pod traffic that is not for the pod range, blackholes the service range, and
masquerades nothing; pods get a resolver on their own loopback only. Every check reads state
(routes, rules, files); none sends a packet.
"""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

pytestmark = pytest.mark.cluster


def test_pod_has_no_route_off_the_cluster(cluster, namespace, run_pod, tools_image):
    run_pod("pod", namespace=namespace, image=tools_image, command=["sleep", "3600"])

    def in_pod(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return cluster.kubectl("exec", "pod", "-n", namespace, "--", *argv, check=False)

    routes = in_pod("ip", "-4", "route", "show").stdout.decode()
    # `ip route get` asks the kernel which route it would take; it sends nothing.
    outside = in_pod("ip", "-4", "route", "get", "8.8.8.8")
    inside = in_pod("ip", "-4", "route", "get", "10.202.255.1")

    assert "default" not in routes
    destinations = {line.split()[0] for line in routes.splitlines()}
    # The node IP is the host's own address (the API server listens there): delivered locally.
    assert destinations == {cluster.node_pod_cidr, cluster.pod_cidr, cluster.service_cidr,
                            cluster.node_ip}
    assert outside.returncode != 0
    assert b"unreachable" in outside.stderr.lower(), outside.stderr
    assert inside.returncode == 0


def test_pod_is_given_no_resolver_but_its_own_loopback(cluster, namespace, run_pod, tools_image):
    run_pod("pod", namespace=namespace, image=tools_image, command=["sleep", "3600"])

    resolv = cluster.kubectl("exec", "pod", "-n", namespace, "--", "cat",
                             "/etc/resolv.conf").stdout.decode()
    servers = [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")]

    # With no resolver configured, the kubelet points pods at their own loopback (where nothing
    # answers) rather than at the host's resolver, which is off this machine.
    assert servers, resolv
    assert all(ipaddress.ip_address(s).is_loopback for s in servers), resolv


def _host(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_host_forward_path_drops_pod_traffic_to_anywhere_else(cluster):
    pods = cluster.pod_cidr
    rules = _host("iptables", "-w", "-S", "MULTISNIFF-FWD").splitlines()
    forward = _host("iptables", "-w", "-S", "FORWARD").splitlines()
    rules6 = _host("ip6tables", "-w", "-S", "MULTISNIFF-FWD").splitlines()
    forward6 = _host("ip6tables", "-w", "-S", "FORWARD").splitlines()

    # Where the host forwarded nothing before up, the chain ends by dropping everything else.
    drop_rest = [[], ["-A MULTISNIFF-FWD -j DROP"]]
    assert forward[1] == "-A FORWARD -j MULTISNIFF-FWD"  # first, before anything that accepts
    assert rules[1:4] == [
        f"-A MULTISNIFF-FWD -s {pods} -d {pods} -j ACCEPT",
        f"-A MULTISNIFF-FWD -s {pods} -j DROP",
        f"-A MULTISNIFF-FWD -d {pods} -j DROP",
    ]
    assert rules[4:] in drop_rest
    assert forward6[1] == "-A FORWARD -j MULTISNIFF-FWD"
    assert rules6[1:3] == [
        "-A MULTISNIFF-FWD -i msniff-br0 -j DROP",
        "-A MULTISNIFF-FWD -o msniff-br0 -j DROP",
    ]
    assert rules6[3:] in drop_rest


def test_host_masquerades_nothing_and_blackholes_services(cluster):
    nat = _host("iptables-save", "-t", "nat")
    blackholes = _host("ip", "-4", "route", "show", "type", "blackhole")
    # The host's answer for a service address: the blackhole, not the default route.
    service_ip = str(next(ipaddress.ip_network(cluster.service_cidr).hosts()))
    route = subprocess.run(["ip", "-4", "route", "get", service_ip], capture_output=True,
                           text=True)

    assert "MASQUERADE" not in nat and "SNAT" not in nat
    assert f"blackhole {cluster.service_cidr}" in blackholes
    assert route.returncode != 0 or "blackhole" in route.stdout


def test_node_and_pod_addresses_stay_off_the_real_interfaces(cluster, namespace, run_pod):
    run_pod("pod", namespace=namespace, image="multisniff.local/pause:1")  # the bridge exists
    links = _host("ip", "-o", "-4", "addr", "show")
    node_line = next(line for line in links.splitlines() if f" {cluster.node_ip}/" in line)
    bridge_line = next(line for line in links.splitlines() if " msniff-br0 " in line)
    default = _host("ip", "-4", "route", "show", "default")

    assert node_line.split()[1] == "msniff0"
    assert "inet " + str(next(ipaddress.ip_network(cluster.node_pod_cidr).hosts())) in bridge_line
    assert "msniff" not in default
