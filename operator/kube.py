"""Every Kubernetes API call the operator makes (besides kopf's own watches), in one place.

The kubernetes client is synchronous; KubeApi runs each call in a worker thread so kopf's
event loop never blocks. Writes use server-side apply with the operator's own field manager.
The nodes' reports, their heartbeat Leases and the agents' DaemonSets come from three
label-selected watches in the operator's namespace (`watch_reports`, `watch_heartbeats`,
`watch_daemonsets`, a thread each), whatever the number of traces: never one per trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import kopf
import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from retransmit_core.api import API_VERSION, GROUP, KIND, PLURAL, REPORT_KIND, REPORT_PLURAL, VERSION
from retransmit_core.apierrors import no_answer, server_message
from retransmit_core.naming import AGENTS_SELECTOR, HEARTBEATS_SELECTOR, LEASE_GROUP, LEASE_PLURAL, LEASE_VERSION, REPORTS_SELECTOR
from retransmit_core.watch import list_then_watch

from .conditions import utcnow
from .metrics import OperatorMetrics

FIELD_MANAGER = "rtrace-operator"
# Events about cluster-scoped objects live in "default" with an empty involvedObject.namespace:
# that is what the API server's validation allows and what `kubectl describe` searches.
EVENTS_NAMESPACE = "default"
APPLY = "application/apply-patch+yaml"
# Seconds any one API call of the operator may take before it counts as failed (and is retried
# by the next pass).
API_TIMEOUT_SECONDS = 30.0

log = logging.getLogger(__name__)


def client_configuration(kubeconfig: Optional[str]) -> kubernetes.client.Configuration:
    """The API server and credentials: the kubeconfig given, else in-cluster, else ~/.kube/config."""
    cfg = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    return cfg


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration KubeApi uses (as kopf.login_via_client)."""
    if cfg.refresh_api_key_hook is not None:
        cfg.refresh_api_key_hook(cfg)  # re-read a rotated service-account token
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@dataclass(frozen=True)
class ApiFailure(Exception):
    """An API call failed; `permanent` when retrying the same request cannot help (4xx but
    conflicts and throttling)."""

    operation: str
    status: int
    reason: str
    message: str

    @property
    def permanent(self) -> bool:
        return 400 <= self.status < 500 and self.status not in (408, 409, 429)

    @property
    def fix(self) -> str:
        if self.status == 403:
            return ("the operator's ClusterRole lacks this permission: install the RBAC of the same release "
                    "(helm upgrade, or kubectl apply -f manifests/)")
        if self.status == 0 or self.status >= 500 or self.status in (408, 409, 429):
            return "retried with backoff"
        return ""

    def __str__(self) -> str:
        answer = f"HTTP {self.status} {self.reason}".rstrip() if self.status else "no answer"
        text = f"{self.operation} failed ({answer}): {self.message}"
        return f"{text}; {self.fix}" if self.fix else text


def _failure(operation: str, e: ApiException) -> ApiFailure:
    return ApiFailure(operation, e.status or 0, e.reason or "", server_message(e.body, e.reason or ""))


class KubeApi:
    """Every call has a timeout (`timeout` seconds unless the call sets its own): an API server
    that accepts a connection and never answers must not stall a pass over the traces."""

    def __init__(self, cfg: kubernetes.client.Configuration, metrics: Optional[OperatorMetrics] = None,
                 timeout: float = API_TIMEOUT_SECONDS) -> None:
        self.cfg = cfg
        self._metrics = metrics
        self._timeout = timeout
        self._client = kubernetes.client.ApiClient(cfg)
        self._apps = kubernetes.client.AppsV1Api(self._client)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()

    @property
    def client(self) -> kubernetes.client.ApiClient:
        """The API client behind every call (the leader election shares its connections)."""
        return self._client

    def close(self) -> None:
        self._client.close()

    async def _call(self, operation: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        code = "200"
        kwargs.setdefault("_request_timeout", self._timeout)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as e:
            code = str(e.status or 0)
            raise _failure(operation, e) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            code = "0"
            raise ApiFailure(operation, 0, "NoAnswer", f"the API server did not answer ({no_answer(e)})") from None
        finally:
            if self._metrics is not None:
                self._metrics.api_requests.labels(operation=operation, code=code).inc()

    # ------------------------------------------------------------ DaemonSet

    async def get_daemonset(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return await self._call("get daemonset", self._get_daemonset, namespace, name)
        except ApiFailure as e:
            if e.status == 404:
                return None
            raise

    def _get_daemonset(self, namespace: str, name: str, _request_timeout: float) -> dict[str, Any]:
        return self._apps.api_client.sanitize_for_serialization(
            self._apps.read_namespaced_daemon_set(name, namespace, _request_timeout=_request_timeout))

    async def list_agent_daemonsets(self, namespace: str) -> list[dict[str, Any]]:
        """Every trace's agents' DaemonSet in the operator's namespace (their slots)."""
        listed = await self._call("list daemonsets", self._apps.list_namespaced_daemon_set, namespace,
                                  label_selector=AGENTS_SELECTOR, _preload_content=False)
        return list(json.loads(listed.data).get("items") or [])

    async def apply_daemonset(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        result = await self._call(
            "apply daemonset", self._apps.patch_namespaced_daemon_set, meta["name"], meta["namespace"], body,
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
        )
        return self._client.sanitize_for_serialization(result)

    async def annotate_daemonset(self, namespace: str, name: str, annotations: dict[str, Optional[str]]
                                 ) -> dict[str, Any]:
        """Set (None: remove) annotations of a DaemonSet, metadata only: its pods do not roll.
        Returns the DaemonSet as written."""
        result = await self._call("annotate daemonset", self._apps.patch_namespaced_daemon_set, name, namespace,
                                  {"metadata": {"annotations": annotations}}, field_manager=FIELD_MANAGER,
                                  _content_type="application/merge-patch+json")
        return self._client.sanitize_for_serialization(result)

    async def delete_daemonset(self, namespace: str, name: str) -> bool:
        """Delete it (pods follow in the background); False when it was already gone."""
        try:
            await self._call("delete daemonset", self._apps.delete_namespaced_daemon_set, name, namespace,
                             propagation_policy="Background")
            return True
        except ApiFailure as e:
            if e.status == 404:
                return False
            raise

    # ------------------------------------------------------------ the trace

    async def apply_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of the operator's status fields on /status (nothing else)."""
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "status": status}
        return await self._call(
            "apply status", self._custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, name, body,
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
        )

    async def apply_report_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Server-side apply of the operator's marks on a node's report (its /status)."""
        body = {"apiVersion": API_VERSION, "kind": REPORT_KIND, "metadata": {"name": name, "namespace": namespace},
                "status": status}
        await self._call(
            "apply report status", self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
            REPORT_PLURAL, name, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
        )

    # ------------------------------------------------------------ the reports' watch

    def watch_reports(self, namespace: str, index: Any, stop: threading.Event, timeout: int = 60) -> None:
        """Keep `index` (a ReportIndex) equal to the reports in `namespace` until `stop`."""
        self._mirror(namespace, (GROUP, VERSION, REPORT_PLURAL), REPORTS_SELECTOR, "node reports",
                     index.replace, index.observe, stop, timeout)

    def watch_heartbeats(self, namespace: str, index: Any, stop: threading.Event, timeout: int = 60) -> None:
        """Keep `index` (a ReportIndex) equal to the reports' heartbeat Leases in `namespace`."""
        self._mirror(namespace, (LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL), HEARTBEATS_SELECTOR, "node heartbeats",
                     index.replace_heartbeats, index.observe_heartbeat, stop, timeout)

    def watch_daemonsets(self, namespace: str, cache: Any, stop: threading.Event, timeout: int = 60) -> None:
        """Keep `cache` (a DaemonSetCache) equal to the agents' DaemonSets in `namespace`."""
        self._mirror(namespace, ("apps", "v1", "daemonsets"), AGENTS_SELECTOR, "agents' DaemonSets",
                     cache.replace, cache.observe, stop, timeout)

    def _mirror(self, namespace: str, resource: tuple[str, str, str], selector: str, what: str,
                replace: Callable[[list, Optional[str]], None], observe: Callable[..., None], stop: threading.Event,
                timeout: int) -> None:
        """Mirror one label-selected kind into `index` (retransmit_core.watch). Blocking: a thread.
        The custom-objects client reads any group's namespaced list as JSON, built-in kinds too."""
        from kubernetes import watch

        group, version, plural = resource

        def list_objects() -> dict[str, Any]:
            return self._custom.list_namespaced_custom_object(
                group, version, namespace, plural, label_selector=selector, _request_timeout=60)

        def watch_from(resource_version: Optional[str]) -> Any:
            return watch.Watch().stream(
                self._custom.list_namespaced_custom_object, group, version, namespace, plural,
                label_selector=selector, resource_version=resource_version, timeout_seconds=timeout,
                allow_watch_bookmarks=True, _request_timeout=timeout + 10)

        list_then_watch(list_objects, watch_from, replace, observe, stop, f"{what} in {namespace}")

    async def post_event(self, trace: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about the trace; failures are logged, never raised (events are best effort)."""
        meta = trace.get("metadata") or {}
        now = _timestamp()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:12]}", "namespace": EVENTS_NAMESPACE},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta.get("name"),
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": "retransmit.dev/operator",
            "reportingInstance": self._instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call("post event", self._core.create_namespaced_event, EVENTS_NAMESPACE, body)
        except ApiFailure as e:
            log.warning("event %s for %s not posted: %s", reason, meta.get("name"), e)


def _timestamp() -> str:
    return utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
