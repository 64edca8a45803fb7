"""The agents' DaemonSet for one trace: a pure function of the trace and the settings.

The pod template is the operator-agent contract (retransmit_core.contract): the agent
reads its whole configuration from the args and the downward-API env rendered here.

Security modes (RTRACE_AGENT_SECURITY_MODE):
- auto (default): the capabilities context below on every node; where a node's agent finds
  it may not load BPF with it, a second, privileged DaemonSet takes over that node for the
  trace (operator/privilege.py; `render_privileged_daemonset`).
- privileged: works on every kernel and runtime; what OpenShift's privileged SCC
  and Pod Security "privileged" expect for a tracing agent.
- capabilities: not privileged, every capability dropped except BPF (load programs, create
  maps), PERFMON (perf_event_open on a tracepoint) and SYS_RESOURCE (raise RLIMIT_MEMLOCK:
  kernels before 5.11 charge BPF maps to it). No SYS_ADMIN: BPF + PERFMON cover what the
  agent does since Linux 5.8, and SYS_ADMIN is most of root; kernels before 5.8 have neither
  capability and need the privileged mode. The seccomp profile is Unconfined because runtimes'
  default profiles allow bpf() and perf_event_open() only with SYS_ADMIN (Docker, CRI-O) or
  depend on the version (containerd). The agent runs as uid 0 so it may read tracefs and
  debugfs (mode 0700, owned by root) without DAC_OVERRIDE.

Host paths use type "" (no check before mounting): a node without /sys/kernel/btf or
/usr/src, or with tracefs not mounted, still starts the pod, and the agent then reports
exactly what is missing in its status entry (phase Failed with a message) instead of the
pod hanging in ContainerCreating. DirectoryOrCreate would create folders on the host.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Iterable, Optional

from retransmit_core.api import RetransmitTraceSpec
from retransmit_core.contract import (
    DOWNWARD_API_ENV,
    ENV_HOST_PROC,
    HOST_CGROUP_MOUNT,
    HOST_PROC_MOUNT,
    METRICS_PORT_SPAN,
    AgentInvocation,
    render_agent_args,
)
from retransmit_core.naming import (
    AGENT_PRIVILEGE_LABEL,
    METRICS_PORT_ANNOTATION,
    PRIVILEGED_NODES_ANNOTATION,
    SPEC_HASH_ANNOTATION,
    agent_labels,
    agent_selector_labels,
    daemonset_name,
    privileged_daemonset_name,
    trace_owner,
)
from retransmit_core.schedule import TERMINATION_GRACE_SECONDS

from .placement import Placement, placement
from .privilege import AUTO, node_name_affinity, privileged_nodes_annotation
from .settings import Settings
from .slots import preferred_port


# (volume name, host path, mount path, mount propagation)
HOST_MOUNTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("debugfs", "/sys/kernel/debug", "/sys/kernel/debug", "HostToContainer"),
    ("tracefs", "/sys/kernel/tracing", "/sys/kernel/tracing", "HostToContainer"),
    ("btf", "/sys/kernel/btf", "/sys/kernel/btf", None),
    ("modules", "/lib/modules", "/lib/modules", None),
    ("usr-src", "/usr/src", "/usr/src", None),
    # The host's processes, read-only, to read each pod's network namespace counters through
    # /proc/PID/net/snmp (retransmit_agent.podsegments): less than hostPID, which would also
    # let the agent signal host processes. Mounted beside the container's own /proc, which
    # the runtime keeps; ENV_HOST_PROC tells the agent where.
    ("host-proc", "/proc", HOST_PROC_MOUNT, None),
    # The host's cgroup hierarchies, read-only, to name each socket's owner by its cgroup v2
    # directory (a pod's UID, a systemd unit; retransmit_agent.cgroups). On hybrid hosts the
    # unified hierarchy is a mount below it (runtimes bind host paths recursively), kept
    # read-only where the runtime can (recursiveReadOnly). Missing or v1 only: the agent
    # names sockets by address and says so.
    ("host-cgroup", "/sys/fs/cgroup", HOST_CGROUP_MOUNT, None),
)
# Mounts that stay read-only below their top too, where kubelet and the runtime can (Kubernetes
# 1.31+ with a runtime that supports it; elsewhere the field is ignored or falls back).
RECURSIVE_READ_ONLY = frozenset({"host-cgroup"})
AGENT_CAPABILITIES = ("BPF", "PERFMON", "SYS_RESOURCE")


def selector_text(labels: dict[str, str]) -> str:
    """A label selector as people write it: 'kubernetes.io/os=linux, pool=blue'."""
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))


def agent_metrics_port(trace_name: str, settings: Settings) -> int:
    """The port a trace's agents prefer; the reconciler gives it another when a running trace
    holds it (slots.choose_port): agents use the host network, so two traces on one node
    need different ports (the scheduler refuses a clash)."""
    return preferred_port(trace_name, settings.agent_metrics_port, METRICS_PORT_SPAN)


def agent_placement(spec: RetransmitTraceSpec, settings: Settings) -> Placement:
    """The trace's nodeSelector and tolerations, or the chart's defaults (placement.py)."""
    return placement(spec, settings.agent_node_selector, settings.agent_tolerations)


def security_context(mode: str) -> dict[str, Any]:
    """The agent container's securityContext: privileged, or the capabilities context
    (the explicit capabilities mode, and the auto mode's first try on every node)."""
    if mode == "privileged":
        return {"privileged": True, "runAsUser": 0, "readOnlyRootFilesystem": True}
    return {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "runAsUser": 0,
        "runAsNonRoot": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": list(AGENT_CAPABILITIES)},
        "seccompProfile": {"type": "Unconfined"},
    }


def render_pod_template(trace_name: str, trace_uid: str, spec: RetransmitTraceSpec, settings: Settings,
                        port: int, mode: Optional[str] = None) -> dict[str, Any]:
    """The agents' pod template; `mode` overrides the settings' security mode (the auto
    mode's privileged DaemonSet)."""
    args = render_agent_args(AgentInvocation(trace=trace_name, trace_uid=trace_uid, spec=spec, metrics_port=port))
    where = agent_placement(spec, settings)
    env = [{"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}
           for name, path in DOWNWARD_API_ENV.items()]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    env.append({"name": ENV_HOST_PROC, "value": HOST_PROC_MOUNT})

    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}]
    for name, host_path, mount_path, propagation in HOST_MOUNTS:
        mount = {"name": name, "mountPath": mount_path, "readOnly": True}
        if name in RECURSIVE_READ_ONLY:
            mount["recursiveReadOnly"] = "IfPossible"
        if propagation:
            mount["mountPropagation"] = propagation
        mounts.append(mount)
        volumes.append({"name": name, "hostPath": {"path": host_path, "type": ""}})

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container = {
        "name": "agent",
        "image": settings.agent_image,
        "imagePullPolicy": settings.agent_image_pull_policy,
        "command": list(settings.agent_command),
        "args": args,
        "env": env,
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": copy.deepcopy(settings.agent_resources),
        "securityContext": security_context(mode or settings.agent_security_mode),
        "volumeMounts": mounts,
        # Compiling the program takes seconds (more on a busy node): the startup probe gives
        # it two minutes before liveness counts.
        "startupProbe": probe("/livez", 5, 24),
        "readinessProbe": probe("/readyz", 10, 3),
        "livenessProbe": probe("/livez", 20, 3),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "serviceAccountName": settings.agent_service_account,
        "automountServiceAccountToken": True,
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": dict(where.node_selector),
        "tolerations": [dict(t) for t in where.tolerations],
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "restartPolicy": "Always",
        "containers": [container],
        "volumes": volumes,
    }
    if settings.agent_priority_class_name:
        pod_spec["priorityClassName"] = settings.agent_priority_class_name
    return {"metadata": {"labels": agent_labels(trace_name)}, "spec": pod_spec}


def spec_hash(template: dict[str, Any]) -> str:
    """A short digest of the pod template: a new value rolls the agents."""
    return hashlib.sha256(json.dumps(template, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def render_daemonset(trace_name: str, trace_uid: str, spec: RetransmitTraceSpec, settings: Settings,
                     port: Optional[int] = None, privileged_nodes: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The DaemonSet rtrace-<trace> in the operator's namespace, owned by the trace, its agents
    on `port` (default: the trace's preferred one; the reconciler passes the one it chose).
    In the auto mode, `privileged_nodes` (node -> reason) are recorded on it and kept off it:
    the privileged DaemonSet runs there (`render_privileged_daemonset`)."""
    port = agent_metrics_port(trace_name, settings) if port is None else port
    template = render_pod_template(trace_name, trace_uid, spec, settings, port)
    annotations: dict[str, str] = {}
    if settings.agent_security_mode == AUTO and privileged_nodes:
        template["spec"]["affinity"] = node_name_affinity(privileged_nodes, "NotIn")
        annotations[PRIVILEGED_NODES_ANNOTATION] = privileged_nodes_annotation(privileged_nodes)
    return _daemonset(daemonset_name(trace_name), trace_name, trace_uid, settings, port, template,
                      agent_selector_labels(trace_name), annotations)


def render_privileged_daemonset(trace_name: str, trace_uid: str, spec: RetransmitTraceSpec, settings: Settings,
                                port: int, nodes: Iterable[str]) -> dict[str, Any]:
    """The auto mode's second DaemonSet of a trace: the same agents, privileged, only on
    `nodes` (those whose capabilities agent could not load BPF), on the trace's port (the
    capabilities agents are kept off these nodes, so the port is free there). Its pods carry
    the trace's agent labels, so they count as the trace's agents everywhere the operator
    looks; AGENT_PRIVILEGE_LABEL keeps its selector from matching the other DaemonSet's pods."""
    template = render_pod_template(trace_name, trace_uid, spec, settings, port, mode="privileged")
    template["metadata"]["labels"][AGENT_PRIVILEGE_LABEL] = "true"
    template["spec"]["affinity"] = node_name_affinity(nodes, "In")
    selector = {**agent_selector_labels(trace_name), AGENT_PRIVILEGE_LABEL: "true"}
    return _daemonset(privileged_daemonset_name(trace_name), trace_name, trace_uid, settings, port, template,
                      selector, {})


def _daemonset(name: str, trace_name: str, trace_uid: str, settings: Settings, port: int, template: dict[str, Any],
               selector: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    digest = spec_hash(template)
    template["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": agent_labels(trace_name),
            "annotations": {SPEC_HASH_ANNOTATION: digest, METRICS_PORT_ANNOTATION: str(port), **annotations},
            "ownerReferences": [trace_owner(trace_name, trace_uid, block_owner_deletion=True)],
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%"}},
            "template": template,
        },
    }
