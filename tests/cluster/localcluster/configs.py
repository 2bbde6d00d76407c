"""The files the components read: kubeconfigs, containerd's config, the kubelet's, the CNI network.

Rendered afresh on every ``up`` from the layout, so a change here takes effect without a cleanup.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .layout import Layout


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(layout: Layout, identity: str, user: str) -> str:
    """A self-contained kubeconfig (certificates embedded) for one PKI identity."""
    pki = layout.pki
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "multisniff",
            "cluster": {
                "server": layout.apiserver_url,
                "certificate-authority-data": _b64(pki / "ca.crt"),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": _b64(pki / f"{identity}.crt"),
                "client-key-data": _b64(pki / f"{identity}.key"),
            },
        }],
        "contexts": [{"name": user, "context": {"cluster": "multisniff", "user": user}}],
        "current-context": user,
    }
    return json.dumps(config, indent=2) + "\n"


def containerd_toml(layout: Layout) -> str:
    # Own root, state, socket and CNI dirs, so it never meets a system containerd. Network
    # namespaces are mounted under its state dir, not /var/run/netns. Registries are unreachable
    # by design (see processes.NO_REGISTRY_ENV): every image is imported before the kubelet starts.
    state = layout.containerd_state
    return f'''version = 2
root = "{layout.containerd_root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{layout.containerd_socket}"

[ttrpc]
  address = "{state}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{layout.containerd_root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "multisniff.local/pause:1"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  # This machine withholds CAP_SYS_RESOURCE even from root: no process may lower its
  # oom_score_adj. Clamp what the kubelet asks for (-998 for sandboxes) to containerd's own.
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{layout.cni_conf_dir}"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
'''


def cni_conflist(layout: Layout) -> str:
    # isGateway gives the bridge the first address so pods can reach the node; no
    # isDefaultGateway, no ipMasq, no portmap: pods get routes to the pod and service ranges
    # and to the node's own IP (where the API server listens: a local address of the host, so
    # nothing is forwarded), and nothing of theirs is ever translated to the host's address.
    conf = {
        "cniVersion": "1.0.0",
        "name": layout.cni_network,
        "plugins": [{
            "type": "bridge",
            "bridge": layout.bridge,
            "isGateway": True,
            "isDefaultGateway": False,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(layout.cni_ipam_dir),
                "ranges": [[{"subnet": layout.node_pod_cidr, "gateway": layout.bridge_ip}]],
                "routes": [
                    {"dst": layout.pod_cidr},
                    {"dst": layout.service_cidr},
                    {"dst": f"{layout.node_ip}/32"},
                ],
            },
        }],
    }
    return json.dumps(conf, indent=2) + "\n"


def kubelet_yaml(layout: Layout) -> str:
    pki = layout.pki
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": layout.node_ip,
        "port": layout.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": layout.kubelet_healthz_port,
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        # No CAP_SYS_RESOURCE here (see containerd_toml): keep the kubelet's own score as it is.
        "oomScoreAdj": 0,
        # Pods must not learn the host's resolver: it is off this machine.
        "resolvConf": "",
        "podLogsDir": str(layout.pod_logs),
        # The kubelet would create KUBE-FIREWALL and canary chains and leave them behind.
        "makeIPTablesUtilChains": False,
        # Imported images cannot be pulled again: never collect them, never evict for disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "evictionPressureTransitionPeriod": "5s",
        "serializeImagePulls": False,
        "maxPods": 110,
        "nodeStatusReportFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "20s",
        "volumeStatsAggPeriod": "0s",
        "shutdownGracePeriod": "0s",
        "staticPodPath": "",
    }
    return json.dumps(config, indent=2) + "\n"


def rbac_and_namespaces_yaml(layout: Layout) -> str:
    """The refusal-test fixtures: a user who may only look at pods, a namespace that is locked."""
    docs = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "multisniff-pod-viewer"},
            "rules": [{"apiGroups": [""], "resources": ["pods", "namespaces"],
                       "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "multisniff-pod-viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "multisniff-pod-viewer"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": layout.viewer_user}],
        },
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": layout.restricted_namespace,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        },
    ]
    return "".join("---\n" + json.dumps(d) + "\n" for d in docs)
