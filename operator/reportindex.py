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

from retransmit_core.api import NodeReportStatus, NodeStatus
from retransmit_core.naming import TRACE_LABEL, heartbeat_of, well_named
from retransmit_core.validation import format_error

from .tally import Tally, TraceTally

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
    return StoredReport(meta.get("namespace", ""), meta["name"], (meta.get("labels") or {})[TRACE_LABEL], _owners(meta), entry, status)


def _owners(meta: dict[str, Any]) -> frozenset[str]:
    """The uids of the object's controlling owners (its trace)."""
    return frozenset(ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller"))


@dataclass(frozen=True)
class Heartbeat:
    """One report's heartbeat Lease as the operator uses it: when it was last renewed, and by
    whose agents (a Lease left by an earlier trace of the same name vouches for nothing)."""

    renewed: datetime
    owner_uids: frozenset[str]


def parse_heartbeat(obj: dict[str, Any]) -> Optional[Heartbeat]:
    beat = heartbeat_of(obj)
    return None if beat is None else Heartbeat(beat[1], _owners(obj.get("metadata") or {}))


Key = tuple[str, str]   # (namespace, name): a report and its Lease share it


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


@dataclass
class _Indexes:
    """The reports by trace, each trace's sums (tally.py) and the reports asking for a
    privileged agent, by (trace, owner uid)."""

    by_trace: dict[str, dict[Key, StoredReport]]
    tallies: dict[tuple[str, str], TraceTally]   # (trace, its uid)
    # The reports whose agent asked for a privileged one (the auto security mode,
    # privilege.py): few, so a pass finds them without going over every report of the trace.
    asking: dict[tuple[str, str], dict[Key, StoredReport]]

    @classmethod
    def of(cls, reports: dict[Key, StoredReport]) -> "_Indexes":
        out = cls({}, {}, {})
        for key, report in reports.items():
            out.add(key, report)
        return out

    def add(self, key: Key, report: StoredReport) -> None:
        self.by_trace.setdefault(report.trace, {})[key] = report
        for uid in report.owner_uids:
            self.tallies.setdefault((report.trace, uid), TraceTally()).put(report.entry)
            if report.entry.needs_privileged:
                self.asking.setdefault((report.trace, uid), {})[key] = report

    def remove(self, key: Key, report: StoredReport) -> None:
        """Undo add(key, report)."""
        reports = self.by_trace.get(report.trace, {})
        reports.pop(key, None)
        if not reports:
            self.by_trace.pop(report.trace, None)
        for uid in report.owner_uids:
            tally = self.tallies.get((report.trace, uid))
            if tally is not None:
                tally.drop(report.entry.node)
                if not len(tally):
                    del self.tallies[(report.trace, uid)]
            asking = self.asking.get((report.trace, uid))
            if asking is not None:
                asking.pop(key, None)
                if not asking:
                    del self.asking[(report.trace, uid)]


class ReportIndex:
    """Reports and heartbeats by (namespace, name); thread-safe (the watches run in threads)."""

    KINDS = {"reports": parse_report, "heartbeats": parse_heartbeat}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[Key, Any]] = {kind: {} for kind in self.KINDS}
        self.events = 0  # watch events applied: tests and metrics see the watch working
        # Set once the first lists of both kinds are in: before that, no report means "not
        # seen yet" (aggregating would write zero counts over a trace's results), and no
        # heartbeat would make quiet nodes look stale.
        self.synced = threading.Event()
        self._listed: set[str] = set()
        # Kept with every report change, so a pass over one trace reads only that trace's
        # reports, sums and privileged askers whatever the number of traces and nodes.
        self._idx = _Indexes({}, {}, {})
        self._heard_memo: dict[Key, tuple[StoredReport, Optional[datetime], StoredReport]] = {}

    def _observe(self, kind: str, obj: dict[str, Any], deleted: bool) -> None:
        item = None if deleted else self.KINDS[kind](obj)
        key = _key(obj)
        with self._lock:
            self.events += 1
            if kind == "reports":
                self._unindex(key)
            if item is None:
                self._tables[kind].pop(key, None)
            else:
                self._tables[kind][key] = item
                if kind == "reports":
                    self._idx.add(key, item)

    def _replace(self, kind: str, objs: Iterable[dict[str, Any]]) -> None:
        """After a (re)list: exactly these. The reports' indexes are built before the lock is
        taken (25,000 reports take seconds to sum), so passes and events wait only for the swap."""
        items = {_key(obj): item for obj in objs if (item := self.KINDS[kind](obj)) is not None}
        indexes = _Indexes.of(items) if kind == "reports" else None
        with self._lock:
            self._tables[kind] = items
            if indexes is not None:
                self._idx, self._heard_memo = indexes, {}
            self.events += 1
            self._listed.add(kind)
            if self._listed >= set(self.KINDS):
                self.synced.set()

    def reset(self) -> None:
        """A new leadership term: not synced until both kinds are listed again (what the last
        term saw may be long gone); the entries stay until those lists replace them."""
        with self._lock:
            self._listed.clear()
            self.synced.clear()

    def _unindex(self, key: Key) -> None:
        old = self._tables["reports"].get(key)
        if old is not None:
            self._idx.remove(key, old)
            self._heard_memo.pop(key, None)

    def observe(self, obj: dict[str, Any], deleted: bool = False) -> None:
        self._observe("reports", obj, deleted)

    def replace(self, objs: Iterable[dict[str, Any]], _version: Optional[str] = None) -> None:
        self._replace("reports", objs)

    def observe_heartbeat(self, obj: dict[str, Any], deleted: bool = False) -> None:
        self._observe("heartbeats", obj, deleted)

    def replace_heartbeats(self, objs: Iterable[dict[str, Any]], _version: Optional[str] = None) -> None:
        self._replace("heartbeats", objs)

    def _heard(self, key: Key, report: StoredReport) -> StoredReport:
        """The report with lastReportTime moved to its Lease's renewal, when that is later
        (a copy made once per report and renewal, not once per pass)."""
        beat = self._tables["heartbeats"].get(key)
        renewed = beat.renewed if beat is not None and beat.owner_uids & report.owner_uids else None
        memo = self._heard_memo.get(key)
        if memo is not None and memo[0] is report and memo[1] == renewed:
            return memo[2]
        heard = max((t for t in (report.entry.last_report_time, renewed) if t is not None), default=None)
        result = report if heard == report.entry.last_report_time else replace(
            report, entry=report.entry.model_copy(update={"last_report_time": heard}))
        self._heard_memo[key] = (report, renewed, result)
        return result

    def for_trace(self, trace: str, uid: str, heartbeats: bool = True) -> list[StoredReport]:
        """The reports of this very trace, by node name; with `heartbeats`, each heard at the
        later of its write and its Lease's renewal."""
        return self.view(trace, uid, heartbeats=heartbeats)[0]

    def view(self, trace: str, uid: str, heartbeats: bool = True, top_n: int = 0
             ) -> tuple[list[StoredReport], Optional[Tally]]:
        """for_trace's reports and, with top_n, the sums of those same reports (one moment)."""
        with self._lock:
            found = [self._heard(key, r) if heartbeats else r
                     for key, r in self._idx.by_trace.get(trace, {}).items() if uid in r.owner_uids]
            tally = self._idx.tallies.get((trace, uid))
            sums = (tally or TraceTally()).snapshot(top_n) if top_n > 0 else None
        return sorted(found, key=lambda r: r.entry.node), sums

    def asking_privileged(self, trace: str, uid: str) -> list[NodeStatus]:
        """The entries of this very trace's reports whose agent asked for a privileged one
        (needsPrivileged), by node name."""
        with self._lock:
            found = [r.entry for r in self._idx.asking.get((trace, uid), {}).values()]
        return sorted(found, key=lambda e: e.node)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tables["reports"])
