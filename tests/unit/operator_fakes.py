"""What the operator's unit tests run a Reconciler against: FakeKube answers the KubeApi calls a
pass makes from memory and counts them; trace() and reconciler() make the objects."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Optional

from retransmit_operator.kube import ApiFailure
from retransmit_operator.metrics import OperatorMetrics
from retransmit_operator.reconciler import Reconciler
from retransmit_operator.settings import Settings

NS = "retransmit-system"


class FakeKube:
    """The KubeApi calls a pass makes, answered from memory, each one counted."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.daemonsets: dict[str, dict[str, Any]] = {}
        self.traces: dict[str, dict[str, Any]] = {}
        self._versions = itertools.count(100)
        self._uids = itertools.count(1)

    def _count(self, call: str) -> None:
        self.calls[call] = self.calls.get(call, 0) + 1

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)

    async def get_daemonset(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        self._count("get_daemonset")
        found = self.daemonsets.get(name)
        return copy.deepcopy(found) if found else None

    async def list_agent_daemonsets(self, namespace: str) -> list[dict[str, Any]]:
        self._count("list_agent_daemonsets")
        return copy.deepcopy(list(self.daemonsets.values()))

    async def apply_daemonset(self, body: dict[str, Any]) -> dict[str, Any]:
        self._count("apply_daemonset")
        name = body["metadata"]["name"]
        uid = (self.daemonsets.get(name) or {}).get("metadata", {}).get("uid") or f"ds-uid-{next(self._uids)}"
        self.daemonsets[name] = {**copy.deepcopy(body), "status": {"desiredNumberScheduled": 2}}
        self.daemonsets[name]["metadata"]["uid"] = uid
        return self._stamp(self.daemonsets[name])

    async def annotate_daemonset(self, namespace: str, name: str, annotations: dict[str, Optional[str]]) -> dict[str, Any]:
        self._count("annotate_daemonset")
        meta = self.daemonsets[name]["metadata"]
        meta["annotations"] = {k: v for k, v in {**meta.get("annotations", {}), **annotations}.items() if v is not None}
        return self._stamp(self.daemonsets[name])

    async def delete_daemonset(self, namespace: str, name: str) -> bool:
        self._count("delete_daemonset")
        return self.daemonsets.pop(name, None) is not None

    async def apply_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self._count("apply_status")
        if name not in self.traces:
            raise ApiFailure("apply status", 404, "NotFound", "not found")
        self.traces[name]["status"] = status
        return self._stamp(self.traces[name])

    async def apply_report_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._count("apply_report_status")

    async def post_event(self, trace: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self._count("post_event")


def trace(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
            "metadata": {"name": name, "uid": uid, "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {}}


def reconciler(kube: FakeKube, *traces: dict[str, Any], **settings: Any) -> Reconciler:
    r = Reconciler(Settings(namespace=NS, **settings), kube, OperatorMetrics())   # type: ignore[arg-type]
    r.reports.replace([])
    r.reports.replace_heartbeats([])
    for body in traces:
        kube.traces[body["metadata"]["name"]] = copy.deepcopy(body)
        r.observe_trace("ADDED", body)
    return r
