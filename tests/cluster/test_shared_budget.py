"""One write budget for every running trace, on the real API server with simulated nodes:
the operator writes the cluster's agent count (the sum of every trace's agents) on each
agents' DaemonSet, an agent follows that count (its /metrics), and when a trace goes the
others' count drops while the note of the old one keeps the staleness bound long enough."""

from __future__ import annotations

import urllib.request

import pytest

from retransmit_core.naming import AGENTS_LOWERED_ANNOTATION, CLUSTER_AGENTS_ANNOTATION, daemonset_name
from retransmit_core.schedule import AGENT_COUNT_REFRESH_SECONDS, report_period
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, SYSTEM_NS, Trace

pytestmark = pytest.mark.cluster


def daemonsets(apps, traces: list[Trace]) -> list[dict]:
    return [apps.api_client.sanitize_for_serialization(apps.read_namespaced_daemon_set(daemonset_name(t.name), SYSTEM_NS))
            for t in traces]


def annotations(ds: dict) -> dict:
    return ds["metadata"].get("annotations") or {}


def agent_metrics(trace: Trace, node: str = NODE_A) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    ip = trace.core.read_namespaced_pod(trace.agent_pod(node), SYSTEM_NS).status.pod_ip
    with urllib.request.urlopen(f"http://{ip}:{trace.metrics_port()}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_two_traces_share_one_agent_count_and_their_agents_follow_it(operator, objects, core, apps):
    first = Trace(objects, core, "budget-first", reportInterval="1s")
    made = [first]
    try:
        wait_until(lambda: (first.get().get("status") or {}).get("summary", {}).get("nodes") == "2/2",
                   "the first trace's agents reporting", timeout=240)
        second = Trace(objects, core, "budget-second", reportInterval="1s")
        made.append(second)

        def shared() -> int | None:
            sets = daemonsets(apps, made)
            total = sum(int(ds["status"].get("desiredNumberScheduled") or 0) for ds in sets)
            written = {annotations(ds).get(CLUSTER_AGENTS_ANNOTATION) for ds in sets}
            return total if total == 4 and written == {str(total)} else None
        count = wait_until(shared, "both DaemonSets to carry the sum of both traces' agents", timeout=120)
        assert count == 4

        # The second trace's agents read it when they start, or at their next refresh.
        metrics = wait_until(lambda: (lambda m: m if m.get("rtrace_cluster_agents") == count else None)(
            agent_metrics(second)), "the second trace's agent to follow the cluster's count",
            timeout=AGENT_COUNT_REFRESH_SECONDS + 120, interval=2.0)
        assert metrics["rtrace_report_period_seconds"] == report_period(1.0, count)

        # The second trace goes: the first one's count drops to its own, and the count it was
        # lowered from stays noted for the staleness bound while its agents may follow it.
        made.pop().delete()
        lowered = wait_until(lambda: (lambda a: a if a.get(CLUSTER_AGENTS_ANNOTATION) == "2" else None)(
            annotations(daemonsets(apps, [first])[0])), "the first trace's count to drop to its own agents", timeout=120)
        assert lowered[AGENTS_LOWERED_ANNOTATION].split()[0] == "4"
    finally:
        for trace in made:
            trace.delete()
