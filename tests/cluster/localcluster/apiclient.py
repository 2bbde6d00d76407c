"""Just enough of the Kubernetes API for clusterctl's own waits, as the admin, over urllib.

clusterctl stays stdlib-only so it runs before any virtualenv exists; anything bigger goes
through the kubectl built from the module.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from .layout import Layout


class ApiClient:
    def __init__(self, layout: Layout, *, identity: str = "admin", timeout: float = 5.0) -> None:
        self._base = layout.apiserver_url
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
        self._ssl.load_cert_chain(str(layout.pki / f"{identity}.crt"),
                                  str(layout.pki / f"{identity}.key"))

    def get(self, path: str) -> Any:
        """The decoded JSON at ``path``, or None for 404."""
        try:
            with urllib.request.urlopen(self._base + path, timeout=self._timeout,
                                        context=self._ssl) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self._base + path, timeout=self._timeout,
                                    context=self._ssl) as resp:
            return resp.read().decode()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(self._base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # already exists
                return None
            raise

    def ready(self) -> bool:
        try:
            return self.text("/readyz") == "ok"
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
            return False

    def node_ready(self, name: str) -> bool:
        try:
            node = self.get(f"/api/v1/nodes/{name}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        if not node:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node.get("status", {}).get("conditions", []))
