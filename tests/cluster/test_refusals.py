"""What the cluster refuses, so that multisniff's refusal paths can be tested for real: a user
who may only look at pods, and a namespace where Pod Security "restricted" is enforced."""

from __future__ import annotations

import json

import pytest
from conftest import PAUSE_IMAGE, pod_manifest

pytestmark = pytest.mark.cluster


def test_viewer_may_list_and_watch_pods_and_nothing_more(cluster):
    def can_i(verb: str, resource: str, *extra: str) -> bool:
        result = cluster.kubectl("auth", "can-i", verb, resource, *extra,
                                 kubeconfig=cluster.viewer_kubeconfig, check=False)
        return result.stdout.decode().strip() == "yes"

    assert can_i("list", "pods", "--all-namespaces")
    assert can_i("watch", "pods", "-n", "kube-system")
    assert not can_i("create", "pods")
    assert not can_i("delete", "pods")
    # "pods/exec" would mean the pod named exec; subresources go in their own flag.
    assert not can_i("create", "pods", "--subresource=exec")
    assert not can_i("get", "pods", "--subresource=exec")
    assert not can_i("patch", "pods", "--subresource=ephemeralcontainers")
    assert can_i("get", "pods")


def test_viewer_is_refused_exec_create_and_debug(cluster, namespace, run_pod):
    run_pod("target", namespace=namespace, image=PAUSE_IMAGE)
    as_viewer = {"kubeconfig": cluster.viewer_kubeconfig, "check": False}

    listed = cluster.kubectl("get", "pods", "-n", namespace, "-o", "name", **as_viewer)
    exec_ = cluster.kubectl("exec", "target", "-n", namespace, "--", "true", **as_viewer)
    create = cluster.kubectl(
        "create", "-f", "-", **as_viewer,
        input=json.dumps(pod_manifest("mine", namespace=namespace, image=PAUSE_IMAGE)).encode())
    debug = cluster.kubectl("debug", "target", "-n", namespace, "--image", PAUSE_IMAGE,
                            "--image-pull-policy=Never", "--target=main", **as_viewer)

    assert listed.returncode == 0 and listed.stdout.decode().split() == ["pod/target"]
    for refused in (exec_, create, debug):
        assert refused.returncode != 0
        assert b"forbidden" in refused.stderr.lower(), refused.stderr


def _privileged_pod(namespace: str, **kwargs) -> dict:
    return pod_manifest("sniffer", namespace=namespace, image=PAUSE_IMAGE, privileged=True,
                        **kwargs)


def test_restricted_namespace_refuses_privileged_and_host_pods(cluster):
    ns = cluster.restricted_namespace
    labels = cluster.kubectl_json("get", "namespace", ns)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    for pod in (_privileged_pod(ns), _privileged_pod(ns, host_pid=True, host_network=True)):
        result = cluster.kubectl("create", "--dry-run=server", "-f", "-", check=False,
                                 input=json.dumps(pod).encode())
        assert result.returncode != 0
        assert b"violates PodSecurity" in result.stderr, result.stderr

    # The same admission lets a compliant pod in, so the refusal above is about privilege.
    compliant = pod_manifest("plain", namespace=ns, image=PAUSE_IMAGE)
    compliant["spec"]["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}}
    compliant["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(compliant).encode())


def test_restricted_namespace_refuses_a_privileged_ephemeral_container(cluster):
    ns = cluster.restricted_namespace
    target = pod_manifest("target", namespace=ns, image=PAUSE_IMAGE)
    target["spec"]["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}}
    target["spec"]["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(target).encode())
    try:
        cluster.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/target", "--timeout=60s",
                        timeout=70)
        patch = {"spec": {"ephemeralContainers": [{
            "name": "sniff", "image": PAUSE_IMAGE, "imagePullPolicy": "Never",
            "targetContainerName": "main",
            "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}}]}}
        result = cluster.kubectl("patch", "pod", "target", "-n", ns,
                                 "--subresource=ephemeralcontainers", "--type=strategic",
                                 "-p", json.dumps(patch), check=False)
        assert result.returncode != 0
        assert b"violates PodSecurity" in result.stderr, result.stderr
    finally:
        cluster.kubectl("delete", "pod", "target", "-n", ns, "--wait=false", check=False)
