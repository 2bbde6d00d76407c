"""The parts of kubernetes-asyncio that multisniff uses, loaded without the ~700 generated models.

Why: `kubernetes_asyncio/__init__.py` and `kubernetes_asyncio/client/__init__.py` import every
generated API class and every generated model. Measured with kubernetes-asyncio 36.1 on CPython
3.11 (`python -X importtime -c 'import multisniff.kube.api'`): kubernetes_asyncio cost ~290 ms,
of which `client.models` (~700 modules) was 173 ms and `client.api` (~60 modules) most of the
rest, and the whole import took ~0.68 s of CPU. multisniff never builds or deserializes a model
(every request passes `_preload_content=False` and reads plain JSON), and it calls two of the
generated APIs. A CLI measured against kubectl pays that on every start.

How: before anything imports kubernetes_asyncio, the four package modules whose `__init__` pulls
in everything (`kubernetes_asyncio`, `.client`, `.client.api`, `.client.models`) are put in
`sys.modules` as real, correctly specced packages (own `__spec__`, `__path__`, `__file__`) whose
`__init__` has not run yet. Their submodules import normally through `__path__`, so the few this
package needs are imported one by one and the names other kubernetes_asyncio modules take from
`kubernetes_asyncio.client` (`ApiClient`, `Configuration`) are set on it.

Nothing is lost for another user of kubernetes_asyncio in the same process: a name that such a
package does not have yet is looked up by `_DeferredInit` (the module's `__getattr__`), which
imports it when it is a submodule, imports just the one model module when it is a model class
(`V1Pod` -> `models/v1_pod.py`, the deserialize path of `ApiClient`), and otherwise runs the
package's own `__init__` once, after which the package is what a plain import would have made.
When kubernetes_asyncio is already imported, or this cannot be set up, the plain import is used.

Everything in `multisniff.kube` takes the client from here (`k8s`, `k8s_config`, `ApiException`,
`WsApiClient`), so this module runs before any other import of kubernetes_asyncio.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import threading
import types
from typing import Any

__all__ = ["ApiException", "WsApiClient", "k8s", "k8s_config"]

logger = logging.getLogger(__name__)

ROOT = "kubernetes_asyncio"
MODELS = "kubernetes_asyncio.client.models"
DEFERRED_PACKAGES = (ROOT, "kubernetes_asyncio.client", "kubernetes_asyncio.client.api", MODELS)
"""Parents before children: each is found through the `__path__` of the one before."""
CLIENT_NAMES = {
    "Configuration": "kubernetes_asyncio.client.configuration",
    "ApiClient": "kubernetes_asyncio.client.api_client",
    "ApiException": "kubernetes_asyncio.client.exceptions",
    "CoreV1Api": "kubernetes_asyncio.client.api.core_v1_api",
    "AuthorizationV1Api": "kubernetes_asyncio.client.api.authorization_v1_api",
}
"""What `kubernetes_asyncio.client` must have before its `__init__` runs, and where it lives."""


def model_module_name(class_name: str) -> str:
    """The generator's file name for a model class: `V1Pod` -> `v1_pod`, `V1APIGroup` ->
    `v1_api_group`, `V1alpha1ClusterTrustBundle` -> `v1alpha1_cluster_trust_bundle`."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


class _DeferredInit:
    """`__getattr__` of a package registered before its `__init__` ran: see the module docstring.

    A name asked for while the `__init__` is running is missing, as in any module being imported.
    """

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module
        self._lock = threading.RLock()
        self._state = "deferred"  # -> "running" -> "done"

    def __call__(self, name: str) -> Any:
        module = self._module
        if name.isidentifier() and self._state == "deferred":
            value = self._submodule(name)
            if value is None and module.__name__ == MODELS and name[:1].isupper():
                value = getattr(self._submodule(model_module_name(name)), name, None)
            if value is not None:
                setattr(module, name, value)
                return value
        with self._lock:
            if self._state == "deferred":
                self._run_init()
        try:
            return module.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None

    def _submodule(self, name: str) -> types.ModuleType | None:
        fullname = f"{self._module.__name__}.{name}"
        if fullname not in sys.modules and importlib.util.find_spec(fullname) is None:
            return None
        return importlib.import_module(fullname)

    def _run_init(self) -> None:
        spec = self._module.__spec__
        assert spec is not None and spec.loader is not None  # checked when it was registered
        logger.debug("running the deferred __init__ of %s", self._module.__name__)
        self._state = "running"
        try:
            spec.loader.exec_module(self._module)
        except BaseException:
            self._state = "deferred"
            raise
        self._state = "done"


def _register_deferred(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not a package that can be loaded from files", name=name)
    module = importlib.util.module_from_spec(spec)
    module.__getattr__ = _DeferredInit(module)  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def _load_without_models() -> bool:
    """Set up the slim kubernetes_asyncio; False (and nothing changed) when the plain import
    is to be used instead."""
    if any(name == ROOT or name.startswith(ROOT + ".") for name in sys.modules):
        return False
    try:
        for package in DEFERRED_PACKAGES:
            _register_deferred(package)
        client = sys.modules["kubernetes_asyncio.client"]
        for attribute, module_name in CLIENT_NAMES.items():
            setattr(client, attribute, getattr(importlib.import_module(module_name), attribute))
    except Exception:
        logger.debug("loading kubernetes_asyncio in full: the slim loading failed", exc_info=True)
        for name in [name for name in sys.modules if name == ROOT or name.startswith(ROOT + ".")]:
            del sys.modules[name]
        return False
    return True


SLIM = _load_without_models()
"""Whether this process runs kubernetes_asyncio without its generated models and APIs."""

# These imports must come after the loading above (E402 on purpose).
from kubernetes_asyncio import client as k8s  # noqa: E402
from kubernetes_asyncio import config as k8s_config  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402
from kubernetes_asyncio.stream import WsApiClient  # noqa: E402
