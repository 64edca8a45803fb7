"""A trace's result as text, for `kubectl retransmit show/watch/run` (pure): tables (-o table
and wide) and kubectl's other output forms (-o json, yaml, name, jsonpath=TEMPLATE).

Input is the trace object as the API returns it (camelCase dicts); output is plain text, so
it reads the same in a terminal, a CI log and a ticket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Optional, Sequence

import yaml

from retransmit_core.api import GROUP, KIND, format_endpoint, parse_duration
from retransmit_core.ratio import format_ratio

from . import jsonpath

# The -o forms, as kubectl spells them (jsonpath takes its template after '=').
OUTPUTS = ("table", "wide", "json", "yaml", "name")
JSONPATH = "jsonpath"
# How kubectl names the kind in `-o name` and `delete`: resource.group.
RESOURCE = f"{KIND.lower()}.{GROUP}"
PATHS_SHOWN = 5   # pairs per matrix in the table output (-o json has them all)


@dataclass(frozen=True)
class Output:
    """An -o value: the form, and for jsonpath its template (checked when the flag is read)."""
    form: str
    template: str = ""


def parse_output(text: str) -> Output:
    """'-o' as typed -> Output; ValueError naming the forms (or the template's fault) otherwise."""
    form, eq, template = text.partition("=")
    if form == JSONPATH and eq:
        template = template.strip()
        if len(template) > 1 and template[0] == template[-1] and template[0] in "'\"":
            template = template[1:-1]
        jsonpath.parse(template)
        return Output(JSONPATH, template)
    if text in OUTPUTS:
        return Output(text)
    raise ValueError(f"-o {text!r}: use one of {', '.join(OUTPUTS)} or {JSONPATH}=TEMPLATE "
                     "(e.g. jsonpath='{.status.phase}')")


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as kubectl prints it: metadata.managedFields left out."""
    metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": metadata} if "metadata" in obj else obj


def object_name(trace: dict[str, Any]) -> str:
    """'retransmittrace.retransmit.dev/NAME', as `kubectl get -o name` prints it."""
    return f"{RESOURCE}/{trace['metadata']['name']}"


# --sort: how the tables order the top flows and top pods. retransmits: as the operator
# ranked them (busiest first); ratio: by retransRatio, highest first, rows without one last.
SORT_KEYS = ("retransmits", "ratio")


def sort_rows(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Top flows or top pods in --sort `key`'s order (stable: ties keep the operator's order)."""
    if key == "ratio":
        return sorted(rows, key=lambda f: (f.get("retransRatio") is None, -(f.get("retransRatio") or 0.0)))
    return list(rows)


def format_trace(trace: dict[str, Any], output: Output, namespaces: Optional[Sequence[str]] = None,
                 now: Optional[datetime] = None, sort: str = "retransmits") -> str:
    """The trace in one -o form (without a trailing newline). `namespaces` narrows the tables'
    pod rows and `sort` orders their flows; the other forms print the object as stored."""
    if output.form in ("table", "wide"):
        return render(trace, now, namespaces=namespaces, wide=output.form == "wide", sort=sort)
    if output.form == "name":
        return object_name(trace)
    shown = without_managed_fields(trace)
    if output.form == "json":
        return json.dumps(shown, indent=2)
    if output.form == "yaml":
        return yaml.safe_dump(shown, sort_keys=False).rstrip("\n")
    return jsonpath.render(output.template, shown)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; `right` columns right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    if len(cells) == 1:
        return []
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return lines


def endpoint(side: dict[str, Any]) -> str:
    """'10.1.2.3:443 (shop/web)': address, port and who has it: a pod, a Service (with the
    port's name, the node for a NodePort, and the backend kube-proxy sent the connection to:
    'service shop/web:http -> web-0'), a node, or nobody in the cluster."""
    ip, port = side.get("ip", "?"), side.get("port", 0)
    text = format_endpoint(ip, port)
    if side.get("pod"):
        return f"{text} ({side.get('namespace')}/{side['pod']})"
    if side.get("service"):
        port_name = f":{side['servicePort']}" if side.get("servicePort") else ""
        on_node = f" on node {side['node']}" if side.get("node") else ""
        to = backend(side.get("backend"), side.get("namespace"))
        return f"{text} (service {side.get('namespace')}/{side['service']}{port_name}{on_node}{to})"
    if side.get("backend"):   # translated, though no Service of the cluster has the address
        return f"{text}{backend(side['backend'], None)}"
    if side.get("node"):
        return f"{text} (node {side['node']})"
    if side.get("outside"):
        return f"{text} (outside the cluster)"
    return text


def backend(found: Optional[dict[str, Any]], namespace: Optional[str]) -> str:
    """' -> web-0': where the connection was translated to, its pod (with the namespace when
    not the Service's), its node, or its address; '' when not known."""
    if not found:
        return ""
    if found.get("pod"):
        pod, ns = found["pod"], found.get("namespace")
        return f" -> {pod}" if ns == namespace else f" -> {ns}/{pod}"
    if found.get("node"):
        return f" -> node {found['node']}"
    return f" -> {format_endpoint(found.get('ip', '?'), found.get('port', 0))}"


def segments(row: dict[str, Any], sent: str = "dataSegsOut", retransmitted: str = "totalRetrans") -> Optional[str]:
    """'58/1000': a connection's (or with outSegs, retransSegs a pod's) retransmitted and
    sent segments, None when not read."""
    if row.get(sent) is None:
        return None
    return f"{row.get(retransmitted, 0)}/{row[sent]}"


def causes(by_cause: Optional[dict[str, int]]) -> str:
    """'fast 12 probe 3' (most first, unknown last)."""
    items = sorted((by_cause or {}).items(), key=lambda kv: (kv[0] == "unknown", -kv[1], kv[0]))
    return " ".join(f"{k} {v}" for k, v in items if v) or "-"


def time_left(trace: dict[str, Any], now: Optional[datetime] = None) -> Optional[float]:
    """Seconds until the trace completes (None: no duration, or not started)."""
    duration = (trace.get("spec") or {}).get("duration")
    started = (trace.get("status") or {}).get("startTime")
    if not duration or not started:
        return None
    start = datetime.fromisoformat(started.replace("Z", "+00:00"))
    now = now or datetime.now(timezone.utc)
    return max(0.0, parse_duration(duration) - (now - start).total_seconds())


def condition(trace: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (trace.get("status") or {}).get("conditions", []) if c.get("type") == kind), {})


def progress_line(trace: dict[str, Any], now: Optional[datetime] = None) -> str:
    """One line while a trace runs: phase, nodes reporting, running totals, time left."""
    status = trace.get("status") or {}
    summary = status.get("summary") or {}
    left = time_left(trace, now)
    parts = [
        f"{trace['metadata']['name']}: {status.get('phase', 'Pending')}",
        f"nodes {summary.get('nodesReporting', 0)}/{summary.get('nodesDesired', 0)} reporting",
        f"{summary.get('retransmits', 0)} retransmits, {summary.get('synackRetransmits', 0)} SYN-ACK",
    ]
    if left is not None:
        parts.append(f"{left:.0f}s left")
    ready = condition(trace, "Ready")
    if ready.get("status") == "False" and ready.get("message"):
        parts.append(ready["message"])
    return "; ".join(parts)


def in_namespaces(namespace: Optional[str], namespaces: Optional[Sequence[str]]) -> bool:
    return not namespaces or namespace in namespaces


def render(trace: dict[str, Any], now: Optional[datetime] = None, namespaces: Optional[Sequence[str]] = None,
           wide: bool = False, sort: str = "retransmits") -> str:
    """The whole result: summary, top flows, top pods, by state, by cause, per node. With
    `namespaces`, only the flows and pods whose local pod is in one of them (totals stay the
    trace's); `wide` adds each flow's family, first and last retransmit, round-trip time and
    segment counters, and each node's reporting and departed marks; `sort` (SORT_KEYS)
    orders the flows and the pods."""
    status = trace.get("status") or {}
    summary = status.get("summary") or {}
    out = [progress_line(trace, now)]
    where = [summary["hotPath"]] if summary.get("hotPath") else []
    drops = summary.get("topDrops") or []
    if drops:
        top = drops[0]
        where.append(f"most dropped on node {top.get('node')}: {top.get('reason')} {top.get('drops', 0)}")
    if where:
        out.append(f"WHERE: {'; '.join(where)}")   # the answer first: the path that holds the loss, the box that dropped
    out.append("")
    totals = [("retransmits", summary.get("retransmits", 0)),
              ("SYN-ACK retransmits", summary.get("synackRetransmits", 0)),
              ("lost samples", summary.get("lostEvents", 0))]
    for key, label in (("missedEvents", "missed hits"), ("failedAttempts", "failed attempts")):
        if summary.get(key) is not None:
            totals.append((label, summary[key]))
    if summary.get("outSegs") is not None:   # the nodes' own segment counters: the count's denominator
        totals.append(("nodes retransmitted/sent segments",
                       f"{summary.get('retransSegs', 0)}/{summary['outSegs']} ({format_ratio(summary.get('retransRatio'))})"))
    out.append("   ".join(f"{label} {value}" for label, value in totals))
    flows = sort_rows([f for f in summary.get("topFlows") or []
                        if in_namespaces(f.get("local", {}).get("namespace"), namespaces)], sort)
    if flows:
        out += ["", "TOP FLOWS" + (" (by retransmit ratio)" if sort == "ratio" else "")]
        headers = ("NODE", "LOCAL (RETRANSMITTING)", "REMOTE", "RETRANSMITS", "RATIO", "SYN-ACK", "LAST STATE", "CAUSES")
        extra = ("FAMILY", "FIRST SEEN", "LAST SEEN", "SRTT (us)", "RETRANS/SENT") if wide else ()
        lost_at = any(f.get("lossAt") for f in flows)   # the traced nodes' drops say where (kernels 5.17+)
        out += table(headers + extra + (("LOST AT",) if lost_at else ()),
                     ((f.get("node"), endpoint(f.get("local", {})), endpoint(f.get("remote", {})), f.get("retransmits", 0),
                       format_ratio(f.get("retransRatio")), f.get("synackRetransmits", 0), f.get("lastState"),
                       causes(f.get("byCause")))
                      + ((f.get("family"), f.get("firstSeen"), f.get("lastSeen"),
                          (f.get("socket") or {}).get("srttMicroseconds"), segments(f)) if wide else ())
                      + ((f.get("lossAt") or "-",) if lost_at else ()) for f in flows),
                     right=(3, 4, 5))
    pods = sort_rows([p for p in summary.get("topPods") or [] if in_namespaces(p.get("namespace"), namespaces)], sort)
    if pods:
        # RATIO: the pod's own network namespace's retransmitted/sent segments ('-' for
        # hostNetwork pods and pods the agent found no process of); -o wide adds both counts.
        out += ["", "TOP PODS" + (" (by retransmit ratio)" if sort == "ratio" else "")]
        out += table(("NAMESPACE", "POD", "NODE", "RETRANSMITS", "RATIO") + (("RETRANS/SENT",) if wide else ()),
                     ((p.get("namespace"), p.get("pod"), p.get("node"), p.get("retransmits", 0),
                       format_ratio(p.get("retransRatio")))
                      + ((segments(p, "outSegs", "retransSegs"),) if wide else ()) for p in pods), right=(3, 4))
    services = [s for s in summary.get("topServices") or [] if in_namespaces(s.get("namespace"), namespaces)]
    if services:
        out += ["", "TOP SERVICES (REMOTE)"]
        out += table(("NAMESPACE", "SERVICE", "RETRANSMITS"),
                     ((s.get("namespace"), s.get("service"), s.get("retransmits", 0)) for s in services), right=(2,))
    for key, title in (("byNodePair", "PATHS (NODE TO NODE)"), ("byZonePair", "PATHS (ZONE TO ZONE)")):
        pairs = summary.get(key) or []
        if pairs:
            out += ["", title]
            # RATIO: of the pair's listed connections that retransmitted (PathCount.retransRatio).
            out += table(("FROM", "TO", "RETRANSMITS", "%", "RATIO"),
                         ((p.get("source"), p.get("destination"), p.get("retransmits", 0), p.get("percent", 0),
                           format_ratio(p.get("retransRatio"))) for p in pairs[:PATHS_SHOWN]), right=(2, 3, 4))
    if drops:
        out += ["", "DROPPED BY TRACED NODES"]
        out += table(("NODE", "REASON", "DROPS"),
                     ((d.get("node"), d.get("reason"), d.get("drops", 0)) for d in drops), right=(2,))
    for key, title in (("byState", "BY TCP STATE"), ("byCause", "BY CAUSE")):
        counts = summary.get(key) or {}
        if counts:
            out += ["", title]
            out += table(("NAME", "RETRANSMITS"), sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), right=(1,))
    missed = summary.get("nodesNotCovered") or []
    if missed:
        out += ["", f"NOT COVERED ({sum(m.get('count', 0) for m in missed)} of {summary.get('nodesLinux')} Linux nodes)"]
        out += table(("REASON", "NODES", "EXAMPLES", "FIX"),
                     ((m.get("reason"), m.get("count", 0), ", ".join(m.get("nodes") or []), m.get("detail")) for m in missed),
                     right=(1,))
    privileged = summary.get("privilegedNodes") or []
    if privileged:
        out += ["", f"PRIVILEGED AGENTS ({sum(p.get('count', 0) for p in privileged)} nodes: capabilities were not enough)"]
        out += table(("NODES", "EXAMPLES", "REASON"),
                     ((p.get("count", 0), ", ".join(p.get("nodes") or []), p.get("reason")) for p in privileged),
                     right=(0,))
    nodes = status.get("nodes") or []
    if nodes:
        out += ["", "NODES"]
        extra = ("REPORTING", "DEPARTED") if wide else ()
        out += table(("NODE", "PHASE", "RETRANSMITS", "SEGMENT RATIO", "SYN-ACK", "LOST", "LAST REPORT") + extra + ("MESSAGE",),
                     ((n.get("node"), n.get("phase"), n.get("retransmits", 0), format_ratio(n.get("retransRatio")),
                       n.get("synackRetransmits", 0), n.get("lostEvents", 0), n.get("lastReportTime"))
                      + (("yes" if n.get("reporting") else "no", "yes" if n.get("departed") else "no") if wide else ())
                      + (n.get("message"),) for n in nodes),
                     right=(2, 3, 4, 5))
    return "\n".join(out)
