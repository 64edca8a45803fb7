"""The chart's monitoring objects: dashboard ConfigMap, PrometheusRule and PodMonitors.

Each is checked against its one source (dashboards/retransmits.json, rules/retransmit-rules.yaml)
and against the code it must match (the labels and port name operator/render.py gives agent
pods, the operator Deployment's port). tests/cluster/test_prometheus.py runs the same rules
and dashboard queries in a real Prometheus.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helm.render_manifests import CHART, tool
from tests.deploy.test_chart import objects
from tests.harness.prometheus import promtool

pytestmark = pytest.mark.deploy

ON = ("--set", "monitoring.enabled=true")
MONITORING_KINDS = {"PrometheusRule", "PodMonitor", "ServiceMonitor"}
RULES = CHART / "rules" / "retransmit-rules.yaml"
# The promtool unit tests of RULES (rule_files relative to it).
RULE_TESTS = Path(__file__).with_name("alert-rules.test.yaml")
# Labels the Prometheus Operator gives a PodMonitor's targets.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}


def monitoring_objects(*args: str) -> dict[str, dict]:
    return {k: v for k, v in objects(*args).items()
            if v["kind"] in MONITORING_KINDS or v["metadata"]["name"].endswith("-dashboard")}


def test_monitoring_is_off_by_default():
    assert monitoring_objects() == {}


def test_monitoring_renders_the_dashboard_rules_and_both_pod_monitors():
    assert set(monitoring_objects(*ON)) == {
        "ConfigMap/retransmit-operator-dashboard", "PrometheusRule/retransmit-operator",
        "PodMonitor/retransmit-operator-agent", "PodMonitor/retransmit-operator",
    }


@pytest.mark.parametrize("part, left", [
    ("dashboard", {"PrometheusRule/retransmit-operator", "PodMonitor/retransmit-operator-agent", "PodMonitor/retransmit-operator"}),
    ("prometheusRule", {"ConfigMap/retransmit-operator-dashboard", "PodMonitor/retransmit-operator-agent", "PodMonitor/retransmit-operator"}),
    ("podMonitor", {"ConfigMap/retransmit-operator-dashboard", "PrometheusRule/retransmit-operator"}),
])
def test_each_part_can_be_turned_off(part, left):
    assert set(monitoring_objects(*ON, "--set", f"monitoring.{part}.enabled=false")) == left


def test_dashboard_configmap_holds_the_charts_dashboard_file_labelled_for_the_sidecar():
    cm = monitoring_objects(*ON)["ConfigMap/retransmit-operator-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "retransmit-system"
    assert json.loads(cm["data"]["retransmits.json"]) == json.loads((CHART / "dashboards" / "retransmits.json").read_text())


def test_dashboard_label_namespace_and_annotations_come_from_values():
    cm = monitoring_objects(*ON, "--set", "monitoring.dashboard.namespace=grafana",
                            "--set", "monitoring.dashboard.labels.grafana_dashboard=net",
                            "--set", "monitoring.dashboard.annotations.grafana_folder=Networking",
                            )["ConfigMap/retransmit-operator-dashboard"]
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "net"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Networking"}


def test_prometheus_rule_is_the_plain_rule_file():
    """One source: the PrometheusRule's spec is rules/retransmit-rules.yaml as Prometheus loads it."""
    rule = monitoring_objects(*ON, "--set", "monitoring.prometheusRule.labels.release=kps")["PrometheusRule/retransmit-operator"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} >= {
        "RetransmitPodRetransmitting", "RetransmitAgentCannotTrace", "RetransmitSamplesLost",
        "RetransmitOperatorDown", "RetransmitOperatorNotReconciling"}


def test_runbook_base_url_moves_every_runbook_url_to_the_users_page_keeping_its_anchor():
    rule = monitoring_objects(*ON, "--set", "monitoring.prometheusRule.runbookBaseURL=https://wiki.example/sre/rtrace"
                              )["PrometheusRule/retransmit-operator"]
    shipped = yaml.safe_load(RULES.read_text())
    got = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    want = [r for g in shipped["groups"] for r in g["rules"]]
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        anchor = theirs["annotations"]["runbook_url"].split("#", 1)[1]
        assert mine["annotations"]["runbook_url"] == f"https://wiki.example/sre/rtrace#{anchor}"
        # Nothing else changes.
        without = lambda r: {**r, "annotations": {k: v for k, v in r["annotations"].items() if k != "runbook_url"}}  # noqa: E731
        assert without(mine) == without(theirs)


def test_promtool_rule_tests_pass_and_cover_every_alert_firing_and_quiet():
    """alert-rules.test.yaml: each alert of the shipped file fires in some case (with its
    labels and annotations, runbook_url included, exactly) and stays quiet in another."""
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    suite = yaml.safe_load(RULE_TESTS.read_text())
    assert [(RULE_TESTS.parent / f).resolve() for f in suite["rule_files"]] == [RULES.resolve()]
    cases = [c for t in suite["tests"] for c in t.get("alert_rule_test", [])]
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts
    # The per-pod alert names the retransmitting pod by pod_namespace/pod_name while the
    # input also carries the agent target's namespace/pod.
    for case in cases:
        for alert in case["exp_alerts"]:
            assert not set(alert["exp_labels"]) & TARGET_LABELS, case


def test_plain_rule_file_passes_promtool():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_agent_pod_monitor_selects_the_pods_and_port_the_operator_renders():
    """The agents' DaemonSet comes from operator/render.py, not from a chart template: the
    PodMonitor must match what that code gives the pods."""
    from retransmit_core.api import RetransmitTraceSpec
    from retransmit_operator.render import agent_metrics_port, render_pod_template
    from retransmit_operator.settings import Settings

    monitor = monitoring_objects(*ON, "--set", "monitoring.podMonitor.interval=15s",
                                 "--set", "nameOverride=rt")["PodMonitor/retransmit-operator-rt-agent"]
    pod = render_pod_template("any-trace", "uid-of-any-trace", RetransmitTraceSpec(), Settings(),
                              agent_metrics_port("any-trace", Settings()))
    pod_labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["retransmit-system"]}
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert endpoint["interval"] == "15s"
    # The target keeps its own labels (the agent pod's namespace, pod, container; on `up` as
    # well): no relabelling drops or overwrites them, and the metrics' labels cannot
    # collide with them (tests/unit/test_monitoring_metrics.py), so no honorLabels either.
    assert "relabelings" not in endpoint and "metricRelabelings" not in endpoint
    assert not endpoint.get("honorLabels")


def test_operator_pod_monitor_selects_the_operator_pod_and_its_http_port():
    objs = objects(*ON)
    monitor = objs["PodMonitor/retransmit-operator"]
    template = objs["Deployment/retransmit-operator"]["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("setting, message", [
    (["--set", "monitoring.podMonitor.interval=soon"], "at '/monitoring/podMonitor/interval': 'soon' does not match pattern"),
    (["--set-json", "monitoring.dashboard.labels={\"grafana_dashboard\":1}"], "at '/monitoring/dashboard/labels/grafana_dashboard': got number, want string"),
    (["--set", "monitoring.enabled=yes"], "at '/monitoring/enabled': got string, want boolean"),
    (["--set", "monitoring.grafana=true"], "additional properties 'grafana' not allowed"),
    (["--set", "monitoring.prometheusRule.runbookBaseURL=https://wiki.example/rt#alerts"],
     "at '/monitoring/prometheusRule/runbookBaseURL': 'https://wiki.example/rt#alerts' does not match pattern"),
])
def test_monitoring_values_are_checked_by_the_schema(setting, message):
    done = subprocess.run([tool("helm"), "template", "x", str(CHART), *setting], capture_output=True, text=True)
    assert done.returncode != 0, f"{setting} was accepted"
    assert message in done.stderr, done.stderr


def test_helm_lint_is_clean_with_monitoring_on():
    done = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), *ON], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout
