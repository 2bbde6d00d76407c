"""The errors multisniff tells its user about, and the exit code each one ends the process with.

Every class here carries a message that is one full sentence naming the problem and the way out.
Library errors are translated into these at the IO edge (``raise ... from exc``); the command line
prints the message and exits with the class's code, and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    """Exit codes, documented in the README; stable for scripts and CI."""

    OK = 0
    """Everything asked for was done: every input read, every target captured."""
    PARTIAL = 1
    """Output was written, but some of the input was damaged or some targets failed."""
    USAGE = 2
    """The command line or a profile is wrong; nothing was started."""
    NOTHING = 3
    """Nothing could be captured or read at all."""
    REFUSED = 4
    """The cluster refused (RBAC, Pod Security, no such namespace); nothing was started."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM ended the run early; what was captured until then is kept."""


class MultisniffError(Exception):
    """An error with a user-facing message and an exit code."""

    exit_code: ExitCode = ExitCode.NOTHING


class UsageError(MultisniffError):
    """The command line or a profile asks for something impossible."""

    exit_code = ExitCode.USAGE


class InputError(MultisniffError):
    """An input file cannot be opened or is not a capture at all."""

    exit_code = ExitCode.NOTHING


class OutputError(MultisniffError):
    """The output cannot be written (disk full, permission, closed pipe)."""

    exit_code = ExitCode.NOTHING


class RefusedError(MultisniffError):
    """The cluster said no: RBAC, Pod Security, or a namespace that does not exist."""

    exit_code = ExitCode.REFUSED


class ClusterError(MultisniffError):
    """The cluster cannot be reached, or it failed a request that it did not refuse."""

    exit_code = ExitCode.NOTHING


# --- the Kubernetes API -------------------------------------------------------------------------
# Raised by multisniff.kube with the client's exception chained; everybody above catches these
# types. Each class writes its own sentence from the request it failed, so a refusal reads the
# same whichever call met it.


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """What we asked the Kubernetes API to do, as the error sentences name it."""

    verb: str
    resource: str
    """As RBAC spells it: `pods`, `pods/exec`, `pods/ephemeralcontainers`, `nodes`."""
    namespace: str | None = None
    name: str = ""
    """The object asked for, if one was."""

    @property
    def where(self) -> str:
        return f"in namespace {self.namespace}" if self.namespace else "cluster-wide"

    @property
    def what(self) -> str:
        return f"{self.resource} {self.name}" if self.name else self.resource


class ApiError(MultisniffError):
    """A request to the Kubernetes API failed: `request` is what was asked, `status` the
    HTTP status (None when no answer came), `detail` the server's own message. The subclasses
    are the answers a caller may handle; this class itself is any other status."""

    status: int | None = None

    def __init__(self, request: ApiRequest, *, status: int | None = None, detail: str = "",
                 message: str | None = None) -> None:
        self.request = request
        if status is not None:
            self.status = status
        self.detail = detail.strip()
        super().__init__(message if message is not None else self.sentence())

    def sentence(self) -> str:
        request = self.request
        return (f"The API server failed to {request.verb} {request.what} {request.where} "
                f"({self.status}): {self.detail or 'no reason given'}; try again, or check "
                "the API server's health.")


class Unauthorized(ApiError, RefusedError):
    """401: the API server did not accept our credentials."""

    status = 401

    def sentence(self) -> str:
        return ("The API server did not accept our credentials (401 Unauthorized): log in "
                "again, or check --kubeconfig/--context.")


class Forbidden(ApiError, RefusedError):
    """403: RBAC refused the request."""

    status = 403

    def __init__(self, request: ApiRequest, *, status: int | None = None, detail: str = "",
                 message: str | None = None, also: Sequence[str] = (),
                 where: str | None = None) -> None:
        self.also = tuple(also)
        """Further verbs the same request may need (exec: `get`, on clusters before 1.31)."""
        self.where = where or request.where
        super().__init__(request, status=status, detail=detail, message=message)

    def sentence(self) -> str:
        verb, resource = self.request.verb, self.request.resource
        also = "".join(f" (and `{other}`)" for other in self.also)
        return (f"You may not {verb} {resource} {self.where} (RBAC): ask for `{verb}`{also} "
                f"on `{resource}` there, or use a kubeconfig that has it.")


class PodSecurityRefused(Forbidden):
    """403 from Pod Security admission: the namespace's level does not allow what we sent."""

    def __init__(self, request: ApiRequest, *, level: str, why: str, detail: str = "") -> None:
        self.level = level
        self.why = why.strip().rstrip(".")
        super().__init__(request, detail=detail)

    def sentence(self) -> str:
        return (f"Namespace {self.request.namespace} enforces Pod Security level "
                f"{self.level!r}, which refuses this ({self.why}); use a capture mode that "
                "needs no privileges there, or ask an admin to label the namespace "
                "pod-security.kubernetes.io/enforce=privileged.")


class NotFound(ApiError, ClusterError):
    """404: the object, its namespace, or the resource itself does not exist."""

    status = 404

    def sentence(self) -> str:
        request = self.request
        return (f"Cannot {request.verb} {request.what} {request.where}: "
                f"{self.detail or 'not found'}; check the name.")


class NamespaceNotFound(NotFound, RefusedError):
    """404 for the namespace itself: nothing can be done there (a refusal, exit 4)."""

    exit_code = ExitCode.REFUSED

    def __init__(self, request: ApiRequest, *, existing: Sequence[str] | None = None,
                 detail: str = "") -> None:
        self.existing = None if existing is None else tuple(existing)
        """The namespaces there are, when we could list them."""
        super().__init__(request, detail=detail)

    def sentence(self) -> str:
        namespace = self.request.namespace
        if self.existing is not None:
            return (f"Namespace {namespace} does not exist; namespaces here: "
                    f"{', '.join(self.existing)}.")
        return (f"Namespace {namespace} does not exist; check -n/--namespace "
                "(kubectl get namespaces lists them).")


class Conflict(ApiError, ClusterError):
    """409: the object changed under us, or exists already."""

    status = 409


class Gone(ApiError, ClusterError):
    """410: the resource version a watch started from is too old."""

    status = 410


class Invalid(ApiError, ClusterError):
    """422: the API server rejected what we sent; a bug of ours."""

    status = 422

    def sentence(self) -> str:
        return (f"The API server rejected the {self.request.resource} we sent as invalid: "
                f"{self.detail}; this is a bug in multisniff, please report it.")


class Unavailable(ApiError, ClusterError):
    """429 and 5xx: the API server is overloaded, restarting or failing; a retry may work."""


class Unreachable(ApiError, ClusterError):
    """No answer: the connection to the API server could not be made or broke."""

    def __init__(self, request: ApiRequest, *, host: str, detail: str) -> None:
        self.host = host
        super().__init__(request, detail=detail)

    def sentence(self) -> str:
        return (f"Cannot reach the Kubernetes API at {self.host or 'its address'}: "
                f"{self.detail}; check --context/--kubeconfig.")


def api_error_class(status: int) -> type[ApiError]:
    """The class for the HTTP status of a failed request."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return Unavailable if status == 429 or status >= 500 else ApiError


_BY_STATUS: dict[int, type[ApiError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 410: Gone, 422: Invalid}


class ContainerNotStarted(ClusterError):
    """A container did not come to run: `state` is the kubelet's (waiting, terminated) and
    `reason` its reason (ErrImagePull, CreateContainerError, Error, ...)."""

    IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull",
                               "InvalidImageName"})

    def __init__(self, message: str, *, pod: str, container: str, state: str,
                 reason: str = "", detail: str = "") -> None:
        self.pod = pod
        self.container = container
        self.state = state
        self.reason = reason
        self.detail = detail
        super().__init__(message)

    @property
    def image_unavailable(self) -> bool:
        """The node could not get the image, so the container never ran."""
        return self.state == "waiting" and self.reason in self.IMAGE_REASONS
