"""up, down and status: the order in which the pieces start, and the order in which they go.

up always begins with the cleanup that down does, so a cluster killed any which way (clusterctl
interrupted, processes killed, machine state left behind) comes back the same as from clean.
Certificates and logs are kept; everything under run/ is made anew.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups, configs, images, network, pki, processes
from .apiclient import ApiClient
from .layout import COMPONENTS, Layout
from .processes import Daemon

# What the kubelet insists on setting on the whole machine (vm.overcommit_memory=1,
# kernel.panic=10, kernel.panic_on_oops=1) is not ours to change on a shared host: the kubelet
# runs in a mount namespace of its own where these files read as it wants them.
KUBELET_KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
}

CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ALL_DAEMONS = ("etcd", *CONTROL_PLANE, "containerd", "kubelet")


def log(message: str) -> None:
    print(f"clusterctl: {message}", file=sys.stderr, flush=True)


class ClusterError(Exception):
    """A user-facing failure: one message with the facts and the way out."""


@dataclass
class Status:
    running: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    apiserver_ready: bool = False
    node_ready: bool = False

    @property
    def up(self) -> bool:
        return not self.missing and self.apiserver_ready and self.node_ready

    @property
    def down(self) -> bool:
        return not self.running


def status(layout: Layout) -> Status:
    st = Status()
    for name in ALL_DAEMONS:
        pid = processes.pid_of(layout, name)
        if pid is None:
            st.missing.append(name)
        else:
            st.running[name] = pid
    if "kube-apiserver" in st.running and (layout.pki / "admin.crt").exists():
        api = ApiClient(layout, timeout=2)
        st.apiserver_ready = api.ready()
        st.node_ready = st.apiserver_ready and api.node_ready(layout.node_name)
    return st


def describe(layout: Layout, st: Status) -> dict[str, object]:
    return {
        "state": "up" if st.up else "down" if st.down else "partial",
        "kubeconfig": str(layout.admin_kubeconfig),
        "viewer_kubeconfig": str(layout.viewer_kubeconfig),
        "viewer_user": layout.viewer_user,
        "restricted_namespace": layout.restricted_namespace,
        "node_name": layout.node_name,
        "node_ip": layout.node_ip,
        "pod_cidr": layout.pod_cidr,
        "node_pod_cidr": layout.node_pod_cidr,
        "service_cidr": layout.service_cidr,
        "kubectl": str(layout.binary("kubectl")),
        "state_dir": str(layout.state),
        "running": st.running,
        "missing": st.missing,
        "apiserver_ready": st.apiserver_ready,
        "node_ready": st.node_ready,
    }


# ---------------------------------------------------------------------------------------------- up


def _preflight(layout: Layout) -> None:
    if os.geteuid() != 0:
        raise ClusterError("clusterctl up must run as root: it creates interfaces, cgroups and "
                           "mount namespaces.")
    missing = [c for c in COMPONENTS if not layout.binary(c).exists()]
    if missing:
        raise ClusterError(f"The Kubernetes binaries {', '.join(missing)} are not in "
                           f"{layout.bin_dir}; run `tests/cluster/clusterctl build` first.")
    tools = ["etcd", "containerd", "containerd-shim-runc-v2", "runc", "ctr", "openssl",
             "iptables", "ip6tables", "ip", "unshare", "nsenter", "mount"]
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        raise ClusterError(f"These programs are missing: {', '.join(absent)}; install the Debian "
                           "packages etcd-server containerd runc iptables iproute2 openssl.")
    if not Path("/usr/lib/cni/bridge").exists():
        raise ClusterError("The CNI plugins are not in /usr/lib/cni; install the Debian package "
                           "containernetworking-plugins.")
    if not (Path("/sys/fs/cgroup/memory").is_dir() and Path("/sys/fs/cgroup/cpu").is_dir()):
        raise ClusterError("This cluster is set up for cgroup v1 (memory and cpu hierarchies under "
                           "/sys/fs/cgroup), and they are not there.")
    if not images.index(layout):
        raise ClusterError(f"No container images in {layout.images_dir}/index.json; run "
                           "`tests/cluster/clusterctl build` first.")


def _write_configs(layout: Layout) -> None:
    layout.config.mkdir(parents=True, exist_ok=True)
    for identity, user, path in (
        ("admin", "multisniff-admin", layout.admin_kubeconfig),
        ("viewer", layout.viewer_user, layout.viewer_kubeconfig),
        ("controller-manager", "system:kube-controller-manager",
         layout.config / "controller-manager.kubeconfig"),
        ("scheduler", "system:kube-scheduler", layout.config / "scheduler.kubeconfig"),
        ("kubelet-client", f"system:node:{layout.node_name}", layout.config / "kubelet.kubeconfig"),
    ):
        path.write_text(configs.kubeconfig(layout, identity, user))
        path.chmod(0o600)
    (layout.config / "containerd.toml").write_text(configs.containerd_toml(layout))
    (layout.config / "kubelet.json").write_text(configs.kubelet_yaml(layout))
    (layout.config / "rbac.json").write_text(configs.rbac_and_namespaces_yaml(layout))
    layout.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (layout.cni_conf_dir / "10-multisniff.conflist").write_text(configs.cni_conflist(layout))
    tunables = layout.config / "kernel-tunables"
    tunables.mkdir(exist_ok=True)
    for key, value in KUBELET_KERNEL_TUNABLES.items():
        (tunables / key.replace("/", ".")).write_text(value + "\n")


def _daemons(layout: Layout) -> dict[str, Daemon]:
    pki, cfg, b = layout.pki, layout.config, layout.binary
    node = layout.node_ip
    bind_tunables = "".join(
        f"mount --bind {cfg}/kernel-tunables/{k.replace('/', '.')} /proc/sys/{k}\n"
        for k in KUBELET_KERNEL_TUNABLES
    )
    containerd_in_own_namespace = (
        "set -e\n"
        "mount --make-rshared /\n"  # in the new namespace only: the host's / stays private
        f"{bind_tunables}"
        f"exec containerd --config {cfg}/containerd.toml --log-level warn\n"
    )
    etcd_peer = f"http://127.0.0.1:{layout.etcd_peer_port}"
    return {
        "etcd": Daemon("etcd", [
            "etcd", "--name", "multisniff", "--data-dir", str(layout.etcd_data),
            "--listen-client-urls", layout.etcd_url, "--advertise-client-urls", layout.etcd_url,
            "--listen-peer-urls", etcd_peer, "--initial-advertise-peer-urls", etcd_peer,
            "--initial-cluster", f"multisniff={etcd_peer}",
            "--unsafe-no-fsync", "--logger", "zap", "--log-level", "warn",
        ]),
        "kube-apiserver": Daemon("kube-apiserver", [
            str(b("kube-apiserver")),
            f"--etcd-servers={layout.etcd_url}",
            f"--bind-address={node}", f"--advertise-address={node}",
            f"--secure-port={layout.apiserver_port}",
            f"--service-cluster-ip-range={layout.service_cidr}",
            f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki}/service-account.pub",
            f"--service-account-signing-key-file={pki}/service-account.key",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
            f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
            f"--kubelet-certificate-authority={pki}/ca.crt",
            "--kubelet-preferred-address-types=InternalIP",
            f"--cert-dir={layout.run}/apiserver",
            "--profiling=false",
            "--v=1",
        ]),
        "kube-controller-manager": Daemon("kube-controller-manager", [
            str(b("kube-controller-manager")),
            f"--kubeconfig={cfg}/controller-manager.kubeconfig",
            f"--authentication-kubeconfig={cfg}/controller-manager.kubeconfig",
            f"--authorization-kubeconfig={cfg}/controller-manager.kubeconfig",
            "--bind-address=127.0.0.1", "--leader-elect=false",
            f"--service-account-private-key-file={pki}/service-account.key",
            f"--root-ca-file={pki}/ca.crt",
            f"--cluster-signing-cert-file={pki}/ca.crt", f"--cluster-signing-key-file={pki}/ca.key",
            "--use-service-account-credentials=true",
            "--allocate-node-cidrs=true", f"--cluster-cidr={layout.pod_cidr}",
            "--node-cidr-mask-size=24",
            f"--service-cluster-ip-range={layout.service_cidr}",
            f"--cert-dir={layout.run}/controller-manager",
            "--profiling=false", "--v=1",
        ]),
        "kube-scheduler": Daemon("kube-scheduler", [
            str(b("kube-scheduler")),
            f"--kubeconfig={cfg}/scheduler.kubeconfig",
            f"--authentication-kubeconfig={cfg}/scheduler.kubeconfig",
            f"--authorization-kubeconfig={cfg}/scheduler.kubeconfig",
            "--bind-address=127.0.0.1", "--leader-elect=false",
            f"--cert-dir={layout.run}/scheduler",
            "--profiling=false", "--v=1",
        ]),
        "containerd": Daemon(
            "containerd",
            ["unshare", "--mount", "--propagation", "private", "--",
             "/bin/sh", "-c", containerd_in_own_namespace],
            env=processes.NO_REGISTRY_ENV,
        ),
    }


def _kubelet(layout: Layout, containerd_pid: int) -> Daemon:
    # Same mount namespace as containerd: the volumes the kubelet mounts must be what
    # containerd bind-mounts into containers.
    return Daemon("kubelet", [
        "nsenter", f"--mount=/proc/{containerd_pid}/ns/mnt", "--",
        str(layout.binary("kubelet")),
        f"--config={layout.config}/kubelet.json",
        f"--kubeconfig={layout.config}/kubelet.kubeconfig",
        f"--root-dir={layout.kubelet_root}",
        f"--cert-dir={layout.kubelet_root}/pki",
        f"--hostname-override={layout.node_name}",
        f"--node-ip={layout.node_ip}",
        "--v=1",
    ])


def kubectl(layout: Layout, *args: str, kubeconfig: Path | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [str(layout.binary("kubectl")), f"--kubeconfig={kubeconfig or layout.admin_kubeconfig}",
            *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def up(layout: Layout, *, workload: bool = True) -> float:
    """Start the cluster (or find it running); return the seconds it took."""
    started = time.monotonic()
    _preflight(layout)
    st = status(layout)
    if st.up:
        log(f"already up (node {layout.node_name} Ready); admin kubeconfig: "
            f"{layout.admin_kubeconfig}")
        print(layout.admin_kubeconfig)
        return 0.0
    if not st.down:
        log(f"found a partial cluster (running: {', '.join(st.running) or 'nothing'}); "
            "cleaning up first")
    problems = down(layout, quiet=True)
    if problems:
        raise ClusterError("Could not clean up what a previous run left:\n  " +
                           "\n  ".join(problems))

    def step(what: str) -> None:
        log(f"{time.monotonic() - started:5.1f}s {what}")

    pki.ensure(layout)
    layout.run.mkdir(parents=True, exist_ok=True)
    _write_configs(layout)
    network.set_up(layout)
    step("certificates, configs and host network ready")

    daemons = _daemons(layout)
    api = ApiClient(layout)
    etcd = processes.start(layout, daemons["etcd"])
    containerd = processes.start(layout, daemons["containerd"])
    processes.wait_until(layout, "etcd", etcd, lambda: _etcd_healthy(layout), timeout=30,
                         what="healthy")
    apiserver = processes.start(layout, daemons["kube-apiserver"])
    processes.wait_until(layout, "containerd", containerd, lambda: _containerd_ready(layout),
                         timeout=30, what="ready")
    step("etcd and containerd ready; importing images while the API server starts")
    imported = images.import_all(layout)
    step(f"imported {len(imported)} images")
    processes.wait_until(layout, "kube-apiserver", apiserver, api.ready, timeout=90,
                         what="ready")
    step("API server ready")
    for name in ("kube-controller-manager", "kube-scheduler"):
        processes.start(layout, daemons[name])
    kubectl(layout, "apply", "-f", str(layout.config / "rbac.json"))
    kubelet = processes.start(layout, _kubelet(layout, containerd))
    processes.wait_until(layout, "kubelet", kubelet, lambda: api.node_ready(layout.node_name),
                         timeout=60, what=f"registered with node {layout.node_name} Ready")
    step(f"node {layout.node_name} Ready")
    cm = processes.pid_of(layout, "kube-controller-manager") or 0
    processes.wait_until(layout, "kube-controller-manager", cm,
                         lambda: _namespace_provisioned(api, "default"), timeout=60,
                         what="done with namespace default (ServiceAccount, kube-root-ca.crt)")
    step("default ServiceAccount and kube-root-ca.crt present")
    if workload:
        apply_workload(layout)
        step("workload applied")
    elapsed = time.monotonic() - started
    log(f"up in {elapsed:.1f}s; admin kubeconfig: {layout.admin_kubeconfig}")
    print(layout.admin_kubeconfig)
    return elapsed


def _etcd_healthy(layout: Layout) -> bool:
    import urllib.request

    with urllib.request.urlopen(layout.etcd_url + "/health", timeout=2) as resp:
        return json.loads(resp.read()).get("health") == "true"


def _containerd_ready(layout: Layout) -> bool:
    if not layout.containerd_socket.exists():
        return False
    return subprocess.run(["ctr", "--address", str(layout.containerd_socket), "version"],
                          capture_output=True, timeout=10).returncode == 0


def _namespace_provisioned(api: ApiClient, namespace: str) -> bool:
    return (api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default") is not None and
            api.get(f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt") is not None)


def apply_workload(layout: Layout, *, timeout: float = 60) -> None:
    """Apply tests/cluster/manifests/*.yaml, if any, and wait for their pods to be Ready."""
    manifests = sorted(layout.manifests_dir.glob("*.yaml"))
    if not manifests:
        log(f"no manifests in {layout.manifests_dir}; no workload applied")
        return
    for manifest in manifests:
        kubectl(layout, "apply", "-f", str(manifest))
    out = kubectl(layout, "get", "-f", str(layout.manifests_dir), "-o", "json").stdout
    # Namespaced objects only: a Namespace itself has no metadata.namespace.
    namespaces = {item["metadata"]["namespace"] for item in json.loads(out).get("items", [])
                  if "namespace" in item["metadata"]}
    deadline = time.monotonic() + timeout
    for ns in sorted(namespaces):
        remaining = max(1.0, deadline - time.monotonic())
        # Pods from Deployments appear a moment after the apply; wait until some exist.
        while time.monotonic() < deadline:
            if json.loads(kubectl(layout, "get", "pods", "-n", ns, "-o", "json").stdout)["items"]:
                break
            time.sleep(0.5)
        result = kubectl(layout, "wait", "pods", "--all", "-n", ns, "--for=condition=Ready",
                         f"--timeout={remaining:.0f}s", check=False, timeout=remaining + 10)
        if result.returncode != 0:
            raise ClusterError(f"The workload pods in namespace {ns} did not become Ready within "
                               f"{timeout:.0f}s: {result.stderr.strip()}; see "
                               f"`kubectl get pods -n {ns}` and {layout.logs}/kubelet.log.")


# -------------------------------------------------------------------------------------------- down


LINGER_TIMEOUT = 20.0
"""Seconds down waits for the processes it stopped to be gone, exiting ones included."""


def down(layout: Layout, *, quiet: bool = False) -> list[str]:
    """Stop everything and remove what it left on the host; return what could not be removed."""
    say = (lambda _m: None) if quiet else log
    problems: list[str] = []
    by_name: dict[str, list[int]] = {}
    for pid, exe in processes.ours(layout):
        by_name.setdefault(exe, []).append(pid)

    # Top down: the kubelet first (it would restart containers), then the control plane.
    for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver"):
        if by_name.get(name):
            killed = processes.terminate(by_name[name], grace=10)
            say(f"stopped {name}" + (" (had to SIGKILL)" if killed else ""))
    left = cgroups.kill_everything_inside()
    if left:
        problems.append(f"processes {sorted(left)} in kubepods cgroups would not die")
    shims_and_containerd = [*by_name.get("containerd-shim-runc-v2", []),
                            *by_name.get("containerd", [])]
    if shims_and_containerd:
        processes.terminate(shims_and_containerd, grace=10)
        say("stopped containerd and its shims")
    if by_name.get("etcd"):
        processes.terminate(by_name["etcd"], grace=10)
        say("stopped etcd")
    stragglers = list(processes.ours(layout))
    if stragglers:
        processes.terminate([p for p, _ in stragglers], grace=2)
        stragglers = list(processes.ours(layout))
        if stragglers:
            problems.append(f"processes still running: {stragglers}")
    # Shims and the runc processes they start go on exiting after containerd is gone; down
    # returns once they are, so that the host after it is the host before up.
    exiting = processes.wait_gone(layout, timeout=LINGER_TIMEOUT)
    if exiting:
        problems.append(f"processes still exiting after {LINGER_TIMEOUT:g} s: {exiting}")

    cgroup_left = cgroups.remove_all()
    if cgroup_left:
        problems.append(f"cgroups not removable: {', '.join(map(str, cgroup_left[:5]))}")
    problems += network.tear_down(layout)
    problems += _unmount_leftovers(layout)
    for path in (layout.run, layout.containerd_state):
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            problems.append(f"{path} could not be removed")
    if not quiet:
        log("down" + ("" if not problems else " with problems:\n  " + "\n  ".join(problems)))
    return problems


RESTARTABLE = ("kube-apiserver", "kubelet")
"""Components that `stop` and `start` (and `restart`) take one at a time, for fault tests."""
STOP_TIMEOUT = 20.0
"""Seconds `stop` waits for the old process to be gone (SIGKILL after 10)."""


def _kubelet_healthy(layout: Layout) -> bool:
    import urllib.request

    url = f"http://127.0.0.1:{layout.kubelet_healthz_port}/healthz"
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.read().strip() == b"ok")


def stop(layout: Layout, name: str) -> float:
    """Stop one component and return once its process is gone (bounded); the seconds taken.
    Containers, shims and the other components are left running."""
    if name not in RESTARTABLE:
        raise ClusterError(f"Cannot stop {name!r}: only {', '.join(RESTARTABLE)} can be "
                           "stopped and started alone.")
    started = time.monotonic()
    pid = processes.pid_of(layout, name)
    if pid is None:
        log(f"{name} is not running")
        return 0.0
    killed = processes.terminate([pid], grace=10)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (processes.alive(pid) or processes.pid_of(layout, name) is not None) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    if processes.alive(pid) or processes.pid_of(layout, name) is not None:
        raise ClusterError(f"{name} (pid {pid}) was still running {STOP_TIMEOUT:g} s after "
                           f"SIGTERM and SIGKILL; kill it by hand, then run clusterctl start "
                           f"{name}.")
    elapsed = time.monotonic() - started
    log(f"stopped {name} in {elapsed:.1f}s" + (" (had to SIGKILL)" if killed else ""))
    return elapsed


def start(layout: Layout, name: str) -> float:
    """Start one component that `stop` stopped and return once it is ready: the API server
    answering /readyz, the kubelet's /healthz answering and the node Ready; the seconds."""
    if name not in RESTARTABLE:
        raise ClusterError(f"Cannot start {name!r}: only {', '.join(RESTARTABLE)} can be "
                           "stopped and started alone.")
    if processes.pid_of(layout, name) is not None:
        raise ClusterError(f"{name} is running already; clusterctl restart {name} restarts it.")
    started = time.monotonic()
    api = ApiClient(layout)
    if name == "kube-apiserver":
        pid = processes.start(layout, _daemons(layout)[name])
        processes.wait_until(layout, name, pid, api.ready, timeout=90, what="ready")
    else:
        containerd = processes.pid_of(layout, "containerd")
        if containerd is None:
            raise ClusterError("containerd is not running, so the kubelet cannot start; run "
                               "clusterctl up.")
        pid = processes.start(layout, _kubelet(layout, containerd))
        processes.wait_until(layout, name, pid,
                             lambda: _kubelet_healthy(layout) and api.node_ready(
                                 layout.node_name), timeout=60, what="healthy, node Ready")
    elapsed = time.monotonic() - started
    log(f"started {name}, ready in {elapsed:.1f}s")
    return elapsed


def restart(layout: Layout, name: str) -> float:
    """`stop`, then `start`: the old process is gone before the new one starts."""
    return stop(layout, name) + start(layout, name)


def _unmount_leftovers(layout: Layout) -> list[str]:
    """Mounts in the host namespace under our directories: none are made there, but be sure."""
    prefixes = (str(layout.state) + "/", str(layout.containerd_state) + "/",
                str(layout.containerd_state))
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target.startswith(prefixes):
            targets.append(target)
    problems = []
    for target in sorted(targets, key=len, reverse=True):
        if subprocess.run(["umount", "-l", target], capture_output=True).returncode != 0:
            problems.append(f"could not unmount {target}")
    return problems
