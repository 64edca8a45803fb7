"""`retransmit-agent cluster`: the DaemonSet agent that writes this node's RetransmitNodeReport.

One agent per node and trace. It attaches the kernel program with the trace's filters,
keeps the local-IP filter current from a watch on its node's pods, creates its report
<trace>.<node> in its own namespace (owned by the trace), and on the schedule of
retransmit_core.schedule: server-side-applies it (field manager rtrace-agent/<node>,
force) when it changed, at most every report period (the interval, stretched on clusters of
more than about 1,000 nodes), and renews its heartbeat Lease of the same name every few
intervals when nothing else was written (the operator's staleness bound reads both).
Counts survive everything that can happen to a pod:
- restart (crash, kill -9, rollout): it reads its own report first and adds to it;
- SIGTERM (trace completed or deleted, node drained): it writes a final report before exit;
- API server away: the kernel keeps counting; writes retry with capped jittered backoff and
  the next successful write carries the full cumulative totals.

Kernel problems (tracefs not mounted, tracepoint missing, BPF not permitted) make the
report `phase: Failed` with the problem's one-line fix; the agent stays up and healthy
(liveness ok, readiness false) instead of crash-looping. It does not retry opening the
program: none of these problems heals while the pod runs (a new mount is not propagated
into the pod's hostPath, a security context changes only with a new pod). The message
says what to fix; deleting the agent pod after the fix makes the DaemonSet start a fresh
one, which resumes the node's counts like any restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from retransmit_core.api import Flow, KernelCheck, NodeStatus, Phase, RecentEvent
from retransmit_core.backoff import backoff_delay, jittered
from retransmit_core.contract import ENV_NODE_NAME, ENV_POD_IP, ENV_POD_NAMESPACE, AgentInvocation
from retransmit_core.schedule import (
    FINAL_REPORT_BUDGET_SECONDS,
    Write,
    liveness_bound,
    next_write,
    report_period,
    stale_after,
)
from retransmit_core.version import package_version
from retransmit_core.podindex import Owner, PodIndex, owner_in_table, with_owner

from .metrics import AgentState, MetricsServer
from .podselection import PodSelection, selected_ips
from .podwatch import PodWatcher, node_addresses
from .reporter import (
    ApiError,
    Baseline,
    FlowKey,
    PodKey,
    ReportTarget,
    ReportWriter,
    cumulative_entry,
    cumulative_pods,
    entry_changed,
    merge_flows,
    pod_totals,
    ranked_pods,
    read_entry,
)

log = logging.getLogger("retransmit_agent.cluster")

TICK = 1.0                # seconds between drains of sampled events and liveness beats
POD_SYNC_WAIT = 15.0      # seconds to wait for the pod list before attaching a filtered program
NODE_COUNT_REFRESH = 300.0  # seconds between two reads of the DaemonSet's node count


def api_client() -> Any:
    """In-cluster credentials (service account) when in a pod, else $KUBECONFIG."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _pod_of(owner_of: Callable[[str], Optional[Owner]]) -> Callable[[str], Optional[PodKey]]:
    """(namespace, pod) owning a local address; None for the node's own and unknown ones."""
    def pod_of(ip: str) -> Optional[PodKey]:
        owner = owner_of(ip)
        return (owner.namespace, owner.pod) if owner and owner.pod and owner.namespace else None
    return pod_of


class ClusterAgent:
    """The report loop. `stop()` (from SIGTERM) makes `run()` flush a final report and return."""

    def __init__(self, inv: AgentInvocation, node: str, namespace: str, client: Any) -> None:
        self.inv = inv
        self.spec = inv.spec
        self.node = node
        self.writer = ReportWriter(client, ReportTarget(inv.trace, inv.trace_uid, node, namespace))
        self._client = client
        self.stop_event = threading.Event()
        self.state = AgentState(trace=inv.trace, node=node)
        self.index = PodIndex(node, node_addresses())
        self.selection = PodSelection(frozenset(self.spec.namespaces), self.spec.pod_selector)
        self._lock = threading.Lock()       # guards index and program between threads
        self.program: Any = None
        self.problem: Optional[str] = None
        self.kernel_checks: list[KernelCheck] = []   # `retransmit-agent check`, in every report
        self.baseline: Optional[Baseline] = None
        self.last_written: Optional[NodeStatus] = None
        self.last_report_at: Optional[float] = None  # time.monotonic() of the last stored report write
        self.last_write_at: Optional[float] = None   # ... of the last stored write, report or heartbeat
        self.nodes = 0                               # nodes running this trace (0: not known yet)
        self._nodes_read_at: Optional[float] = None
        self.pod_counts: dict[PodKey, int] = {}  # every local pod's count so far (see cumulative_pods)
        self.events: deque[RecentEvent] = deque(maxlen=max(1, self.spec.events.keep))
        self._watcher: Optional[PodWatcher] = None
        self._metrics: Optional[MetricsServer] = None
        self._kernel_release = os.uname().release
        self._version = package_version()

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> int:
        self._start_metrics()
        self._start_pod_watch()
        self._open_program()
        self._read_baseline()
        try:
            self._loop()
        finally:
            self._final_report()
            self._shutdown()
        return 0

    def _start_metrics(self) -> None:
        try:
            # Bind to the pod's IP (the node's, as the pod is hostNetwork): probes and scrapes
            # go there, and agents of nodes that share one host do not take each other's port.
            host = os.environ.get(ENV_POD_IP, "")
            self._metrics = MetricsServer(self.state, self.inv.metrics_port, host=host).start()
            log.info("metrics, /readyz and /livez on %s:%d", host or "*", self._metrics.port)
        except OSError as exc:
            # The operator gives each trace its own port; a clash means something else on the
            # host holds it (or two simulated nodes share one host). Counting matters more
            # than scraping: go on without the endpoint rather than crash-loop.
            log.error("cannot serve metrics on port %d (%s: another process on the node holds it); "
                      "counting goes on without /metrics", self.inv.metrics_port, (exc.strerror or str(exc)).lower())

    def _start_pod_watch(self) -> None:
        from kubernetes import client

        self._watcher = PodWatcher(
            client.CoreV1Api(self._client), self.index, self._lock, self._pods_changed,
            lambda attempt: backoff_delay(attempt),
        )
        self._watcher.start()

    def _check_kernel(self) -> None:
        """The same lines as `retransmit-agent check`, so `kubectl describe` shows why a node
        cannot trace or runs degraded."""
        from .check import evaluate, gather_facts

        try:
            lines = evaluate(gather_facts(self.inv.tracefs))
        except Exception as exc:  # noqa: BLE001 - the check explains; it must never stop counting
            log.warning("kernel check failed (%s); the report carries no kernel checks, counting goes on", exc)
            return
        self.kernel_checks = [KernelCheck(name=line.name, status=line.status, detail=line.detail, fix=line.fix or None)
                              for line in lines]

    def _open_program(self) -> None:
        from .kernel import KernelProblem, RetransmitProgram

        self._check_kernel()

        local_ips = None
        if not self.selection.selects_everything:
            # Count nothing from unknown pods: wait for the pod list, then start filtered.
            self._watcher.synced.wait(POD_SYNC_WAIT)
            with self._lock:
                local_ips = selected_ips(self.index, self.selection)
        try:
            config = self._kernel_config(local_ips)
            program = RetransmitProgram.open(config, tracefs=self.inv.tracefs)
        except KernelProblem as exc:
            self.problem = str(exc)
            log.error("node %s cannot trace: %s", self.node, self.problem)
            with self.state.lock:
                self.state.failed = True
            return
        with self._lock:
            self.program = program
            # The pods may have changed while the program compiled.
            if not self.selection.selects_everything:
                self._set_local_ips(program)
        with self.state.lock:
            self.state.attached = True
        log.info("kernel program attached on node %s for trace %s", self.node, self.inv.trace)

    def _kernel_config(self, local_ips: Optional[frozenset[str]]) -> Any:
        from .kernel import KernelConfig

        return KernelConfig.from_spec(self.spec, local_ips=local_ips)

    def _pods_changed(self) -> None:
        """Called by the pod watch after each change: keep the kernel's local-IP set current."""
        if self.selection.selects_everything:
            return
        with self._lock:
            if self.program is not None:
                self._set_local_ips(self.program)

    def _set_local_ips(self, program: Any) -> None:
        """Push the selected pods' addresses into the kernel filter (caller holds _lock)."""
        ips = selected_ips(self.index, self.selection)
        program.set_local_ips(ips)
        with self.state.lock:
            self.state.selected_ips = None if ips is None else len(ips)

    def _read_baseline(self) -> None:
        """What this node already reported, from its own report (created here when there is
        none yet). Without it no write happens: it could lower counts."""
        attempt = 0
        while not self.stop_event.is_set():
            try:
                stored = self.writer.read()
                if stored is None:
                    # Created empty: what it holds becomes the baseline, and counts so far
                    # are this agent's own (adding them here would count them twice).
                    stored = self.writer.create(NodeStatus(
                        node=self.node, phase=Phase.PENDING, kernel=self._kernel_release,
                        agent_version=self._version, last_report_time=datetime.now(timezone.utc)))
            except ApiError as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("reading report %s failed (%s); retrying in %.1fs", self.writer.target.name, exc, delay)
                self._count_errors()
                self._wait(delay)
                continue
            previous = read_entry(stored, self.node)
            self.baseline = Baseline.from_entry(previous)
            if previous is not None and not self.baseline.empty:
                log.info("resuming node %s from %d retransmits, %d SYN-ACK retransmits",
                         self.node, previous.retransmits, previous.synack_retransmits)
            return

    def _shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        with self._lock:
            if self.program is not None:
                self.program.close()
                self.program = None
        with self.state.lock:
            self.state.attached = False
        if self._metrics is not None:
            self._metrics.stop()

    # ---------------------------------------------------------------- the loop

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, draining samples and beating every TICK; returns early on stop."""
        deadline = time.monotonic() + seconds
        while not self.stop_event.is_set():
            self._drain()
            self.state.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.stop_event.wait(min(TICK, left))

    def _interval(self) -> float:
        interval = self.spec.report_interval_seconds
        with self.state.lock:
            self.state.interval = interval
            self.state.period = report_period(interval, self.nodes)
        self.state.liveness_bound = liveness_bound(interval)
        return interval

    def _node_count(self) -> int:
        """The trace's node count, read from its DaemonSet every NODE_COUNT_REFRESH seconds.
        Unknown (unreadable) counts keep the last one: the period only stretches writes."""
        now = time.monotonic()
        if self._nodes_read_at is None or now - self._nodes_read_at >= NODE_COUNT_REFRESH:
            self._nodes_read_at = now
            try:
                self.nodes = self.writer.desired_nodes() or self.nodes
            except ApiError as exc:
                log.warning("node count of trace %s unreadable (%s); report period from %d nodes",
                            self.inv.trace, exc, self.nodes)
        return self.nodes

    def _loop(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            if self._report():
                failures = 0
                self._wait(jittered(self._interval()))
            else:
                delay = min(backoff_delay(failures), self._interval())
                failures += 1
                self._wait(delay)

    def _drain(self) -> None:
        with self._lock:
            program = self.program
            if program is None:
                return
            fresh = program.drain_events()
        if fresh and self.spec.events.keep > 0:
            self.events.extend(fresh)

    def _count_errors(self) -> None:
        with self.state.lock:
            self.state.report_errors += 1

    # ---------------------------------------------------------------- one report

    def build_entry(self) -> NodeStatus:
        """The cumulative entry for this node right now (no I/O but reading the kernel maps)."""
        from .flows import busiest_first
        from .nodeentry import build_node_report

        baseline = self.baseline or Baseline()
        now = datetime.now(timezone.utc)
        with self._lock:
            program = self.program
            snapshot = program.snapshot() if program is not None else None
            table = self.index.lookup_table()
        top_n, keep = self.spec.top_flows, self.spec.events.keep
        if snapshot is None:
            base = NodeStatus(node=self.node, phase=Phase.FAILED if self.problem else Phase.PENDING,
                              message=self.problem, kernel=self._kernel_release, kernel_checks=self.kernel_checks,
                              agent_version=self._version, last_report_time=now)
            entry = cumulative_entry(baseline, base, list(baseline.top_flows.values()), top_n, keep)
            self.pod_counts = cumulative_pods(baseline, {}, self.pod_counts)
            return entry.model_copy(update={"top_pods": ranked_pods(self.pod_counts, self.node, top_n)})
        # Only flows that can make the top N after adding the baseline become API objects:
        # the busiest fresh ones and those the baseline already knows (the map may hold 32k).
        ordered = busiest_first(snapshot.flow_counters)
        candidates = ordered[: 2 * top_n] + [
            f for f in ordered[2 * top_n:]
            if FlowKey(f.family, f.local_ip, f.local_port, f.remote_ip, f.remote_port) in baseline.top_flows
        ]
        fresh = build_node_report(
            self.node, dataclasses.replace(snapshot, flow_counters=candidates), list(self.events)[::-1], 0,
            self._kernel_release, self._version, keep_events=keep, report_time=now,
            kernel_checks=self.kernel_checks,
        )
        fresh = fresh.model_copy(update={"phase": Phase.RUNNING, "message": None, "flows": len(snapshot.flow_counters)})
        merged = merge_flows(baseline, fresh.top_flows)
        entry = cumulative_entry(baseline, fresh, merged, top_n, keep)
        # Every flow in the kernel map is attributed twice below (metrics, pod totals), but it
        # holds few local addresses: look each up once.
        owner_of = self._owner_lookup(table)
        self._publish_metrics(entry, baseline, snapshot.flow_counters, owner_of)
        # Pods over every flow in the kernel map, not just the top flows.
        self.pod_counts = cumulative_pods(baseline, pod_totals(snapshot.flow_counters, _pod_of(owner_of)), self.pod_counts)
        attributed = entry.model_copy(update={
            "top_flows": [self._attributed(f, table) for f in entry.top_flows],
            "top_pods": ranked_pods(self.pod_counts, self.node, top_n),
            "recent_events": [self._attributed_event(e, table) for e in entry.recent_events],
        })
        return attributed

    def _owner_lookup(self, table: dict) -> Callable[[str], Optional[Owner]]:
        """owner_in_table() for this report's table, memoized: the kernel map holds many flows but
        few local addresses."""
        known: dict[str, Optional[Owner]] = {}

        def owner_of(ip: str) -> Optional[Owner]:
            if ip not in known:
                known[ip] = owner_in_table(table, ip, self.node)
            return known[ip]
        return owner_of

    def _attributed(self, flow: Flow, table: dict) -> Flow:
        return flow.model_copy(update={
            "local": with_owner(flow.local, owner_in_table(table, flow.local.ip, self.node)),
            "remote": with_owner(flow.remote, owner_in_table(table, flow.remote.ip, self.node)),
        })

    def _attributed_event(self, event: RecentEvent, table: dict) -> RecentEvent:
        return event.model_copy(update={
            "local": with_owner(event.local, owner_in_table(table, event.local.ip, self.node)),
            "remote": with_owner(event.remote, owner_in_table(table, event.remote.ip, self.node)),
        })

    def _publish_metrics(self, entry: NodeStatus, baseline: Baseline, flows: list,
                         owner_of: Callable[[str], Optional[Owner]]) -> None:
        """Retransmits by local pod and remote port over every flow (kernel map + baseline)."""
        by_pod_port: dict[tuple[str, str, str], int] = {}

        def add(local_ip: str, remote_port: int, count: int) -> None:
            owner = owner_of(local_ip)
            namespace = (owner.namespace or "") if owner else ""
            pod = (owner.pod or owner.node or "") if owner else ""
            key = (namespace, pod, str(remote_port))
            by_pod_port[key] = by_pod_port.get(key, 0) + count

        for f in flows:
            old = baseline.top_flows.get(FlowKey(f.family, f.local_ip, f.local_port, f.remote_ip, f.remote_port))
            add(f.local_ip, f.remote_port, f.retransmits + (old.retransmits if old else 0))
        seen = {FlowKey(f.family, f.local_ip, f.local_port, f.remote_ip, f.remote_port) for f in flows}
        for key, old in baseline.top_flows.items():
            if key not in seen:
                add(key.local_ip, key.remote_port, old.retransmits)
        self.state.publish_counts(entry.retransmits, entry.synack_retransmits, entry.lost_events, by_pod_port,
                                  missed=entry.missed_events, by_state=entry.by_state, by_cause=entry.by_cause,
                                  failed=entry.failed_attempts)

    def _report(self, final: bool = False) -> bool:
        """Write what the schedule says is due (`final`: the report, if it changed). True when
        nothing is left to write."""
        if self.baseline is None:
            return False
        addresses = node_addresses()  # the node's own addresses can change (DHCP, new bridges)
        with self._lock:
            self.index.set_node_addresses(addresses)
        entry = self.build_entry()
        changed = entry_changed(self.last_written, entry)
        if final:
            write = Write.REPORT if changed else Write.NOTHING
        else:
            now = time.monotonic()
            since = lambda at: None if at is None else now - at  # noqa: E731
            write = next_write(changed, since(self.last_report_at), since(self.last_write_at),
                               self._interval(), self._node_count())
        if write is Write.NOTHING:
            return True
        if write is Write.HEARTBEAT and self._heartbeat():
            return True
        # The report itself, also when a heartbeat failed: it proves the agent alive too.
        try:
            self.writer.apply(entry)
        except ApiError as exc:
            self._count_errors()
            log.warning("writing report %s failed: %s", self.writer.target.name, exc)
            return False
        self.last_written = entry
        self.last_report_at = self.last_write_at = time.monotonic()
        with self.state.lock:
            self.state.reports += 1
        return True

    def _heartbeat(self) -> bool:
        """Renew the report's heartbeat Lease; False when that failed."""
        bound = stale_after(self.spec.report_interval_seconds)
        try:
            self.writer.heartbeat(datetime.now(timezone.utc), round(bound.total_seconds()))
        except ApiError as exc:
            self._count_errors()
            log.warning("renewing heartbeat %s failed (%s); writing the report instead", self.writer.target.name, exc)
            return False
        self.last_write_at = time.monotonic()
        with self.state.lock:
            self.state.heartbeats += 1
        return True

    def _final_report(self) -> None:
        """SIGTERM: everything counted so far goes into the report before the pod ends."""
        deadline = time.monotonic() + FINAL_REPORT_BUDGET_SECONDS
        if self.baseline is None:
            # Never got the earlier report: one last try, else writing could lower the counts.
            try:
                self.baseline = Baseline.from_entry(read_entry(self.writer.read(), self.node))
            except ApiError as exc:
                log.error("final report skipped: earlier report unreadable (%s)", exc)
                return
        self._drain()
        attempt = 0
        while True:
            if self._report(final=True):
                log.info("final report written for node %s", self.node)
                return
            delay = backoff_delay(attempt, cap=5.0)
            attempt += 1
            if time.monotonic() + delay > deadline:
                log.error("final report for node %s not written within %.0fs", self.node, FINAL_REPORT_BUDGET_SECONDS)
                return
            time.sleep(delay)


def _downward_env(name: str, field_path: str) -> str:
    """An environment variable the DaemonSet sets from the downward API; "" (and the fix on
    stderr) when it is missing."""
    value = os.environ.get(name, "")
    if not value:
        print(f"retransmit-agent cluster: environment variable {name} is not set: set it from the downward "
              f"API (fieldRef {field_path}), as the operator's DaemonSet does", file=sys.stderr)
    return value


def run(invocation: AgentInvocation) -> int:
    """Entry point of `retransmit-agent cluster`."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = _downward_env(ENV_NODE_NAME, "spec.nodeName")
    if not node:
        return 2
    try:
        client = api_client()
    except Exception as exc:  # noqa: BLE001 - no credentials at all
        print(f"retransmit-agent cluster: no Kubernetes credentials ({exc}): run inside a pod "
              f"with a service account, or set KUBECONFIG", file=sys.stderr)
        return 2
    namespace = _downward_env(ENV_POD_NAMESPACE, "metadata.namespace")
    if not namespace:
        return 2
    agent = ClusterAgent(invocation, node, namespace, client)

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: writing a final report, then exiting", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return agent.run()
