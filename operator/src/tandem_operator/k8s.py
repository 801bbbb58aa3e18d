"""`KubeClient`: the few Kubernetes API calls the reconciler makes (get, create, merge-patch, delete,
and one labelled list of a ModelDeployment's pods per pass).

Created once at operator start-up from the same credentials Kopf logs in with (`kopf.ConnectionInfo`:
in-cluster service account or kubeconfig), so the operator never holds two notions of "the cluster".
On 401 it logs in again once (bound service-account tokens rotate) and retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
FIELD_MANAGER = "tandem-operator"
USER_AGENT = "tandem-operator/0.1.0"

# kind -> (API prefix, plural)
RESOURCES = {
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("v1", "Pod"): ("/api/v1", "pods"),  # listed only (worker health), never written
}


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP status, `reason` the Status object's reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    if (api_version, kind) in RESOURCES:
        prefix, plural = RESOURCES[(api_version, kind)]
    else:
        from . import api

        if (api_version, kind) != (api.API_VERSION, api.KIND):
            raise KeyError(f"unknown kind {api_version}/{kind}")
        prefix, plural = f"/apis/{api.API_VERSION}", api.PLURAL
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name is not None else path


class ClientClosedError(Exception):
    """The operator is shutting down: the client was closed while a pass still ran."""


class KubeClient:
    def __init__(self, login: Callable[[], kopf.ConnectionInfo], timeout: float = 30.0) -> None:
        self._login = login
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def _ensure(self) -> tuple[aiohttp.ClientSession, kopf.ConnectionInfo]:
        if self._closed:
            raise ClientClosedError("the Kubernetes client is closed")
        if self._session is None or self._info is None:
            self._info = self._login()
            ssl: Any = self._info.as_ssl_context() if self._info.server.startswith("https") else None
            connector = aiohttp.TCPConnector(ssl=ssl) if ssl is not None else aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                headers={**self._info.as_http_headers(), "User-Agent": USER_AGENT},
                connector=connector,
                timeout=self._timeout,
            )
        return self._session, self._info

    async def close(self, final: bool = True) -> None:
        self._closed = self._closed or final
        if self._session is not None:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """JSON in, JSON out; None for 404 on GET/DELETE; ApiError for other failures."""
        try:
            return await self._request(method, path, body, content_type, params)
        except aiohttp.ClientConnectionError as e:
            if self._closed:  # closed under a running pass: the operator is stopping
                raise ClientClosedError(str(e)) from None
            raise

    async def _request(
        self, method: str, path: str, body: Any, content_type: str, params: dict[str, str] | None
    ) -> dict[str, Any] | None:
        for attempt in (0, 1):
            session, _ = await self._ensure()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            async with session.request(
                method, path.lstrip("/"), data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status == 401 and attempt == 0:
                    log.info("API answered 401: logging in again")
                    await self.close(final=False)
                    continue
                if resp.status == 404 and method in ("GET", "DELETE"):
                    return None
                if resp.status >= 300:
                    try:
                        status = json.loads(text)
                    except ValueError:
                        status = {}
                    raise ApiError(resp.status, status.get("reason", ""), status.get("message", text[:500]))
                return json.loads(text) if text else {}
        raise AssertionError("unreachable")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.request("GET", object_path(api_version, kind, namespace, name))

    async def list_objects(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[dict[str, Any]]:
        """The objects of one kind in one namespace that match `label_selector` ([] for 404).

        `resourceVersion=0` lets the API server answer from its watch cache instead of a quorum
        read from etcd: the reconciler lists on every pass, and a view a moment old is fine for it."""
        out = await self.request(
            "GET",
            object_path(api_version, kind, namespace),
            params={"labelSelector": label_selector, "resourceVersion": "0"},
        )
        return list((out or {}).get("items") or [])

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        out = await self.request("POST", path, obj, params={"fieldManager": FIELD_MANAGER})
        assert out is not None
        return out

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = object_path(api_version, kind, namespace, name)
        if subresource:
            path = f"{path}/{subresource}"
        out = await self.request("PATCH", path, patch, MERGE_PATCH, params={"fieldManager": FIELD_MANAGER})
        assert out is not None
        return out

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        await self.request(
            "DELETE",
            object_path(api_version, kind, namespace, name),
            {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )
