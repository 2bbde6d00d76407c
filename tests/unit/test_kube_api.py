"""Pure parts of the Kubernetes client: pods and nodes from JSON, container states, re-list
differences, label summaries, errors by status and their sentences, kubeconfig paths. No
cluster, no client library objects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from multisniff.errors import (
    ApiError,
    ApiRequest,
    ClusterError,
    Conflict,
    ExitCode,
    Forbidden,
    Gone,
    Invalid,
    NamespaceNotFound,
    NotFound,
    PodSecurityRefused,
    RefusedError,
    Unauthorized,
    Unavailable,
    Unreachable,
    UsageError,
)
from multisniff.kube.api import (
    _settled,
    api_error,
    container_state,
    kubeconfig_paths,
    node_info,
    pod_changes,
    pod_info,
    top_labels,
)
from multisniff.kube.execstream import handshake_refusal
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
                      ApiRequest("create", "pods", "demo"))

    assert isinstance(error, RefusedError)
    assert str(error) == ("You may not create pods in namespace demo (RBAC): ask for `create` "
                          "on `pods` there, or use a kubeconfig that has it.")


def test_pod_security_refusal_names_the_level() -> None:
    message = ('pods "p" is forbidden: violates PodSecurity "restricted:latest": privileged '
               '(container "c" must not set securityContext.privileged=true)')

    error = api_error(403, {"message": message}, ApiRequest("create", "pods", "restricted"))

    assert isinstance(error, PodSecurityRefused) and isinstance(error, RefusedError)
    assert "Namespace restricted enforces Pod Security level 'restricted'" in str(error)
    assert "securityContext.privileged=true" in str(error)
    assert "pod-security.kubernetes.io/enforce=privileged" in str(error)


def test_other_failures_are_cluster_errors_with_the_server_message() -> None:
    error = api_error(500, {"message": "etcd timeout"}, ApiRequest("list", "pods", None))

    assert isinstance(error, ClusterError)
    assert "etcd timeout" in str(error) and "cluster-wide" in str(error)


PATCH = ApiRequest("patch", "pods/ephemeralcontainers", "demo", "web-1")


@pytest.mark.parametrize(("status", "kind", "base", "exit_code"), [
    (401, Unauthorized, RefusedError, ExitCode.REFUSED),
    (403, Forbidden, RefusedError, ExitCode.REFUSED),
    (404, NotFound, ClusterError, ExitCode.NOTHING),
    (409, Conflict, ClusterError, ExitCode.NOTHING),
    (410, Gone, ClusterError, ExitCode.NOTHING),
    (422, Invalid, ClusterError, ExitCode.NOTHING),
    (429, Unavailable, ClusterError, ExitCode.NOTHING),
    (500, Unavailable, ClusterError, ExitCode.NOTHING),
    (503, Unavailable, ClusterError, ExitCode.NOTHING),
    (400, ApiError, ApiError, ExitCode.NOTHING),
])
def test_each_status_is_its_own_type_with_the_request_it_failed(
        status: int, kind: type, base: type, exit_code: ExitCode) -> None:
    error = api_error(status, {"message": "the server's words", "details": {"name": "web-1"}},
                      PATCH)

    assert type(error) is kind and isinstance(error, base)
    assert error.exit_code == exit_code
    assert (error.status, error.request, error.detail) == (status, PATCH, "the server's words")
    assert str(error).endswith(".") and "\n" not in str(error)


def test_the_sentences_name_the_request_and_the_way_out() -> None:
    def sentence(status: int, message: str = "") -> str:
        return str(api_error(status, {"message": message, "details": {"name": "web-1"}},
                             PATCH))

    assert sentence(401) == ("The API server did not accept our credentials (401 "
                             "Unauthorized): log in again, or check --kubeconfig/--context.")
    assert sentence(403) == (
        "You may not patch pods/ephemeralcontainers in namespace demo (RBAC): ask for `patch` "
        "on `pods/ephemeralcontainers` there, or use a kubeconfig that has it.")
    assert sentence(404, 'pods "web-1" not found') == (
        'Cannot patch pods/ephemeralcontainers web-1 in namespace demo: pods "web-1" not '
        "found; check the name.")
    assert sentence(409, "the object has been modified") == (
        "The API server failed to patch pods/ephemeralcontainers web-1 in namespace demo "
        "(409): the object has been modified; try again, or check the API server's health.")
    assert sentence(422, "spec.ephemeralContainers[0].name: Required value") == (
        "The API server rejected the pods/ephemeralcontainers we sent as invalid: "
        "spec.ephemeralContainers[0].name: Required value; this is a bug in multisniff, "
        "please report it.")


def test_a_missing_ephemeralcontainers_subresource_points_to_the_upload_mode() -> None:
    # Unlike a missing pod, a missing subresource has no name in the details (as kubectl tells).
    error = api_error(404, {"message": "the server could not find the requested resource",
                            "details": {}}, PATCH)

    assert isinstance(error, NotFound)
    assert str(error).startswith("This cluster does not serve pods/ephemeralcontainers")
    assert str(error).endswith("use --mode upload.")


def test_a_missing_namespace_is_a_refusal_with_the_namespaces_there() -> None:
    request = ApiRequest("create", "pods", "shop")

    listed = NamespaceNotFound(request, existing=["default", "demo"])
    unlisted = NamespaceNotFound(request)

    assert isinstance(listed, NotFound) and isinstance(listed, RefusedError)
    assert listed.exit_code == ExitCode.REFUSED
    assert str(listed) == "Namespace shop does not exist; namespaces here: default, demo."
    assert str(unlisted) == ("Namespace shop does not exist; check -n/--namespace (kubectl get "
                             "namespaces lists them).")


def test_an_exec_handshake_refusal_is_the_same_type_and_sentence() -> None:
    pod = PodRef("demo", "web-1")

    forbidden = handshake_refusal(403, pod, "app", "Forbidden")
    unauthorized = handshake_refusal(401, pod, "app", "Unauthorized")
    missing = handshake_refusal(404, pod, "app", "Not Found")
    broken = handshake_refusal(503, pod, "app", "Service Unavailable")

    assert isinstance(forbidden, Forbidden) and str(forbidden) == (
        "You may not create pods/exec in namespace demo (RBAC): ask for `create` (and `get`) "
        "on `pods/exec` there, or use a kubeconfig that has it.")
    assert isinstance(unauthorized, Unauthorized)
    assert str(unauthorized) == str(api_error(401, {}, PATCH))
    assert isinstance(missing, NotFound) and "pod demo/web-1 or its container app" in str(missing)
    assert isinstance(broken, Unavailable) and broken.status == 503


def test_an_unreachable_api_server_names_its_address() -> None:
    error = Unreachable(ApiRequest("list", "pods", "demo"), host="https://10.0.0.1:6443",
                        detail="Connection refused")

    assert isinstance(error, ClusterError) and error.status is None
    assert str(error) == ("Cannot reach the Kubernetes API at https://10.0.0.1:6443: "
                          "Connection refused; check --context/--kubeconfig.")


def test_node_info_has_the_addresses_its_traffic_comes_from() -> None:
    node = node_info({
        "metadata": {"name": "node-1"},
        "spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24", "fd10:3::/64"]},
        "status": {"nodeInfo": {"architecture": "arm64", "operatingSystem": "linux"},
                   "addresses": [{"type": "Hostname", "address": "node-1"},
                                 {"type": "ExternalIP", "address": "203.0.113.9"},
                                 {"type": "InternalIP", "address": "10.0.0.1"},
                                 {"type": "InternalIP", "address": "fd00::1"},
                                 {"type": "InternalDNS", "address": "node-1.internal"}]}})

    assert (node.name, node.architecture, node.internal_ip) == ("node-1", "arm64", "10.0.0.1")
    assert node.addresses == ("10.0.0.1", "fd00::1", "203.0.113.9", "10.244.3.1", "fd10:3::1")
    assert node_info({"spec": {"podCIDR": "10.9.9.9/32"}}).addresses == ()


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
