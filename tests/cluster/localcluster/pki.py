"""The cluster's identities: one CA, a certificate per component and user, the service-account key.

Made once with openssl and kept across up/down (they cost nothing to keep and a new CA would
invalidate every kubeconfig handed out). Elliptic-curve keys: fast to make, accepted everywhere.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout


@dataclass(frozen=True)
class Identity:
    """One certificate: who (CN, O), for what (client and/or server), and where (SANs)."""

    name: str
    common_name: str
    organizations: tuple[str, ...] = ()
    server: bool = False
    client: bool = True
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


def identities(layout: Layout) -> list[Identity]:
    node = layout.node_name
    return [
        Identity(
            "apiserver",
            "kube-apiserver",
            server=True,
            client=False,
            dns=(
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "localhost",
            ),
            ips=(layout.node_ip, layout.kubernetes_service_ip, "127.0.0.1"),
        ),
        # The API server's identity towards kubelets (exec, logs, port-forward).
        Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
        Identity("admin", "multisniff-admin", ("system:masters",)),
        # May list and watch pods, nothing more (RBAC in cluster.py): for refusal tests.
        Identity("viewer", layout.viewer_user),
        Identity("controller-manager", "system:kube-controller-manager"),
        Identity("scheduler", "system:kube-scheduler"),
        Identity("kubelet-client", f"system:node:{node}", ("system:nodes",)),
        Identity("kubelet-serving", f"system:node:{node}", ("system:nodes",), server=True,
                 client=False, dns=(node,), ips=(layout.node_ip,)),
    ]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
    path.chmod(0o600)


def ensure(layout: Layout) -> None:
    """Create whatever of the PKI is missing; never replace what exists."""
    pki = layout.pki
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    if not ca_crt.exists():
        _new_key(ca_key)
        _openssl("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=multisniff-cluster-ca",
                 "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca_crt))
    for ident in identities(layout):
        crt = pki / f"{ident.name}.crt"
        if crt.exists():
            continue
        key, csr = pki / f"{ident.name}.key", pki / f"{ident.name}.csr"
        _new_key(key)
        subject = f"/CN={ident.common_name}" + "".join(f"/O={o}" for o in ident.organizations)
        usages = [u for u, on in (("serverAuth", ident.server), ("clientAuth", ident.client)) if on]
        extensions = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={','.join(usages)}",
        ]
        sans = [f"DNS:{d}" for d in ident.dns] + [f"IP:{ip}" for ip in ident.ips]
        if sans:
            extensions.append(f"subjectAltName={','.join(sans)}")
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        ext_file = pki / f"{ident.name}.ext"
        ext_file.write_text("\n".join(extensions) + "\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-days", "3650", "-extfile", str(ext_file), "-out", str(crt))
        csr.unlink()
        ext_file.unlink()
    sa_key = pki / "service-account.key"
    if not sa_key.exists():
        _new_key(sa_key)
        _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(pki / "service-account.pub"))
