"""The agent's I/O edge to the API server: this node's RetransmitNodeReport and its heartbeat Lease.

`ReportWriter` reads this node's report, creates it, server-side applies it with field manager
`rtrace-agent/<node>` and force, reads back its metadata (is it still there, whose is it),
takes over an earlier trace's report of the same name, renews its heartbeat Lease and reads
the DaemonSet's node count; nothing else. What to write and when are pure functions (nodeentry, writeschedule).
A report is a few KB, so one write costs the API server the same at 10 nodes and at 5,000;
the schedule bounds how many there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Optional

from retransmit_core.api import GROUP, REPORT_PLURAL, VERSION, NodeStatus
from retransmit_core.apierrors import no_answer, server_message
from retransmit_core.naming import (
    LEASE_GROUP,
    LEASE_PLURAL,
    LEASE_VERSION,
    daemonset_name,
    heartbeat_object,
    heartbeat_renewal,
    report_name,
    report_object,
)
from retransmit_core.schedule import WRITE_TIMEOUT_SECONDS, desired_nodes


FIELD_MANAGER_PREFIX = "rtrace-agent/"
# The Accept header of a metadata-only read (what client-go's metadata client sends).
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def field_manager(node: str) -> str:
    """Each node's agent is its own server-side-apply writer."""
    return f"{FIELD_MANAGER_PREFIX}{node}"


class ApiError(Exception):
    """A failed API call, with the HTTP status when there was one (0 = no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


@dataclass(frozen=True)
class ReportTarget:
    """Which report this agent writes: its trace (name and uid, for the ownerReference), its
    node and the namespace reports live in (the agent pod's own)."""

    trace: str
    trace_uid: str
    node: str
    namespace: str

    @property
    def name(self) -> str:
        return report_name(self.trace, self.node)

    def body(self, entry: NodeStatus) -> dict[str, Any]:
        return report_object(self.trace, self.trace_uid, self.node, self.namespace, entry)


class ReportWriter:
    """Every API call of the agent but the pod watch's (podwatch.py): the report, its Lease, the node count."""

    def __init__(self, api_client: Any, target: ReportTarget, timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        from kubernetes import client

        self._objects = client.CustomObjectsApi(api_client)
        self.target = target
        self._timeout = timeout

    def _call(self, request: Callable[[], Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            result = request()
        except ApiException as exc:
            raise ApiError(exc.status or 0, server_message(exc.body, exc.reason or str(exc))[:500]) from None
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, TLS: no answer
            raise ApiError(0, f"the API server did not answer ({no_answer(exc)})") from None
        return result if isinstance(result, dict) else {}

    def read(self) -> Optional[dict[str, Any]]:
        """The stored report, or None when there is none yet."""
        t = self.target
        try:
            return self._call(lambda: self._objects.get_namespaced_custom_object(
                GROUP, VERSION, t.namespace, REPORT_PLURAL, t.name, _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def read_metadata(self) -> Optional[dict[str, Any]]:
        """The stored report's metadata only (PartialObjectMetadata: no spec, a few hundred
        bytes), from the API server's watch cache (resourceVersion=0: no etcd read), or None
        when there is none. What a quiet node reads to learn that its report was deleted."""
        t = self.target
        api = self._objects.api_client

        def get() -> Any:
            # The generated get_namespaced_custom_object takes no query parameters: the same
            # request built as it builds it, plus resourceVersion=0 and the Accept header.
            request = api.param_serialize(
                method="GET", resource_path=f"/apis/{GROUP}/{VERSION}/namespaces/{t.namespace}/{REPORT_PLURAL}/{t.name}",
                query_params=[("resourceVersion", "0")], header_params={"Accept": PARTIAL_METADATA},
                auth_settings=["BearerToken"])
            response = api.call_api(*request, _request_timeout=self._timeout)
            response.read()
            return api.response_deserialize(response, {"200": "object"}).data   # raises ApiException unless 2xx

        try:
            return self._call(get)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def replace(self, stored: dict[str, Any], entry: NodeStatus) -> dict[str, Any]:
        """Take over `stored`, a report of an earlier trace of the same name that the garbage
        collector has not removed yet: owner, labels and spec replaced whole (`entry`), in one
        JSON patch that applies only while the stored object is that one (a test of its uid).
        A patch, not a delete and create: the agent may only get, create and patch reports."""
        t = self.target
        body = t.body(entry)
        ops = [{"op": "test", "path": "/metadata/uid", "value": (stored.get("metadata") or {}).get("uid")},
               {"op": "replace", "path": "/metadata/ownerReferences", "value": body["metadata"]["ownerReferences"]},
               {"op": "replace", "path": "/metadata/labels", "value": body["metadata"]["labels"]},
               {"op": "replace", "path": "/spec", "value": body["spec"]}]
        return self._call(lambda: self._objects.patch_namespaced_custom_object(
            GROUP, VERSION, t.namespace, REPORT_PLURAL, t.name, ops,
            field_manager=field_manager(t.node), _content_type="application/json-patch+json",
            _request_timeout=self._timeout))

    def create(self, entry: NodeStatus) -> dict[str, Any]:
        """Create the report (labels, owner, first content) and return it; when it exists
        already (made since it was read), the stored one: it is the baseline."""
        t = self.target
        try:
            return self._call(lambda: self._objects.create_namespaced_custom_object(
                GROUP, VERSION, t.namespace, REPORT_PLURAL, t.body(entry),
                field_manager=field_manager(t.node), _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status != 409:
                raise
        stored = self.read()
        if stored is None:
            raise ApiError(409, f"report {t.name} was created and deleted meanwhile: retried")
        return stored

    def apply(self, entry: NodeStatus, timeout: Optional[float] = None) -> dict[str, Any]:
        """Server-side apply of the whole report (this agent is its only writer of spec); it
        creates the report when it is gone. `timeout`: this call's, instead of the writer's."""
        t = self.target
        return self._call(lambda: self._objects.patch_namespaced_custom_object(
            GROUP, VERSION, t.namespace, REPORT_PLURAL, t.name, t.body(entry),
            field_manager=field_manager(t.node), force=True,
            _content_type="application/apply-patch+yaml", _request_timeout=timeout or self._timeout))

    def heartbeat(self, renewed: datetime, duration_seconds: int) -> None:
        """Renew this report's heartbeat Lease (a merge patch of renewTime); create it the
        first time. The Lease is what keeps a quiet node reporting at ~1/10 of a report's cost."""
        t = self.target
        renew = lambda: self._objects.patch_namespaced_custom_object(  # noqa: E731
            LEASE_GROUP, LEASE_VERSION, t.namespace, LEASE_PLURAL, t.name, heartbeat_renewal(renewed),
            field_manager=field_manager(t.node), _content_type="application/merge-patch+json",
            _request_timeout=self._timeout)
        try:
            self._call(renew)
            return
        except ApiError as exc:
            if exc.status != 404:
                raise
        try:
            self._call(lambda: self._objects.create_namespaced_custom_object(
                LEASE_GROUP, LEASE_VERSION, t.namespace, LEASE_PLURAL,
                heartbeat_object(t.trace, t.trace_uid, t.node, t.namespace, renewed, duration_seconds),
                field_manager=field_manager(t.node), _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.status != 409:
                raise
            self._call(renew)   # created meanwhile (an earlier agent's write that timed out)

    def desired_nodes(self) -> Optional[int]:
        """The agent count the write schedule stretches by (core/schedule.desired_nodes): the
        cluster-wide count of every running trace's agents the operator wrote on this trace's
        DaemonSet, or this DaemonSet's own desiredNumberScheduled if larger; None until either
        is known."""
        t = self.target
        return desired_nodes(self._call(lambda: self._objects.get_namespaced_custom_object(
            "apps", "v1", t.namespace, "daemonsets", daemonset_name(t.trace), _request_timeout=self._timeout)))
