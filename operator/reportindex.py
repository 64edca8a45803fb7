"""What the operator knows of the nodes' RetransmitNodeReports: an index fed by its one
label-selected watch (retransmit_operator.kube.KubeApi.watch_reports), read by each
reconcile pass. Each report is parsed once per change, not once per pass.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from pydantic import ValidationError

from .api import NodeReportStatus, NodeStatus
from .reports import TRACE_LABEL, well_named
from .validation import format_error

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
        log.warning("report %s/%s ignored: its name or its node label does not match its spec.node (%s); "
                    "only the agent of that node writes it, so delete it", meta.get("namespace"), meta.get("name"),
                    (obj.get("spec") or {}).get("node") or "none")
        return None
    root = "spec"
    try:
        entry = NodeStatus.model_validate({k: v for k, v in (obj.get("spec") or {}).items() if k != "recentEvents"})
        root = "status"
        status = NodeReportStatus.model_validate(obj.get("status") or {})
    except ValidationError as e:
        log.warning("report %s/%s ignored: %s (written by an agent of another version?)",
                    meta.get("namespace"), meta.get("name"), format_error(e, root=root))
        return None
    uids = frozenset(ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller"))
    return StoredReport(meta.get("namespace", ""), meta["name"], (meta.get("labels") or {})[TRACE_LABEL], uids, entry, status)


class ReportIndex:
    """Reports by (namespace, name); thread-safe (the watch runs in its own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str], StoredReport] = {}
        self.events = 0  # watch events applied: tests and metrics see the watch working
        # Set once the first list is in: before that, no report means "not seen yet", and
        # aggregating would write zero counts over a trace's results.
        self.synced = threading.Event()

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
        self.synced.set()

    def for_trace(self, trace: str, uid: str) -> list[StoredReport]:
        """The reports of this very trace, by node name."""
        with self._lock:
            found = [r for r in self._reports.values() if r.trace == trace and uid in r.owner_uids]
        return sorted(found, key=lambda r: r.entry.node)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reports)
