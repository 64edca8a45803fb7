"""The agent's HTTP endpoints: Prometheus /metrics, /readyz (program attached), /livez (loop alive).

`AgentState` is what the report loop publishes after each round; the collector turns it into
metrics when Prometheus scrapes, so there is one source for the numbers (the same cumulative
counts that go into status.nodes[]).

Label names never collide with the labels the Prometheus Operator (and most scrape configs)
put on a scraped target: `namespace`, `pod`, `container`, `instance`, `job`, `service`,
`endpoint` are the agent pod's own, kept on every series and on `up`; the pod that
retransmitted is `pod_namespace`/`pod_name`. (On OpenShift's user-workload monitoring
`namespace` is always the target's, whatever the scrape config says.)

Metrics (all carry the label `trace`):
- rtrace_agent_info{node,version,kernel,mode}: 1; the agent's version, the node's kernel
  release and its security mode (preflight.security_mode: privileged, capabilities or
  unprivileged, from its effective capabilities).
- rtrace_retransmits_total{pod_namespace,pod_name,remote_port}: tcp_retransmit_skb events
  (retransmitted skbs: one skb may carry several segments) by the local pod (empty for
  addresses that are no pod's; the node's own addresses under pod_namespace "" pod_name
  "<node>") and remote port. Remote ports from 32768 up (Linux's default ephemeral range:
  the clients' side of connections to a server pod) are one value, "ephemeral", so a series
  is a (pod, service port) pair, never a flow: a server pod has one series for all its
  clients, a client pod one per server port it talks to below 32768. A series never
  decreases: when the kernel's LRU map evicts a flow, the series keeps its highest value.
- rtrace_node_retransmits_total, rtrace_node_synack_retransmits_total: the node's exact totals.
- rtrace_node_retransmits_by_state_total{state}: tcp_retransmit_skb and tcp_retransmit_synack
  events by the socket's TCP state as the kernel names it without `TCP_` (SYN-ACK retransmits
  under SYN_RECV; UNKNOWN on kernels whose tracepoint has no state): at most the kernel's dozen
  states plus UNKNOWN per node. The node's status.nodes[].byState, as a counter.
- rtrace_lost_events_total: samples dropped (rate limit, full buffer); counts stay exact.
- rtrace_node_retransmits_by_cause_total{cause}: the same events by cause (timeout, fast, probe,
  unknown: 4 values).
- rtrace_failed_attempts_total: retransmits the kernel could not send (Linux 6.17+; no series
  where the kernel cannot tell).
- rtrace_missed_events_total: tracepoint hits the kernel did not run the program for
  (another BPF program was running on that CPU); the true counts may be higher by this much.
- rtrace_report_errors_total: report and heartbeat writes that failed (API server away, refused).
- rtrace_reports_total: report writes that succeeded.
- rtrace_heartbeats_total: heartbeat Lease renewals that succeeded (the report did not change).
- rtrace_program_attached: 1 while the kernel program is attached.
- rtrace_agent_failed: 1 when this node cannot trace (tracefs, tracepoint or BPF permission
  missing: the node's report says `phase: Failed` and why); 0 otherwise, including while the
  program compiles (attached 0, failed 0 = starting).
- rtrace_report_interval_seconds: the trace's reportInterval.
- rtrace_report_period_seconds: seconds between two report writes while counts keep changing:
  the interval, stretched on big clusters (retransmit_core.schedule.report_period).
- rtrace_cluster_agents: the agents of every running trace together, as this agent last read
  them from its DaemonSet: the count its report period and heartbeat stretch by.
- rtrace_selected_local_ips: pod addresses in the kernel's local-IP filter, when the trace
  selects pods (namespaces, podSelector); follows the pods as they come and go.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from retransmit_core.api import NodeStatus
from retransmit_core.schedule import LIVENESS_FLOOR_SECONDS

log = logging.getLogger(__name__)


# rtrace_retransmits_total's remote_port: ports from here up are "ephemeral" (see above).
EPHEMERAL_PORTS_FROM = 32768

# The labels naming the pod that retransmitted: not `namespace`/`pod`, which are the scraped
# target's (the agent pod's) and would be renamed exported_* or dropped (see above).
POD_NAMESPACE_LABEL = "pod_namespace"
POD_NAME_LABEL = "pod_name"
PER_POD_LABELS = ("trace", POD_NAMESPACE_LABEL, POD_NAME_LABEL, "remote_port")
AGENT_INFO_LABELS = ("trace", "node", "version", "kernel", "mode")


@dataclass(frozen=True)
class AgentInfo:
    """What rtrace_agent_info says about the agent: fixed for its lifetime."""

    version: str
    kernel: str
    mode: str     # preflight.security_mode of the agent's effective capabilities


def remote_port_label(port: str) -> str:
    """The port, or "ephemeral" from 32768 up: clients' ports would make a series per flow.
    (Servers listening that high, e.g. gRPC's 50051, fall under "ephemeral" too; the trace's
    status names every flow with both ports.)"""
    return "ephemeral" if port.isdigit() and int(port) >= EPHEMERAL_PORTS_FROM else port


@dataclass
class AgentState:
    """Shared between the report loop (writer) and the HTTP server (reader), under `lock`."""

    trace: str
    node: str
    info: AgentInfo
    # How long the report loop may stay silent before /livez fails.
    liveness_bound: float = LIVENESS_FLOOR_SECONDS
    attached: bool = False
    last_loop: float = field(default_factory=time.monotonic)
    retransmits: int = 0
    synack_retransmits: int = 0
    lost_events: int = 0
    missed_events: Optional[int] = None      # None: the kernel cannot count them (series left out)
    failed_attempts: Optional[int] = None    # None: the kernel cannot tell (series left out)
    by_cause: dict[str, int] = field(default_factory=dict)
    report_errors: int = 0
    reports: int = 0
    heartbeats: int = 0
    interval: float = 0.0
    period: float = 0.0
    agents: int = 0                      # the cluster's agents the period was computed for
    failed: bool = False                 # the kernel program cannot be opened on this node
    selected_ips: Optional[int] = None   # addresses in the kernel's local-IP filter; None = no filter
    local_ips_left_out: int = 0          # selected addresses the filter maps had no room for
    by_state: dict[str, int] = field(default_factory=dict)
    by_pod_port: dict[tuple[str, str, str], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def beat(self) -> None:
        """The report loop is alive."""
        with self.lock:
            self.last_loop = time.monotonic()

    def alive(self, now: Optional[float] = None) -> bool:
        with self.lock:
            return (now if now is not None else time.monotonic()) - self.last_loop <= self.liveness_bound

    def publish_entry(self, entry: NodeStatus, by_pod_port: dict[tuple[str, str, str], int]) -> None:
        """The counts of a node entry (cumulative) and its retransmits by pod and remote port."""
        self.publish_counts(entry.retransmits, entry.synack_retransmits, entry.lost_events, by_pod_port,
                            missed=entry.missed_events, by_state=entry.by_state, by_cause=entry.by_cause,
                            failed=entry.failed_attempts)

    def publish_counts(self, retransmits: int, synack: int, lost: int,
                       by_pod_port: dict[tuple[str, str, str], int], missed: Optional[int] = None,
                       by_state: Optional[dict[str, int]] = None, by_cause: Optional[dict[str, int]] = None,
                       failed: Optional[int] = None) -> None:
        with self.lock:
            for counts, values in ((self.by_state, by_state), (self.by_cause, by_cause)):
                for key, value in (values or {}).items():
                    counts[key] = max(counts.get(key, 0), value)
            self.retransmits = max(self.retransmits, retransmits)
            self.synack_retransmits = max(self.synack_retransmits, synack)
            self.lost_events = max(self.lost_events, lost)
            if missed is not None:
                self.missed_events = max(self.missed_events or 0, missed)
            if failed is not None:
                self.failed_attempts = max(self.failed_attempts or 0, failed)
            labelled: dict[tuple[str, str, str], int] = {}
            for (namespace, pod, port), value in by_pod_port.items():
                key = (namespace, pod, remote_port_label(port))
                labelled[key] = labelled.get(key, 0) + value
            for key, value in labelled.items():
                if value > self.by_pod_port.get(key, 0):
                    self.by_pod_port[key] = value


class AgentCollector:
    """Reads AgentState at scrape time."""

    def __init__(self, state: AgentState) -> None:
        self._state = state

    def collect(self) -> Iterable:
        s = self._state
        with s.lock:
            info = GaugeMetricFamily("rtrace_agent_info", "1; the agent's version, the node's kernel release and "
                                     "the agent's security mode (privileged, capabilities, unprivileged).",
                                     labels=list(AGENT_INFO_LABELS))
            info.add_metric([s.trace, s.node, s.info.version, s.info.kernel, s.info.mode], 1.0)
            yield info
            per_pod = CounterMetricFamily(
                "rtrace_retransmits", "Retransmitted skbs by the local pod (pod_namespace, pod_name) and remote port.",
                labels=list(PER_POD_LABELS),
            )
            for (namespace, pod, port), value in sorted(s.by_pod_port.items()):
                per_pod.add_metric([s.trace, namespace, pod, port], value)
            yield per_pod
            by_state = CounterMetricFamily(
                "rtrace_node_retransmits_by_state", "Retransmitted skbs and SYN-ACKs by TCP state.",
                labels=["trace", "node", "state"],
            )
            for state, value in sorted(s.by_state.items()):
                by_state.add_metric([s.trace, s.node, state], value)
            yield by_state
            by_cause = CounterMetricFamily(
                "rtrace_node_retransmits_by_cause", "Retransmitted skbs and SYN-ACKs by cause "
                "(timeout, fast, probe, unknown).", labels=["trace", "node", "cause"],
            )
            for cause, value in sorted(s.by_cause.items()):
                by_cause.add_metric([s.trace, s.node, cause], value)
            yield by_cause
            for name, doc, value in (
                ("rtrace_node_retransmits", "Retransmitted skbs on this node (every matched tcp_retransmit_skb event).", s.retransmits),
                ("rtrace_node_synack_retransmits", "Retransmitted SYN-ACKs on this node (every matched tcp_retransmit_synack event).", s.synack_retransmits),
                ("rtrace_lost_events", "Samples dropped by the rate limit or a full buffer.", s.lost_events),
                ("rtrace_missed_events", "Tracepoint hits the kernel did not run the program for (another BPF program was running on that CPU).", s.missed_events),
                ("rtrace_failed_attempts", "Retransmits the kernel tried and could not send.", s.failed_attempts),
                ("rtrace_report_errors", "Report and heartbeat writes that failed.", s.report_errors),
                ("rtrace_reports", "Report writes that succeeded.", s.reports),
                ("rtrace_heartbeats", "Heartbeat Lease renewals that succeeded.", s.heartbeats),
            ):
                if value is None:
                    continue   # the kernel cannot tell: no series rather than a false 0
                family = CounterMetricFamily(name, doc, labels=["trace", "node"])
                family.add_metric([s.trace, s.node], value)
                yield family
            attached = GaugeMetricFamily("rtrace_program_attached", "1 while the kernel program is attached.", labels=["trace", "node"])
            attached.add_metric([s.trace, s.node], 1.0 if s.attached else 0.0)
            yield attached
            failed = GaugeMetricFamily("rtrace_agent_failed", "1 when this node cannot trace (its report says phase Failed and why).",
                                       labels=["trace", "node"])
            failed.add_metric([s.trace, s.node], 1.0 if s.failed else 0.0)
            yield failed
            if s.selected_ips is not None:
                selected = GaugeMetricFamily("rtrace_selected_local_ips", "Pod addresses in the kernel's local-IP filter (namespaces/podSelector).", labels=["trace", "node"])
                selected.add_metric([s.trace, s.node], s.selected_ips)
                yield selected
                left_out = GaugeMetricFamily("rtrace_local_ip_filter_left_out", "Selected pod addresses the kernel's local-IP filter has no room for: their flows are not counted.", labels=["trace", "node"])
                left_out.add_metric([s.trace, s.node], s.local_ips_left_out)
                yield left_out
            interval = GaugeMetricFamily("rtrace_report_interval_seconds", "The trace's reportInterval.", labels=["trace", "node"])
            interval.add_metric([s.trace, s.node], s.interval)
            yield interval
            period = GaugeMetricFamily("rtrace_report_period_seconds",
                                       "Seconds between two report writes while counts change (the interval, stretched on big clusters).",
                                       labels=["trace", "node"])
            period.add_metric([s.trace, s.node], s.period)
            yield period
            agents = GaugeMetricFamily("rtrace_cluster_agents",
                                       "Agents of every running trace together, as this agent last read them "
                                       "(its report period and heartbeat stretch by this count).",
                                       labels=["trace", "node"])
            agents.add_metric([s.trace, s.node], s.agents)
            yield agents


def _handler(state: AgentState, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/readyz":
                with state.lock:
                    ok = state.attached
                self._send(200 if ok else 503, b"ok\n" if ok else b"kernel program not attached\n")
            elif path == "/livez":
                ok = state.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"report loop stalled\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("metrics: " + fmt, *args)

    return Handler


class MetricsServer:
    """/metrics, /readyz and /livez on `port` (0 picks a free port), served from a daemon thread."""

    def __init__(self, state: AgentState, port: int, host: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(state))
        self._server = ThreadingHTTPServer((host, port), _handler(state, self.registry))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
