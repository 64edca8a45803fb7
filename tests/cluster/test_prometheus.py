"""The chart's alerting rules and Grafana dashboard, run in a real Prometheus that scrapes the
real agents and the real operator during a lossy trace.

Set-up as in test_e2e.py (the fixtures of tests/cluster/conftest.py): a real control
plane, simulated nodes node-a and node-b running the agents' DaemonSet pods as host
processes (real BPF), the operator embedded with its /metrics on a free port, two pods with
addresses of their own on node-a, and the reference counter as ground truth. node-b's agent
is pointed at a tracefs without the tcp tracepoints, so it cannot trace.

Prometheus (Debian's package) runs on 127.0.0.1 with its own storage, 1s scrape and
evaluation intervals and static targets: each agent pod's IP (a node address: agents use
the host network) and its trace's metrics port, and the operator, each with the target
labels the chart's PodMonitors give (the pod's namespace, pod and container), so a metric
label that collided with them would show as exported_*. Its rule file is a
test-only copy of the shipped rules/retransmit-rules.yaml in which only the `for:` durations
are shortened to FOR (expressions, windows and thresholds are the shipped ones).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from retransmit_agent.preflight import security_mode
from retransmit_operator.main import EmbeddedOperator
from retransmit_core.naming import agent_selector_labels
from retransmit_core.version import package_version
from tests.harness.controlplane import wait_until
from tests.harness.prometheus import Prometheus, free_port, promtool
from tests.harness.tracecluster import NODE_A, NODE_B, SYSTEM_NS, expected, operator_settings, totals

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

CHART = Path(__file__).resolve().parents[2] / "helm" / "retransmit-operator"
RULES = CHART / "rules" / "retransmit-rules.yaml"
DASHBOARD = CHART / "dashboards" / "retransmits.json"
FOR = "2s"
THRESHOLD = 1.0  # retransmits/s of RetransmitPodRetransmitting in the shipped file (checked below)
POD_ALERT = "RetransmitPodRetransmitting"
AGENT_ALERT = "RetransmitAgentCannotTrace"
DOWN_ALERT = "RetransmitOperatorDown"
STALLED_ALERT = "RetransmitOperatorNotReconciling"
# The target labels the Prometheus Operator gives a PodMonitor's pods (besides job, instance).
OPERATOR_POD = "retransmit-operator-0"
# What Grafana puts in for its variables when a user picks this trace and all nodes.
RATE_INTERVAL, RANGE = "1m", "5m"


@pytest.fixture(scope="module")
def operator_http(installed, node_simulator, agent_state):
    """The operator as in test_e2e.py, with /metrics served on a free port (the test stops it
    to see RetransmitOperatorDown; stopping twice is harmless)."""
    settings = operator_settings(installed, agent_state, metrics_port=free_port())
    op = EmbeddedOperator(settings).start()
    yield settings, op
    op.stop()


def target_labels(pod: str, container: str) -> dict[str, str]:
    """What a PodMonitor's target carries besides job and instance."""
    return {"namespace": SYSTEM_NS, "pod": pod, "container": container}


def shipped_rules_with_short_for(tmp_path: Path) -> Path:
    """The shipped rules with only `for:` shortened (the sole difference: checked here)."""
    shipped = yaml.safe_load(RULES.read_text())
    copy = json.loads(json.dumps(shipped))
    for group in copy["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    strip = lambda doc: [{k: v for k, v in r.items() if k != "for"} for g in doc["groups"] for r in g["rules"]]  # noqa: E731
    assert strip(copy) == strip(shipped)
    pod_rule, = [r for g in shipped["groups"] for r in g["rules"] if r["alert"] == POD_ALERT]
    assert pod_rule["expr"].rstrip().endswith(f"> {THRESHOLD:g}"), pod_rule["expr"]
    path = tmp_path / "retransmit-rules-test.yaml"
    path.write_text(yaml.safe_dump(copy, sort_keys=False))
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel or variable, PromQL) for every target and query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    found += [(f"variable {v['name']}", v["query"]["query"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    return found


def grafana_substitute(expr: str, trace: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
            .replace("$trace", trace).replace("$node", ".*"))


class AlertLog:
    """Polls /api/v1/alerts in the background and records each alert's state changes, for
    the report (what the test asserts is read from Prometheus directly)."""

    def __init__(self, prom: Prometheus) -> None:
        self.prom = prom
        self.states: dict[tuple, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alerts = self.prom.alerts()
            except Exception:  # noqa: BLE001 - recorded only; the assertions query again
                alerts = None
            if alerts is not None:
                for a in alerts:
                    key = (a["labels"]["alertname"], tuple(sorted((k, v) for k, v in a["labels"].items()
                                                                  if k in ("node", "pod_namespace", "pod_name"))))
                    seen = self.states.setdefault(key, ["inactive"])
                    if seen[-1] != a["state"]:
                        seen.append(a["state"])
            self._stop.wait(0.5)

    def __enter__(self) -> "AlertLog":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def operator_alerts(prom: Prometheus) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] in (DOWN_ALERT, STALLED_ALERT)]


def alerts_of(prom: Prometheus, name: str, trace: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["labels"].get("trace") == trace]


def rule_group_evaluated_after(prom: Prometheus, moment: float) -> bool:
    group = next(g for g in prom.rules() if g["name"] == "retransmit-operator")
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", group["lastEvaluation"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp() > moment


def agent_targets(core: Any, trace: str) -> dict[str, tuple[str, str]]:
    """node -> (host:port, pod name) of the trace's agent there (its pod IP: a node address)."""
    selector = ",".join(f"{k}={v}" for k, v in agent_selector_labels(trace).items())

    def metrics_port(pod: Any) -> int:
        return next(p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name == "metrics")

    def ready():
        found = {p.spec.node_name: (f"{p.status.pod_ip}:{metrics_port(p)}", p.metadata.name)
                 for p in core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items
                 if p.status.pod_ip and p.status.phase == "Running"}
        return found if set(found) == {NODE_A, NODE_B} else None
    return wait_until(ready, f"agent pods of {trace} running on both nodes", timeout=120)


def process_capabilities(pid: int) -> int:
    """CapEff of a process as a bit mask."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("CapEff:"))
    return int(line.split()[1], 16)


def test_promtool_accepts_the_shipped_rule_file():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_prometheus_fires_the_retransmit_alert_under_loss_only_and_every_dashboard_query_returns_data(
        operator_http, reference, pods, traces, agent_state, core, tmp_path, node_simulator):
    rules = shipped_rules_with_short_for(tmp_path)
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    marker = agent_state / f"broken-{NODE_B}"
    marker.touch()
    try:
        trace = traces(namespaces=[pods.namespace])
        agents = agent_targets(core, trace.name)
        settings, operator = operator_http
        agent_pods = {pod for _, pod in agents.values()}
        jobs = {"retransmit-agents": {address: target_labels(pod, "agent") for address, pod in agents.values()},
                "retransmit-operator": {f"127.0.0.1:{settings.metrics_port}": target_labels(OPERATOR_POD, "operator")}}
        with Prometheus(tmp_path / "prometheus", jobs, rule_files=[rules]) as prom, AlertLog(prom) as log:
            wait_until(lambda: set(prom.targets_up().values()) == {"up"} and len(prom.targets_up()) == 3,
                       "Prometheus to scrape both agents and the operator", timeout=120)
            t = trace.name
            wait_until(lambda: prom.query(f'rtrace_program_attached{{trace="{t}", node="{NODE_A}"}} == 1'),
                       "node-a's agent attached, as scraped", timeout=180)
            wait_until(lambda: prom.query(f'rtrace_agent_failed{{trace="{t}", node="{NODE_B}"}} == 1'),
                       "node-b's agent reporting it cannot trace, as scraped", timeout=180)
            marker.unlink()

            # Without loss: a rule evaluation that saw both agents up finds no pod to alert on.
            seen_up = time.time()
            wait_until(lambda: rule_group_evaluated_after(prom, seen_up), "a rule evaluation after the scrape")
            assert alerts_of(prom, POD_ALERT, t) == []
            # ... while the agent that cannot trace is alerted on, alone.
            broken = wait_until(lambda: [a for a in alerts_of(prom, AGENT_ALERT, t) if a["state"] == "firing"],
                                f"{AGENT_ALERT} firing for node-b")
            assert {a["labels"]["node"] for a in alerts_of(prom, AGENT_ALERT, t)} == {NODE_B}
            assert {a["labels"]["node"] for a in broken} == {NODE_B}
            # The operator is scraped and passes over the traces: neither operator alert.
            assert not operator_alerts(prom)

            # Each agent says what it runs: this machine's kernel, this version, and the
            # security mode of its own capabilities (the simulator gives an agent pod only
            # what its security context adds: BPF and PERFMON in the default auto mode).
            info = {s["metric"]["node"]: s["metric"] for s in prom.query(f'rtrace_agent_info{{trace="{t}"}} == 1')}
            assert set(info) == {NODE_A, NODE_B}
            for node, labels in info.items():
                pid = node_simulator.pids(SYSTEM_NS, agents[node][1])["agent"]
                assert (labels["version"], labels["kernel"], labels["mode"]) == (
                    package_version(), os.uname().release, security_mode(process_capabilities(pid))), labels
                assert labels["mode"] == "capabilities", labels   # the chart's default, as rendered
                # The target's own labels are kept beside the metric's.
                assert labels["namespace"] == SYSTEM_NS and labels["pod"] in agent_pods, labels
            # `up` keeps them too.
            up = prom.query('up{job="retransmit-agents"}')
            assert {(s["metric"]["namespace"], s["metric"]["pod"], s["metric"]["container"]) for s in up} == {
                (SYSTEM_NS, pod, "agent") for pod in agent_pods}

            # Under loss, until the pods' 5-minute average passes the shipped threshold.
            before = reference.read()

            def firing():
                return [a for a in alerts_of(prom, POD_ALERT, t) if a["state"] == "firing"]
            rounds = 0
            while not firing() and rounds < 12:
                pods.lossy_bulk(loss=10, connections=3, nbytes=2 << 20)
                rounds += 1
            try:
                fired = wait_until(firing, f"{POD_ALERT} firing after {rounds} lossy rounds", timeout=120)
            except TimeoutError as e:
                rates = prom.query(f'sum by (pod_namespace, pod_name) (rate(rtrace_retransmits_total{{trace="{t}"}}[5m]))')
                counts = prom.query(f'rtrace_retransmits_total{{trace="{t}"}}')
                raise AssertionError(f"{e}: per-pod rates {rates}, counters {counts}, "
                                     f"alerts {alerts_of(prom, POD_ALERT, t)}") from None
            assert {a["labels"]["pod_namespace"] for a in fired} == {pods.namespace}
            assert {a["labels"]["pod_name"] for a in fired} <= {"server", "client"}
            assert all(float(a["value"]) > THRESHOLD for a in fired)
            assert all(a["annotations"]["runbook_url"].endswith("#retransmitpodretransmitting") for a in fired)
            assert all("skbs/s" in a["annotations"]["summary"] for a in fired)

            # What Prometheus scraped is the agents' exact count (reference counter).
            want = expected(reference.read(), set(pods.server_ips + pods.client_ips), before)
            want_r, _ = totals(want)
            assert want_r > 0

            def scraped(expr: str) -> float:
                result = prom.query(expr)
                return float(result[0]["value"][1]) if result else -1.0
            wait_until(lambda: scraped(f'sum(rtrace_node_retransmits_total{{trace="{t}"}})') == want_r,
                       f"Prometheus to hold node-a's total of {want_r} retransmits", timeout=60)
            wait_until(lambda: scraped(f'sum(rtrace_retransmits_total{{trace="{t}", pod_namespace="{pods.namespace}"}})') == want_r,
                       f"Prometheus to hold the pods' total of {want_r} retransmits", timeout=60)
            # The retransmitting pods by pod_namespace/pod_name; namespace/pod stay the agent's,
            # and nothing was renamed exported_* (no metric label collides with the target's).
            per_pod = prom.query(f'rtrace_retransmits_total{{trace="{t}", pod_namespace="{pods.namespace}"}}')
            assert {s["metric"]["pod_name"] for s in per_pod} <= {"server", "client"} and per_pod
            assert {(s["metric"]["namespace"], s["metric"]["pod"]) for s in per_pod} == {(SYSTEM_NS, agents[NODE_A][1])}
            exported = prom.query('{__name__=~"rtrace_.+"}')
            assert not [s["metric"] for s in exported if any(k.startswith("exported_") for k in s["metric"])]
            # Bounded labels: the server's clients' ports are one value, not one per flow.
            ports = {s["metric"].get("remote_port") for s in prom.query(f'rtrace_retransmits_total{{trace="{t}"}}')}
            assert ports <= {"5201", "5202", "ephemeral"}, ports

            # Every dashboard query parses and returns data.
            queries = dashboard_queries()
            empty = []
            for title, expr in queries:
                label_values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
                promql = grafana_substitute(label_values.group(1) if label_values else expr, t)
                result = prom.query(promql)  # raises on a parse error, naming the query
                if label_values:
                    result = [s for s in result if s["metric"].get(label_values.group(2))]
                if not result:
                    empty.append((title, promql))
            assert empty == [], f"dashboard queries without data: {empty}"
            # The by-cause panel is among them and names at least one cause under loss (which
            # causes depends on the node's BTF: without it every retransmit is `unknown`).
            cause_panel = [expr for title, expr in queries if "rtrace_node_retransmits_by_cause_total" in expr]
            assert cause_panel, "the dashboard has no panel for retransmits by cause"
            causes = prom.query(f'sum by (cause) (rtrace_node_retransmits_by_cause_total{{trace="{t}"}}) > 0')
            assert {s["metric"]["cause"] for s in causes} <= {"timeout", "fast", "probe", "unknown"}
            assert causes, "no retransmit cause counted under loss"
            # The operator stops: its target's series turn stale and RetransmitOperatorDown fires
            # (the only operator alert: with nothing scraped, "not reconciling" has no sum).
            operator.stop()
            down = wait_until(lambda: [a for a in operator_alerts(prom) if a["state"] == "firing"],
                              f"{DOWN_ALERT} firing once the operator is gone", timeout=120)
            assert {a["labels"]["alertname"] for a in operator_alerts(prom)} == {DOWN_ALERT}
            assert down[0]["annotations"]["runbook_url"].endswith("#retransmitoperatordown")
            print(f"\n{len(queries)} dashboard queries returned data; {rounds} lossy round(s); alert states:")
            for key, states in sorted(log.states.items()):
                print(f"  {key[0]} {dict(key[1])}: {' -> '.join(states)}")
    finally:
        if marker.exists():
            marker.unlink()
