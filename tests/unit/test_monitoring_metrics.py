"""The chart's dashboard and rules use only series the code exports, with labels it sets.

The names come from the real collectors (the agent's AgentCollector over a filled
AgentState, the operator's registry), so a renamed metric or label fails here before a
Grafana panel goes blank. tests/cluster/test_prometheus.py runs the queries for real.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from retransmit_agent.metrics import AgentCollector, AgentInfo, AgentState
from retransmit_operator.metrics import RECONCILE_RESULTS, RECONCILE_TRIGGERS, OperatorMetrics

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "helm" / "retransmit-operator"
# Labels the Prometheus Operator puts on every target of a PodMonitor (service on a
# ServiceMonitor's) and Prometheus itself (job, instance; le of histogram buckets).
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "service", "job", "instance"}
PROMETHEUS_LABELS = TARGET_LABELS | {"le"}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the agent's and the operator's real exporters."""
    state = AgentState(trace="t", node="n", info=AgentInfo(version="0.1.0", kernel="6.18.0", mode="privileged"))
    state.publish_counts(3, 1, 0, {("ns", "web", "443"): 3}, by_state={"ESTABLISHED": 3, "SYN_RECV": 1},
                         missed=0, failed=0, by_cause={"fast": 3, "unknown": 1})
    state.selected_ips = 2
    agent = CollectorRegistry()
    agent.register(AgentCollector(state))
    operator = OperatorMetrics()
    operator.reconcile_seconds.observe(0.1)
    operator.api_requests.labels(operation="apply", code="200").inc()
    operator.events.labels(reason="Created").inc()
    operator.set_traces({"Running": 1})
    names: dict[str, set[str]] = {}
    for registry in (agent, operator.registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_expressions() -> list[str]:
    dash = json.loads((CHART / "dashboards" / "retransmits.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((CHART / "rules" / "retransmit-rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def used(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names in its selector, and labels in by (...) clauses (under '*')."""
    found: dict[str, set[str]] = {}
    for name, selector in re.findall(r"\b(rtrace_\w+)(?:\{([^}]*)\})?", expr):
        found.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector or ""))
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        found.setdefault("*", set()).update(x.strip() for x in group.split(","))
    return found


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_series_and_label_used_is_one_the_code_exports(source):
    names = exported()
    all_labels = set().union(*names.values()) | PROMETHEUS_LABELS
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    assert exprs
    for expr in exprs:
        for metric, labels in used(expr).items():
            if metric == "*":
                assert labels <= all_labels, (expr, labels - all_labels)
                continue
            assert metric in names, f"{expr}: {metric} is exported by no code"
            assert labels <= names[metric] | PROMETHEUS_LABELS, (expr, labels - names[metric])


def test_dashboard_covers_what_the_issue_asks_for():
    text = " ".join(dashboard_expressions())
    for metric in ("rtrace_node_retransmits_total", "rtrace_retransmits_total", "rtrace_node_retransmits_by_state_total",
                   "rtrace_node_synack_retransmits_total", "rtrace_lost_events_total", "rtrace_missed_events_total",
                   "rtrace_program_attached", "rtrace_agent_failed", "rtrace_operator_reconciles_total"):
        assert metric in text, metric


def test_no_label_of_an_exported_series_names_a_flow_or_an_address():
    """Cardinality: a pod, a node, a remote port, a TCP state, a cause; never an address or a local port."""
    labels = set().union(*exported().values())
    assert labels <= {"trace", "node", "pod_namespace", "pod_name", "remote_port", "state", "cause",
                      "version", "kernel", "mode", "trigger", "result", "reason", "phase", "operation", "code", "le"}


def test_no_exported_label_collides_with_a_label_of_the_scraped_target():
    """A metric label named like a target label is renamed exported_* (or, with honor_labels,
    overwrites the target's): per-pod panels and alerts would collapse onto the agent pod."""
    assert set().union(*exported().values()) & TARGET_LABELS == set()


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_dashboard_and_rules_name_the_retransmitting_pod_by_its_own_labels(source):
    """Grouping rtrace_retransmits_total by namespace/pod would group by the agent pod."""
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    per_pod = [e for e in exprs if "rtrace_retransmits_total" in e and "by (" in e and "remote_port" not in e]
    assert per_pod
    for expr in per_pod:
        grouped = set().union(*(set(x.strip() for x in g.split(",")) for g in re.findall(r"\bby\s*\(([^)]*)\)", expr)))
        assert {"pod_namespace", "pod_name"} <= grouped, expr
        assert not grouped & {"namespace", "pod"}, expr


def test_every_reconcile_outcome_exists_at_zero_before_the_first_pass():
    """So the dashboard's and the rules' error rates read 0, not 'no data', on a healthy operator."""
    families = text_string_to_metric_families(generate_latest(OperatorMetrics().registry).decode())
    reconciles = {(s.labels["trigger"], s.labels["result"]): s.value for f in families for s in f.samples
                  if s.name == "rtrace_operator_reconciles_total"}
    assert reconciles == {(t, r): 0 for t in RECONCILE_TRIGGERS for r in RECONCILE_RESULTS}


def test_the_garbage_collectors_pauses_are_observed_while_the_operator_serves_and_not_after():
    import asyncio
    import gc

    from tests.harness.controlplane import free_port

    class Idle:
        last_sync = None

        def healthy(self) -> bool:
            return True

    metrics = OperatorMetrics()
    paused = lambda: metrics.registry.get_sample_value("rtrace_operator_gc_pause_seconds_count")  # noqa: E731

    async def serve_then_stop() -> tuple[float, float]:
        await metrics.serve(free_port(), Idle(), host="127.0.0.1")
        before = paused()
        gc.collect()
        during = paused() - before
        await metrics.stop()
        return before, during

    before, during = asyncio.run(serve_then_stop())
    assert during >= 1   # the full collection, timed
    after = paused()
    gc.collect()
    assert paused() == after   # stopped: no callback left behind
