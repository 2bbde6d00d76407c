"""`multisniff.kube` loads kubernetes-asyncio without its generated models and unused APIs
(`multisniff.kube.k8sclient`), and what it loads still works, for us and for anyone else.

Each check runs in a fresh interpreter: what counts is what one import leaves in `sys.modules`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_python(script: str) -> str:
    result = subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_the_kube_api_leaves_out_the_models_and_the_other_apis() -> None:
    out = run_python("""
        import sys
        import multisniff.kube.api
        from multisniff.kube import k8sclient
        assert k8sclient.SLIM
        loaded = set(sys.modules)
        models = [m for m in loaded if m.startswith('kubernetes_asyncio.client.models.')]
        assert models == [], models
        for unwanted in ('kubernetes_asyncio.client.api.apps_v1_api',
                         'kubernetes_asyncio.client.api.batch_v1_api',
                         'kubernetes_asyncio.dynamic', 'kubernetes_asyncio.watch'):
            assert unwanted not in loaded, unwanted
        print('OK')
    """)
    assert out.strip() == "OK"


def test_the_slim_client_builds_clients_and_still_deserializes_models() -> None:
    out = run_python("""
        import asyncio, json, sys, types
        from multisniff.kube.k8sclient import SLIM, WsApiClient, k8s

        async def main():
            configuration = k8s.Configuration()
            configuration.host = 'https://127.0.0.1:1'
            rest = k8s.ApiClient(configuration=configuration)
            ws = WsApiClient(configuration=configuration, heartbeat=None)
            k8s.CoreV1Api(rest), k8s.AuthorizationV1Api(rest), k8s.CoreV1Api(ws)
            pod = {'metadata': {'name': 'web-1', 'namespace': 'shop'},
                   'spec': {'containers': [{'name': 'web', 'image': 'nginx'}]}}
            decoded = rest.deserialize(types.SimpleNamespace(data=json.dumps(pod)), 'V1Pod')
            await rest.close()
            await ws.close()
            return decoded

        assert SLIM
        decoded = asyncio.run(main())
        import kubernetes_asyncio.client.models as models
        assert type(decoded) is models.V1Pod
        assert decoded.spec.containers[0].image == 'nginx'
        assert models.V1APIGroup.__module__ == 'kubernetes_asyncio.client.models.v1_api_group'
        loaded = [m for m in sys.modules if m.startswith('kubernetes_asyncio.client.models.')]
        assert 0 < len(loaded) < 10, loaded
        assert 'kubernetes_asyncio.client.api.apps_v1_api' not in sys.modules
        print('OK')
    """)
    assert out.strip() == "OK"


def test_a_later_plain_import_of_kubernetes_asyncio_gets_the_whole_package() -> None:
    out = run_python("""
        import multisniff.kube.api
        import kubernetes_asyncio
        from kubernetes_asyncio import client, watch
        from kubernetes_asyncio.client import AppsV1Api, V1Deployment
        from kubernetes_asyncio.client.api import BatchV1Api
        assert kubernetes_asyncio.__version__
        assert kubernetes_asyncio.dynamic.DynamicClient and watch.Watch
        assert AppsV1Api and BatchV1Api and V1Deployment
        assert all(hasattr(client, name) for name in client.__all__)
        assert client.CoreV1Api is multisniff.kube.api.k8s.CoreV1Api
        print('OK')
    """)
    assert out.strip() == "OK"


def test_kubernetes_asyncio_imported_first_is_used_as_it_is() -> None:
    out = run_python("""
        import sys
        import kubernetes_asyncio
        import multisniff.kube.api
        from multisniff.kube import k8sclient
        assert not k8sclient.SLIM
        assert multisniff.kube.api.k8s is sys.modules['kubernetes_asyncio.client']
        assert 'kubernetes_asyncio.client.models.v1_pod' in sys.modules
        print('OK')
    """)
    assert out.strip() == "OK"
