"""Names, labels and owners of every object the project makes: the agents' DaemonSet, each
(trace, node) RetransmitNodeReport and its heartbeat Lease of the same name
(retransmit_core.schedule says when each is written).

Pure functions shared by the operator (which renders the DaemonSet, and watches every report
and Lease with one label selector each), the agent (which creates and applies its own report)
and the plugin (which lists one trace's reports). Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Optional

from .api import API_VERSION, KIND, REPORT_KIND, NodeStatus, to_api

APP_NAME = "retransmit-operator"   # app.kubernetes.io/name, part-of and managed-by of every object
# The namespace the chart installs into by default: the operator's agents and reports live there.
DEFAULT_NAMESPACE = "retransmit-system"
AGENT_COMPONENT = "agent"
COMPONENT = "node-report"
HEARTBEAT_COMPONENT = "node-heartbeat"
LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"
TRACE_LABEL = "retransmit.dev/trace"
NODE_LABEL = "retransmit.dev/node"
SPEC_HASH_ANNOTATION = "retransmit.dev/spec-hash"
# The port a trace's agents listen on, chosen by the operator when it creates their DaemonSet.
METRICS_PORT_ANNOTATION = "retransmit.dev/metrics-port"
# On every agents' DaemonSet, written by the operator: how many agents all running traces have
# together, the count their shared write schedule stretches by (core/schedule.py).
CLUSTER_AGENTS_ANNOTATION = "retransmit.dev/cluster-agents"
# "<count> <time>": the count the operator lowered that annotation from, and when; agents may
# use it until they re-read the DaemonSet, so the staleness bound does too (core/schedule.py).
AGENTS_LOWERED_ANNOTATION = "retransmit.dev/cluster-agents-lowered"
DAEMONSET_PREFIX = "rtrace-"
# The operator's auto security mode (operator/privilege.py): the nodes whose agents run
# privileged, each with its agent's reason, on the trace's DaemonSet (JSON {reason: [node, ...]}),
# so the choice survives an operator restart and never flips back while the trace runs.
PRIVILEGED_NODES_ANNOTATION = "retransmit.dev/privileged-nodes"
# Only the privileged agents' pods carry it (and their DaemonSet selects on it): the trace's
# other labels stay as they are, so both DaemonSets' pods count as the trace's agents.
AGENT_PRIVILEGE_LABEL = "retransmit.dev/agent-privilege"
PRIVILEGED_SUFFIX = "-privileged"
# The operator replicas' leader-election Lease, in the operator's namespace.
LEADER_LEASE = f"{APP_NAME}-leader"
MAX_NAME = 253          # an object name is a DNS subdomain
MAX_LABEL_VALUE = 63
HASH_CHARS = 10

# Every trace's agents' DaemonSet (the operator lists them to hand out slots).
AGENTS_SELECTOR = f"app.kubernetes.io/name={APP_NAME},app.kubernetes.io/component={AGENT_COMPONENT}"
# The operator's watch of every report, whatever its trace.
REPORTS_SELECTOR = f"app.kubernetes.io/name={APP_NAME},app.kubernetes.io/component={COMPONENT}"
# ... and its watch of every heartbeat Lease.
HEARTBEATS_SELECTOR = f"app.kubernetes.io/name={APP_NAME},app.kubernetes.io/component={HEARTBEAT_COMPONENT}"


def daemonset_name(trace: str) -> str:
    """The agents' DaemonSet of one trace, in the operator's namespace."""
    return f"{DAEMONSET_PREFIX}{trace}"


def privileged_daemonset_name(trace: str) -> str:
    """The trace's second agents' DaemonSet in the auto security mode: privileged agents, only
    on the nodes where capabilities were not enough (a DNS subdomain: up to 74 characters)."""
    return f"{daemonset_name(trace)}{PRIVILEGED_SUFFIX}"


def agent_selector_labels(trace: str) -> dict[str, str]:
    """Labels that pick one trace's agent pods (the DaemonSet's selector: never changes)."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/component": AGENT_COMPONENT, TRACE_LABEL: trace}


def agent_labels(trace: str) -> dict[str, str]:
    """Every label of the DaemonSet and its pods: the selector's plus the recommended ones."""
    return {
        **agent_selector_labels(trace),
        "app.kubernetes.io/instance": daemonset_name(trace),
        "app.kubernetes.io/managed-by": APP_NAME,
        "app.kubernetes.io/part-of": APP_NAME,
    }


def trace_owner(trace: str, trace_uid: str, block_owner_deletion: bool = False) -> dict[str, Any]:
    """The ownerReference to the trace: deleting it garbage-collects what it owns.
    block_owner_deletion only where the writer may update the trace's finalizers (the
    operator, for its DaemonSet); agents have no business with them, so their reports and
    Leases go without."""
    owner = {"apiVersion": API_VERSION, "kind": KIND, "name": trace, "uid": trace_uid, "controller": True}
    if block_owner_deletion:
        owner["blockOwnerDeletion"] = True
    return owner


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _shortened(text: str, limit: int) -> str:
    """`text` if it fits in `limit`, else a prefix and a hash of the whole (still unique)."""
    if len(text) <= limit:
        return text
    prefix = text[: limit - HASH_CHARS - 1].rstrip(".-")
    return f"{prefix}-{_digest(text)}"


def report_name(trace: str, node: str) -> str:
    """`<trace>.<node>`; a hash of the node replaces its tail when that exceeds 253 characters.
    Trace names are DNS labels of at most 56 and node names DNS subdomains, so it is valid."""
    return f"{trace}.{_shortened(node, MAX_NAME - len(trace) - 1)}"


def node_label_value(node: str) -> str:
    """The node's name as a label value (at most 63 characters: hashed beyond)."""
    return _shortened(node, MAX_LABEL_VALUE)


def report_labels(trace: str, node: str, component: str = COMPONENT) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": APP_NAME,
        TRACE_LABEL: trace,
        NODE_LABEL: node_label_value(node),
    }


def trace_selector(trace: str, heartbeats: bool = False) -> str:
    """`kubectl get rtreport -l ...` for one trace's reports (heartbeats: `kubectl get lease -l ...`)."""
    return f"{HEARTBEATS_SELECTOR if heartbeats else REPORTS_SELECTOR},{TRACE_LABEL}={trace}"


def report_metadata(trace: str, trace_uid: str, node: str, namespace: str,
                    component: str = COMPONENT) -> dict[str, Any]:
    return {
        "name": report_name(trace, node),
        "namespace": namespace,
        "labels": report_labels(trace, node, component),
        "ownerReferences": [trace_owner(trace, trace_uid)],
    }


def report_object(trace: str, trace_uid: str, node: str, namespace: str, entry: NodeStatus) -> dict[str, Any]:
    """The whole report: what the agent creates, and (same document) server-side applies."""
    return {
        "apiVersion": API_VERSION,
        "kind": REPORT_KIND,
        "metadata": report_metadata(trace, trace_uid, node, namespace),
        "spec": to_api(entry),
    }


def well_named(report: dict[str, Any]) -> bool:
    """The report's name and labels are the ones its trace and spec.node give: anything else
    (a report written for another node's name) is ignored by the operator."""
    meta = report.get("metadata") or {}
    labels = meta.get("labels") or {}
    node = (report.get("spec") or {}).get("node")
    trace = labels.get(TRACE_LABEL)
    return bool(node and trace) and meta.get("name") == report_name(trace, node) \
        and labels.get(NODE_LABEL) == node_label_value(node)


# ---------------------------------------------------------------- the heartbeat Lease

def micro_time(when: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with exactly six fractional digits, in UTC."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def heartbeat_object(trace: str, trace_uid: str, node: str, namespace: str, renewed: datetime,
                     duration_seconds: int) -> dict[str, Any]:
    """The report's heartbeat: a Lease named like the report, held by the node, owned by the
    trace. leaseDurationSeconds is the operator's staleness bound (for people reading it)."""
    return {
        "apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}",
        "kind": "Lease",
        "metadata": report_metadata(trace, trace_uid, node, namespace, HEARTBEAT_COMPONENT),
        "spec": {"holderIdentity": node, "leaseDurationSeconds": duration_seconds, "renewTime": micro_time(renewed)},
    }


def heartbeat_renewal(renewed: datetime) -> dict[str, Any]:
    """The merge patch of one renewal: the renewTime, nothing else."""
    return {"spec": {"renewTime": micro_time(renewed)}}


def heartbeat_of(lease: dict[str, Any]) -> Optional[tuple[str, datetime]]:
    """(report name, renewTime) of a well-named heartbeat Lease; None for anything else (a
    Lease named for another node than its holder, one never renewed)."""
    meta = lease.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = lease.get("spec") or {}
    node, trace, renewed = spec.get("holderIdentity"), labels.get(TRACE_LABEL), spec.get("renewTime")
    if not (node and trace and renewed) or meta.get("name") != report_name(trace, node) \
            or labels.get(NODE_LABEL) != node_label_value(node):
        return None
    try:
        return meta["name"], datetime.fromisoformat(renewed.replace("Z", "+00:00"))
    except ValueError:
        return None
