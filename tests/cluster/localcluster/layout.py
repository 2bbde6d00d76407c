"""Where the cluster lives: cache, state, addresses, ports. One frozen object, built from the env.

The address plan keeps the cluster away from anything else on the machine:

- the node's IP sits on an interface of its own, a bridge without ports (the API server and the
  kubelet need an address that is not loopback, and we must not use the machine's real one);
- pods get addresses from ``pod_cidr`` on a bridge of our own, with routes to the pod and service
  ranges and the node IP only: no default route, so a pod cannot even try to reach the outside;
- the service range is a blackhole on the host, since there is no kube-proxy to translate it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.33.13"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")

REPO_CLUSTER_DIR = Path(__file__).resolve().parents[1]  # tests/cluster


@dataclass(frozen=True)
class Layout:
    cache: Path
    state: Path

    node_name: str = "multisniff-node"
    node_interface: str = "msniff0"  # port-less bridge carrying node_ip
    node_ip: str = "10.201.0.1"
    pod_cidr: str = "10.202.0.0/16"  # cluster-wide
    node_pod_cidr: str = "10.202.0.0/24"  # the one node's share, handed out by the bridge
    service_cidr: str = "10.203.0.0/16"
    bridge: str = "msniff-br0"
    cni_network: str = "multisniff"
    firewall_chain: str = "MULTISNIFF-FWD"

    etcd_client_port: int = 23790
    etcd_peer_port: int = 23800
    apiserver_port: int = 6443
    kubelet_port: int = 10250
    kubelet_healthz_port: int = 10248

    restricted_namespace: str = "restricted"
    viewer_user: str = "multisniff-viewer"

    @classmethod
    def from_environment(cls) -> Layout:
        return cls(
            cache=Path(os.environ.get("MULTISNIFF_CACHE", "/var/cache/multisniff")),
            state=Path(os.environ.get("MULTISNIFF_CLUSTER_STATE", "/var/lib/multisniff-cluster")),
        )

    # -- build outputs (kept across up/down) --
    @property
    def bin_dir(self) -> Path:
        return self.cache / f"k8s-{KUBERNETES_VERSION}" / "bin"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def images_dir(self) -> Path:
        return self.cache / "images"

    @property
    def go_module_dir(self) -> Path:
        return REPO_CLUSTER_DIR / "k8s"

    @property
    def images_builder(self) -> Path:
        return REPO_CLUSTER_DIR / "images" / "build"

    @property
    def manifests_dir(self) -> Path:
        return REPO_CLUSTER_DIR / "manifests"

    # -- kept across up/down: identity and logs --
    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "admin.kubeconfig"

    @property
    def viewer_kubeconfig(self) -> Path:
        return self.state / "viewer.kubeconfig"

    # -- wiped by down: everything a run creates --
    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def pids(self) -> Path:
        return self.run / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.run / "etcd"

    @property
    def kubelet_root(self) -> Path:
        return self.run / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.run / "pod-logs"

    @property
    def containerd_root(self) -> Path:
        return self.run / "containerd"

    @property
    def cni_conf_dir(self) -> Path:
        return self.run / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.run / "cni" / "ipam"

    @property
    def containerd_state(self) -> Path:
        # Sockets and runc state belong under /run (tmpfs), apart from any system containerd.
        return Path("/run/multisniff-containerd")

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_state / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.run / "config"

    # -- derived addresses --
    @property
    def apiserver_url(self) -> str:
        return f"https://{self.node_ip}:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"

    @property
    def bridge_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.node_pod_cidr).hosts()))

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))
