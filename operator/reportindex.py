"""What the operator knows of the nodes' RetransmitNodeReports and their heartbeat Leases:
an index fed by two label-selected watches (retransmit_operator.kube.KubeApi.watch_reports,
one per kind), read by each reconcile pass. Each report is parsed once per change, not once
per pass. A report's entry carries the later of its own lastReportTime and its Lease's
renewTime: the last time the node said "these counts are current".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Iterable, Optional

from pydantic import ValidationError

from .api import NodeReportStatus, NodeStatus
from .reports import TRACE_LABEL, heartbeat_of, well_named

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredReport:
    """One report as the operator uses it (recentEvents, the largest part, left out)."""

    namespace: str
    name: str
    trace: str
    owner_uids: frozenset[str]
    entry: NodeStatus
    status: NodeReportStatus


def parse_report(obj: dict[str, Any]) -> Optional[StoredReport]:
    """The report, or None when it is unusable (logged): misnamed for its node, unparsable."""
    meta = obj.get("metadata") or {}
    if not well_named(obj):
        log.warning("report %s/%s ignored: its name or node label does not match spec.node %r",
                    meta.get("namespace"), meta.get("name"), (obj.get("spec") or {}).get("node"))
        return None
    try:
        entry = NodeStatus.model_validate({k: v for k, v in (obj.get("spec") or {}).items() if k != "recentEvents"})
        status = NodeReportStatus.model_validate(obj.get("status") or {})
    except ValidationError as e:
        log.warning("report %s/%s ignored: %s", meta.get("namespace"), meta.get("name"), e.errors()[:1])
        return None
    return StoredReport(meta.get("namespace", ""), meta["name"], (meta.get("labels") or {})[TRACE_LABEL], _owners(meta), entry, status)


def _owners(meta: dict[str, Any]) -> frozenset[str]:
    """The uids of the object's controlling owners (its trace)."""
    return frozenset(ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller"))


def _later(a: Optional[datetime], b: Optional[datetime]) -> Optional[datetime]:
    return b if a is None or (b is not None and b > a) else a


class ReportIndex:
    """Reports and heartbeats by (namespace, name); thread-safe (the watches run in threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str], StoredReport] = {}
        # Heartbeat Leases: renewTime and owning trace uids (a Lease left by an earlier trace
        # of the same name must not vouch for this one's report).
        self._renewed: dict[tuple[str, str], tuple[datetime, frozenset[str]]] = {}
        self.events = 0  # watch events applied: tests and metrics see the watch working
        # Set once the first lists of both kinds are in: before that, no report means "not
        # seen yet" (aggregating would write zero counts over a trace's results), and no
        # heartbeat would make quiet nodes look stale.
        self.synced = threading.Event()
        self._listed: set[str] = set()

    def _listed_kind(self, kind: str) -> None:
        self._listed.add(kind)
        if self._listed >= {"reports", "heartbeats"}:
            self.synced.set()

    def observe(self, obj: dict[str, Any], deleted: bool = False) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        report = None if deleted else parse_report(obj)
        with self._lock:
            self.events += 1
            if report is None:
                self._reports.pop(key, None)
            else:
                self._reports[key] = report

    def replace(self, objs: Iterable[dict[str, Any]]) -> None:
        """After a (re)list: exactly these reports."""
        parsed = {}
        for obj in objs:
            report = parse_report(obj)
            if report is not None:
                parsed[(report.namespace, report.name)] = report
        with self._lock:
            self._reports = parsed
            self.events += 1
            self._listed_kind("reports")

    def observe_heartbeat(self, obj: dict[str, Any], deleted: bool = False) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        beat = None if deleted else heartbeat_of(obj)
        with self._lock:
            self.events += 1
            if beat is None:
                self._renewed.pop(key, None)
            else:
                self._renewed[key] = (beat[1], _owners(meta))

    def replace_heartbeats(self, objs: Iterable[dict[str, Any]]) -> None:
        """After a (re)list of the heartbeat Leases: exactly these."""
        renewed = {}
        for obj in objs:
            beat = heartbeat_of(obj)
            if beat is not None:
                meta = obj.get("metadata") or {}
                renewed[(meta.get("namespace", ""), beat[0])] = (beat[1], _owners(meta))
        with self._lock:
            self._renewed = renewed
            self.events += 1
            self._listed_kind("heartbeats")

    def _heard(self, report: StoredReport) -> StoredReport:
        """The report with lastReportTime moved to its Lease's renewal, when that is later."""
        renewed, owners = self._renewed.get((report.namespace, report.name), (None, frozenset()))
        heard = _later(report.entry.last_report_time, renewed if owners & report.owner_uids else None)
        if heard == report.entry.last_report_time:
            return report
        return replace(report, entry=report.entry.model_copy(update={"last_report_time": heard}))

    def for_trace(self, trace: str, uid: str) -> list[StoredReport]:
        """The reports of this very trace, by node name."""
        with self._lock:
            found = [self._heard(r) for r in self._reports.values() if r.trace == trace and uid in r.owner_uids]
        return sorted(found, key=lambda r: r.entry.node)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)
