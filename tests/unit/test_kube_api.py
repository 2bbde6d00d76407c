"""Pure parts of the Kubernetes client: pods from JSON, container states, re-list differences,
label summaries, error sentences, kubeconfig paths. No cluster, no client library objects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from multisniff.errors import ClusterError, RefusedError, UsageError
from multisniff.kube.api import (
    Action,
    _settled,
    api_error,
    container_state,
    kubeconfig_paths,
    pod_changes,
    pod_info,
    top_labels,
)
from multisniff.kube.model import PodEventType, PodRef


def pod_json(name: str = "web-1", uid: str = "u1", **status: object) -> dict:  # type: ignore[type-arg]
    return {
        "metadata": {"name": name, "namespace": "demo", "uid": uid,
                     "labels": {"app": "web", "pod-template-hash": "abc"}},
        "spec": {
            "nodeName": "node-1",
            "hostNetwork": True,
            "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
            "containers": [
                {"name": "app", "image": "web:1"},
                {"name": "root", "image": "tools:1",
                 "securityContext": {"runAsUser": 0, "runAsNonRoot": False, "privileged": True,
                                     "capabilities": {"add": ["NET_RAW"], "drop": ["ALL"]}}},
            ],
            "ephemeralContainers": [{"name": "dbg", "image": "tools:1",
                                     "targetContainerName": "app"}],
        },
        "status": {
            "phase": "Running", "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
            "containerStatuses": [
                {"name": "app", "ready": True, "restartCount": 2,
                 "containerID": "containerd://abc", "state": {"running": {}}},
                {"name": "root", "state": {"waiting": {"reason": "ErrImageNeverPull",
                                                        "message": "never pull"}}},
            ],
            "ephemeralContainerStatuses": [
                {"name": "dbg", "state": {"terminated": {"reason": "Error", "exitCode": 1}}}],
            **status,
        },
    }


def test_pod_info_merges_spec_and_status() -> None:
    pod = pod_info(pod_json())

    assert pod.ref == PodRef("demo", "web-1")
    assert (pod.phase, pod.node, pod.ip, pod.ips) == ("Running", "node-1", "10.0.0.5",
                                                      ("10.0.0.5", "fd00::5"))
    assert pod.host_network and not pod.deleting
    app, root = pod.containers
    assert (app.running, app.ready, app.restart_count, app.container_id) == (
        True, True, 2, "containerd://abc")
    assert (app.run_as_user, app.run_as_non_root) == (1000, True)  # inherited from the pod
    assert (root.run_as_user, root.run_as_non_root, root.privileged) == (0, False, True)
    assert (root.added_capabilities, root.dropped_capabilities) == (("NET_RAW",), ("ALL",))
    assert not root.running and root.container_id is None
    assert [c.name for c in pod.ephemeral_containers] == ["dbg"]


def test_pod_info_of_a_bare_pending_pod() -> None:
    pod = pod_info({"metadata": {"name": "p", "namespace": "n", "deletionTimestamp": "x"},
                    "spec": {"containers": [{"name": "c", "image": "i"}]}})

    assert (pod.phase, pod.node, pod.ip, pod.ips, pod.deleting) == ("Unknown", None, None, (),
                                                                     True)
    assert pod.containers[0].run_as_user is None


def test_container_state_reads_regular_and_ephemeral_statuses() -> None:
    obj = pod_json()

    assert container_state(obj, "app").state == "running"
    assert container_state(obj, "root").reason == "ErrImageNeverPull"
    dbg = container_state(obj, "dbg")
    assert (dbg.state, dbg.reason, dbg.exit_code) == ("terminated", "Error", 1)
    assert container_state(obj, "missing").state == "absent"


def test_pod_changes_turn_what_we_knew_into_what_is() -> None:
    kept, changed, gone, renewed = (pod_info(pod_json(n, uid=n)) for n in "abcd")
    known = {p.ref: p for p in (kept, changed, gone, renewed)}
    changed_now = pod_info(pod_json("b", uid="b", phase="Failed"))
    renewed_now = pod_info(pod_json("d", uid="d2"))
    new = pod_info(pod_json("e", uid="e"))

    events = pod_changes(known, [kept, changed_now, renewed_now, new])

    assert [(e.type, e.pod.ref.name, e.pod.uid) for e in events] == [
        (PodEventType.MODIFIED, "b", "b"),
        (PodEventType.DELETED, "d", "d"),
        (PodEventType.ADDED, "d", "d2"),
        (PodEventType.ADDED, "e", "e"),
        (PodEventType.DELETED, "c", "c"),
    ]


def test_top_labels_most_common_first_without_hash_noise() -> None:
    labels = [{"app": "web", "pod-template-hash": "1"}, {"app": "web", "tier": "x"},
              {"app": "db"}]

    assert top_labels(labels) == ["app=web", "app=db", "tier=x"]


def test_rbac_refusal_names_verb_resource_namespace_and_the_way_out() -> None:
    error = api_error(403, {"message": 'pods is forbidden: User "v" cannot create ...'},
                      Action("create", "pods", "demo"))

    assert isinstance(error, RefusedError)
    assert str(error) == ("You may not create pods in namespace demo (RBAC): ask for `create` "
                          "on `pods` there, or use a kubeconfig that has it.")


def test_pod_security_refusal_names_the_level() -> None:
    message = ('pods "p" is forbidden: violates PodSecurity "restricted:latest": privileged '
               '(container "c" must not set securityContext.privileged=true)')

    error = api_error(403, {"message": message}, Action("create", "pods", "restricted"))

    assert isinstance(error, RefusedError)
    assert "Namespace restricted enforces Pod Security level 'restricted'" in str(error)
    assert "securityContext.privileged=true" in str(error)
    assert "pod-security.kubernetes.io/enforce=privileged" in str(error)


def test_other_failures_are_cluster_errors_with_the_server_message() -> None:
    error = api_error(500, {"message": "etcd timeout"}, Action("list", "pods", None))

    assert isinstance(error, ClusterError)
    assert "etcd timeout" in str(error) and "cluster-wide" in str(error)


def test_kubeconfig_paths_follow_kubectl(tmp_path: Path) -> None:
    a, b, missing = tmp_path / "a", tmp_path / "b", tmp_path / "missing"
    a.write_text("{}")
    b.write_text("{}")
    environ = {"KUBECONFIG": os.pathsep.join([str(a), str(missing), str(b)])}

    assert kubeconfig_paths(None, environ) == [a, b]
    assert kubeconfig_paths(str(b), environ) == [b]
    with pytest.raises(UsageError, match="does not exist"):
        kubeconfig_paths(str(missing), environ)


def test_a_pod_the_kubelet_rejected_is_an_error_with_its_reason_not_a_wait() -> None:
    rejected = {"metadata": {"name": "msnf-agent-x", "namespace": "capture"},
                "status": {"phase": "Failed", "reason": "OutOfcpu",
                           "message": "Pod Node didn't have enough resource: cpu"}}
    with pytest.raises(ClusterError) as caught:
        _settled(rejected, PodRef("capture", "msnf-agent-x"), "agent")
    assert str(caught.value) == ("Pod capture/msnf-agent-x failed before its container agent "
                                 "ran: Pod Node didn't have enough resource: cpu.")
    pending = {"metadata": {}, "status": {"phase": "Pending"}}
    assert _settled(pending, PodRef("capture", "msnf-agent-x"), "agent") is False
