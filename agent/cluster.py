"""`retransmit-agent cluster`: the DaemonSet agent that writes this node's RetransmitNodeReport.

One agent per node and trace. It attaches the kernel program with the trace's filters,
keeps the local-IP filter current from a watch on its node's pods, creates its report
<trace>.<node> in its own namespace (owned by the trace), and on the schedule of
retransmit_core.schedule: server-side-applies it (field manager rtrace-agent/<node>,
force) when it changed, at most every report period (the interval, stretched on clusters of
more than about 1,000 nodes), and renews its heartbeat Lease of the same name every few
intervals when nothing else was written (the operator's staleness bound reads both).
Counts survive everything that can happen to a pod:
- restart (crash, kill -9, rollout): it reads its own report first and adds to it (only its
  own trace's: a report owned by an earlier trace of the same name is replaced, and a
  re-created trace counts from zero);
- a deleted report: a quiet node reads its report's metadata back once per report period
  and writes it again, with the cumulative counts it holds;
- SIGTERM (trace completed or deleted, node drained): it writes a final report before exit,
  always (also after a heartbeat), retrying within FINAL_REPORT_BUDGET_SECONDS;
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from retransmit_core.api import KernelCheck, NodeStatus, Phase, RecentEvent
from retransmit_core.backoff import backoff_delay, jittered
from retransmit_core.contract import ENV_NODE_NAME, ENV_POD_IP, ENV_POD_NAMESPACE, AgentInvocation
from retransmit_core.podindex import PodIndex
from retransmit_core.schedule import (
    AGENT_COUNT_REFRESH_SECONDS,
    FINAL_REPORT_BUDGET_SECONDS,
    Write,
    liveness_bound,
    report_period,
    stale_after,
)
from retransmit_core.version import package_version

from .conntrack import ServiceBackends
from .metrics import AgentInfo, AgentState, MetricsServer
from .nodeentry import NodeEntry, NodeFacts, node_entry
from .preflight import effective_capabilities, security_mode
from .podsegments import PodSegmentReader
from .podselection import PodSelection, selected_ips, with_filter_check
from .podwatch import PodWatcher, node_addresses
from .reportwriter import ApiError, ReportTarget, ReportWriter
from .socketowners import SocketOwners
from .resume import Baseline, PodTotals, StoredReport, read_entry, stored_report
from .writeschedule import WriteTimes, check_due, decide_write, entry_changed, final_attempt_timeout, final_retry_wait

log = logging.getLogger("retransmit_agent.cluster")

TICK = 1.0                # seconds between drains of sampled events and liveness beats
LOOPBACK = frozenset({"127.0.0.1", "::1"})   # node addresses too: a hostNetwork pod may talk on them
POD_SYNC_WAIT = 15.0      # seconds to wait for the pod list before attaching a filtered program
NODE_COUNT_REFRESH = AGENT_COUNT_REFRESH_SECONDS  # seconds between two reads of the cluster's agent count


def api_client() -> Any:
    """In-cluster credentials (service account) when in a pod, else $KUBECONFIG."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


@dataclass
class LoopState:
    """What the report loop carries from one wake-up to the next."""

    baseline: Optional[Baseline] = None    # None until the node's own report was read: no write before it
    pod_totals: Optional[PodTotals] = None   # node_entry's, fed back into the next one (None: resume)
    remote_counts: dict[str, int] = field(default_factory=dict)   # likewise
    overflow_said: bool = False            # the log said once that per-pod counts overflowed
    last_written: Optional[NodeStatus] = None
    written_at: WriteTimes = WriteTimes()
    nodes: int = 0                         # nodes running this trace (0: not known yet)
    nodes_read_at: Optional[float] = None  # time.monotonic() of the last read of that count
    superseded: bool = False               # the report is another trace's (ours was re-created): write nothing


class ClusterAgent:
    """The I/O shell around the pipeline snapshot -> node_entry -> decide_write -> ReportWriter.
    `stop()` (from SIGTERM) makes `run()` flush a final report and return."""

    def __init__(self, inv: AgentInvocation, node: str, namespace: str, client: Any) -> None:
        self.inv = inv
        self.client = client
        self.writer = ReportWriter(client, ReportTarget(inv.trace, inv.trace_uid, node, namespace))
        kernel, version = os.uname().release, package_version()
        self.facts = NodeFacts(node=node, kernel_release=kernel, agent_version=version)
        self.stop_event = threading.Event()
        # What /metrics, /readyz and /livez read.
        self.state = AgentState(trace=inv.trace, node=node, info=AgentInfo(
            version=version, kernel=kernel, mode=security_mode(effective_capabilities())))
        self.lock = threading.Lock()       # guards index and program between the loop and the pod watch
        self.index = PodIndex(node, node_addresses())
        self.selection = PodSelection(frozenset(inv.spec.namespaces), inv.spec.pod_selector)
        self.socket_owners = SocketOwners.find()   # by cgroup where the host's cgroup2 is mounted, else by address
        self._cgroups: Optional[frozenset[int]] = None   # the selected cgroup ids in the kernel filter
        self.program: Any = None
        self.pod_segments: Optional[PodSegmentReader] = None   # from when the program counts
        self.events: deque[RecentEvent] = deque(maxlen=max(1, inv.spec.events.keep))
        self.loop = LoopState()
        self.backends = ServiceBackends()   # Service flows' backends, from the node's conntrack
        self._watcher: Optional[PodWatcher] = None
        self._metrics: Optional[MetricsServer] = None

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> int:
        self._start_metrics()
        self._start_pod_watch()
        self.open_program()
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
            client.CoreV1Api(self.client), self.index, self.lock, self._pods_changed,
            lambda attempt: backoff_delay(attempt),
        )
        self._watcher.start()

    def _kernel_checks(self) -> tuple[KernelCheck, ...]:
        """The same lines as `retransmit-agent check`, so `kubectl describe` shows why a node
        cannot trace or runs degraded."""
        from .check import evaluate, gather_facts

        try:
            lines = evaluate(gather_facts(self.inv.tracefs))
        except Exception as exc:  # noqa: BLE001 - the check explains; it must never stop counting
            log.warning("kernel check failed (%s); the report carries no kernel checks, counting goes on", exc)
            return ()
        return tuple(KernelCheck(name=line.name, status=line.status, detail=line.detail, fix=line.fix or None)
                     for line in lines)

    def open_program(self) -> None:
        """Attach the kernel program; when the node cannot trace, the problem goes into every
        report (phase Failed) and /metrics, and the agent stays up."""
        from .kernel import KernelConfig, KernelProblem, RetransmitProgram
        from .preflight import PrivilegeProblem

        self.facts = dataclasses.replace(self.facts, kernel_checks=self._kernel_checks())
        local_ips = None
        if not self.selection.selects_everything:
            # Count nothing from unknown pods: wait for the pod list, then start filtered.
            self._watcher.synced.wait(POD_SYNC_WAIT)
            with self.lock:
                local_ips = selected_ips(self.index, self.selection)
        try:
            program = RetransmitProgram.open(KernelConfig.from_spec(self.inv.spec, local_ips=local_ips),
                                             tracefs=self.inv.tracefs, cgroups=self.socket_owners.available)
        except KernelProblem as exc:
            needs_privileged = isinstance(exc, PrivilegeProblem) and exc.needs_privileged
            self.facts = dataclasses.replace(self.facts, problem=str(exc), needs_privileged=needs_privileged)
            log.error("node %s cannot trace%s: %s", self.facts.node,
                      " without privileges this agent lacks" if needs_privileged else "", exc)
            with self.state.lock:
                self.state.failed = True
            return
        self.socket_owners.settle(program)
        self.facts = dataclasses.replace(self.facts, socket_owners=self.socket_owners.mode)
        with self.lock:
            self.program = program
            # The pods may have changed while the program compiled.
            if not self.selection.selects_everything:
                self._set_local_ips(program)
        # The pods' namespace counters start now too: read the pods known at this moment.
        self.pod_segments = PodSegmentReader(datetime.now(timezone.utc))
        self._read_pod_segments()
        with self.state.lock:
            self.state.attached = True
        log.info("kernel program attached on node %s for trace %s", self.facts.node, self.inv.trace)

    def _pods_changed(self) -> None:
        """Called by the pod watch after each change: keep the kernel's local-IP set current."""
        if self.selection.selects_everything:
            return
        with self.lock:
            if self.program is not None:
                self._set_local_ips(self.program)

    def _set_local_ips(self, program: Any, cgroups: Optional[frozenset[int]] = None) -> None:
        """Push the selected pods' addresses (and the selected hostNetwork pods' cgroups, when
        the caller has just worked them out: each costs a walk of the cgroup hierarchy) into the
        kernel filter (caller holds the lock)."""
        ips = selected_ips(self.index, self.selection)
        if cgroups is None:
            cgroups = self.socket_owners.selected_cgroups(self.index, self.selection)
        self._cgroups = cgroups
        left_out = program.set_local_ips(ips, node_ips=self.index.node_ips() | LOOPBACK, cgroups=cgroups)
        if left_out:
            log.warning("%d selected pod addresses do not fit the local-IP filter (%d per family): not counted",
                        left_out, program.config.filter_capacity)
        self.facts = dataclasses.replace(self.facts, kernel_checks=with_filter_check(
            self.facts.kernel_checks, left_out, program.config.filter_capacity))
        with self.state.lock:
            self.state.selected_ips = None if ips is None else len(ips)
            self.state.local_ips_left_out = left_out

    def _read_baseline(self) -> None:
        """What this node already reported, from its own report (created here when there is
        none yet). Without it no write happens: it could lower counts."""
        attempt = 0
        while not self.stop_event.is_set():
            try:
                # Created empty: what it holds becomes the baseline, and counts so far
                # are this agent's own (adding them here would count them twice).
                empty = NodeStatus(
                    node=self.facts.node, phase=Phase.PENDING, kernel=self.facts.kernel_release,
                    agent_version=self.facts.agent_version, last_report_time=datetime.now(timezone.utc))
                stored = self.writer.read()
                if stored is None:
                    stored = self.writer.create(empty)
                if stored_report(stored, self.inv.trace_uid) is StoredReport.FOREIGN:
                    # An earlier trace of this name, not yet garbage-collected: never resumed.
                    log.info("report %s belongs to an earlier trace of the same name (owner uid %s): "
                             "replacing it, counting from zero", self.writer.target.name,
                             (stored.get("metadata") or {}).get("ownerReferences"))
                    stored = self.writer.replace(stored, empty)
            except ApiError as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("reading report %s failed (%s); retrying in %.1fs", self.writer.target.name, exc, delay)
                self._count_errors()
                self._wait(delay)
                continue
            previous = read_entry(stored, self.facts.node, self.inv.trace_uid)
            self.loop.baseline = Baseline.from_entry(previous)
            if previous is not None and not self.loop.baseline.empty:
                log.info("resuming node %s from %d retransmits, %d SYN-ACK retransmits",
                         self.facts.node, previous.retransmits, previous.synack_retransmits)
            return

    def _shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        with self.lock:
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
        """The trace's report interval, published with the report period it gives."""
        interval = self.inv.spec.report_interval_seconds
        with self.state.lock:
            self.state.interval = interval
            self.state.period = report_period(interval, self.loop.nodes)
            self.state.agents = self.loop.nodes
        self.state.liveness_bound = liveness_bound(interval)
        return interval

    def _refresh_node_count(self) -> None:
        """The agents of all running traces (retransmit_core.schedule.desired_nodes), read from
        this trace's DaemonSet every NODE_COUNT_REFRESH seconds.
        Unknown (unreadable) counts keep the last one: the period only stretches writes."""
        now = time.monotonic()
        if self.loop.nodes_read_at is not None and now - self.loop.nodes_read_at < NODE_COUNT_REFRESH:
            return
        self.loop.nodes_read_at = now
        try:
            self.loop.nodes = self.writer.desired_nodes() or self.loop.nodes
        except ApiError as exc:
            log.warning("node count of trace %s unreadable (%s); report period from %d nodes",
                        self.inv.trace, exc, self.loop.nodes)

    def _loop(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            self._refresh_node_count()
            if self._report():
                failures = 0
                self._wait(jittered(self._interval()))
            else:
                delay = min(backoff_delay(failures), self._interval())
                failures += 1
                self._wait(delay)

    def _drain(self) -> None:
        with self.lock:
            program = self.program
            if program is None:
                return
            fresh = program.drain_events()
        if fresh and self.inv.spec.events.keep > 0:
            self.events.extend(fresh)

    def _count_errors(self) -> None:
        with self.state.lock:
            self.state.report_errors += 1

    # ---------------------------------------------------------------- one report

    def _read_pod_segments(self) -> dict:
        """The selected local pods' own segment counters since counting began (podsegments.py);
        the /proc reads happen outside the lock the pod watch needs."""
        if self.pod_segments is None:
            return {}
        with self.lock:
            pods = [pod for pod in self.index.pods if self.selection.matches(pod)]
        return self.pod_segments.read(pods)

    def _next_entry(self, baseline: Baseline) -> NodeEntry:
        """Read the kernel and the pod index, then the pure step: the cumulative entry now."""
        addresses = node_addresses()  # the node's own addresses can change (DHCP, new bridges)
        pod_segments = self._read_pod_segments()
        with self.lock:
            self.index.set_node_addresses(addresses)
            if self.program is not None and not self.selection.selects_everything:
                cgroups = self.socket_owners.selected_cgroups(self.index, self.selection)
                if cgroups != self._cgroups:
                    self._set_local_ips(self.program, cgroups)   # hostNetwork pods' new containers' cgroups
            snapshot = self.program.snapshot() if self.program is not None else None
            owners = self.index.lookup_table()
            cgroup_owners = self.socket_owners.named(
                {c.cgroup for c in snapshot.flow_counters} | {cg for _ip, cg in snapshot.by_local_owner},
                self.index.uid_table(), self.facts.node) if snapshot is not None and self.socket_owners.available else None
        spec = self.inv.spec
        step = node_entry(snapshot, self.facts, top_flows=spec.top_flows, keep_events=spec.events.keep,
                          now=datetime.now(timezone.utc), recent_events=list(self.events)[::-1],
                          baseline=baseline, previous_pods=self.loop.pod_totals,
                          previous_remotes=self.loop.remote_counts, owners=owners, pod_segments=pod_segments,
                          cgroup_owners=cgroup_owners)
        period = report_period(spec.report_interval_seconds, self.loop.nodes)
        return dataclasses.replace(step, entry=self.backends.named(
            step.entry, time.monotonic(), period, resumed=baseline.top_flows.values()))

    def _report(self, final: bool = False, timeout: Optional[float] = None) -> bool:
        """Write what the schedule says is due (`final`: the report, with `timeout`). True when
        nothing is left to write."""
        if self.loop.baseline is None:
            return False
        if self.loop.superseded:
            return True
        step = self._next_entry(self.loop.baseline)
        self.loop.pod_totals = step.pod_totals
        self.loop.remote_counts = step.remote_counts
        if step.entry.pod_counts_overflow and not self.loop.overflow_said:
            self.loop.overflow_said = True
            log.warning("the kernel's per-address map was full: %d retransmits are in no pod's count "
                        "(podCountsOverflow); the pods whose addresses did not fit count low",
                        step.entry.pod_counts_overflow)
        if step.by_pod_port is not None:
            self.state.publish_entry(step.entry, step.by_pod_port)
        write = decide_write(entry_changed(self.loop.last_written, step.entry), self.loop.written_at,
                             time.monotonic(), self._interval(), self.loop.nodes, final=final)
        if write is not Write.REPORT and check_due(self.loop.written_at, time.monotonic(), self._interval(),
                                                   self.loop.nodes):
            write = self._check_report(write)
        if write is Write.NOTHING:
            return True
        if write is Write.HEARTBEAT and self._heartbeat():
            return True
        # The report itself, also when a heartbeat failed: it proves the agent alive too.
        try:
            self.writer.apply(step.entry, timeout=timeout)
        except ApiError as exc:
            self._count_errors()
            log.warning("writing report %s failed: %s", self.writer.target.name, exc)
            return False
        self.loop.last_written = step.entry
        self.loop.written_at = self.loop.written_at.after(Write.REPORT, time.monotonic())
        with self.state.lock:
            self.state.reports += 1
        return True

    def _check_report(self, write: Write) -> Write:
        """A quiet node's read-back (check_due): is its report still stored, and still its
        trace's? The write to make instead of `write`: the report when it is gone (the apply
        re-creates it with the full cumulative counts), nothing when another trace took it."""
        try:
            found = stored_report(self.writer.read_metadata(), self.inv.trace_uid)
        except ApiError as exc:
            self._count_errors()
            log.warning("reading back report %s failed (%s); again in a report period", self.writer.target.name, exc)
            self.loop.written_at = self.loop.written_at.read_back(time.monotonic())
            return write
        if found is StoredReport.MISSING:
            log.warning("report %s was deleted: writing it again with the node's cumulative counts",
                        self.writer.target.name)
            return Write.REPORT
        if found is StoredReport.FOREIGN:
            log.warning("report %s now belongs to a re-created trace of the same name: this agent's "
                        "trace is gone, it writes no more", self.writer.target.name)
            self.loop.superseded = True
            return Write.NOTHING
        self.loop.written_at = self.loop.written_at.read_back(time.monotonic())
        return write

    def _heartbeat(self) -> bool:
        """Renew the report's heartbeat Lease; False when that failed."""
        bound = stale_after(self.inv.spec.report_interval_seconds, self.loop.nodes)
        try:
            self.writer.heartbeat(datetime.now(timezone.utc), round(bound.total_seconds()))
        except ApiError as exc:
            self._count_errors()
            log.warning("renewing heartbeat %s failed (%s); writing the report instead", self.writer.target.name, exc)
            return False
        self.loop.written_at = self.loop.written_at.after(Write.HEARTBEAT, time.monotonic())
        with self.state.lock:
            self.state.heartbeats += 1
        return True

    def _final_report(self) -> None:
        """SIGTERM: everything counted so far goes into the report before the pod ends."""
        deadline = time.monotonic() + FINAL_REPORT_BUDGET_SECONDS
        if self.loop.baseline is None:
            # Never got the earlier report: one last try, else writing could lower the counts.
            try:
                stored = self.writer.read()
                if stored_report(stored, self.inv.trace_uid) is StoredReport.FOREIGN:
                    log.error("final report skipped: report %s belongs to another trace", self.writer.target.name)
                    return
                self.loop.baseline = Baseline.from_entry(read_entry(stored, self.facts.node, self.inv.trace_uid))
            except ApiError as exc:
                log.error("final report skipped: earlier report unreadable (%s)", exc)
                return
        if self.loop.superseded:
            log.info("no final report: report %s belongs to a re-created trace", self.writer.target.name)
            return
        self._drain()
        attempt = 0
        while True:
            timeout = final_attempt_timeout(deadline - time.monotonic())
            if timeout is not None and self._report(final=True, timeout=timeout):
                log.info("final report written for node %s: lastReportTime %s", self.facts.node,
                         self.loop.last_written.last_report_time.isoformat())
                return
            delay = None if timeout is None else final_retry_wait(backoff_delay(attempt, cap=5.0),
                                                                  deadline - time.monotonic())
            attempt += 1
            if delay is None:
                log.error("final report for node %s not written within %.0fs",
                          self.facts.node, FINAL_REPORT_BUDGET_SECONDS)
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
