"""Every Linux node and any number of traces, on the real API server with simulated nodes:
a tainted node is covered by default and named when a trace's own tolerations leave it out;
two traces whose names once mapped to the same agent port both reach every node; a trace
beyond maxRunningTraces waits Pending, names the running ones, and starts when one goes."""

from __future__ import annotations

import copy

import kubernetes
import pytest
import yaml

from retransmit_core.contract import METRICS_PORT_SPAN
from retransmit_core.naming import daemonset_name
from retransmit_operator.main import EmbeddedOperator
from retransmit_operator.slots import port_of, preferred_port
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_B, ROOT, SYSTEM_NS, Trace, apply_manifest, operator_settings

pytestmark = pytest.mark.cluster

LIMIT = 2
CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def operator(installed, node_simulator, agent_state):
    settings = operator_settings(installed, agent_state).model_copy(update={"max_running_traces": LIMIT})
    op = EmbeddedOperator(settings).start()
    yield op
    op.stop()


def summary(trace: Trace) -> dict:
    return (trace.get().get("status") or {}).get("summary") or {}


def condition(trace: Trace, kind: str) -> dict:
    return next((c for c in (trace.get().get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def all_reporting(trace: Trace, nodes: int = 2) -> dict:
    return wait_until(lambda: (lambda s: s if s.get("nodes") == f"{nodes}/{nodes}" else None)(summary(trace)),
                      f"trace {trace.name}: {nodes}/{nodes} nodes reporting", timeout=240)


@pytest.fixture
def tainted_node_b(core):
    """node-b tainted as a control-plane node for the test; its taints restored after."""
    before = copy.deepcopy(core.read_node(NODE_B).spec.taints) or []
    core.patch_node(NODE_B, {"spec": {"taints": [*[t.to_dict() for t in before], CONTROL_PLANE_TAINT]}})
    yield
    core.patch_node(NODE_B, {"spec": {"taints": [t.to_dict() for t in before] or None}})


def test_the_whole_cluster_sample_covers_a_tainted_node_and_a_narrow_toleration_names_it(
        operator, objects, core, kube, tainted_node_b):
    sample = yaml.safe_load((ROOT / "manifests" / "samples" / "whole-cluster.yaml").read_text())
    sample["spec"]["reportInterval"] = "1s"
    apply_manifest(kube, sample)
    whole = Trace.existing(objects, core, sample["metadata"]["name"])
    narrow = None
    try:
        whole.wait_entry("the tainted node's agent counting", lambda e: e.phase == "Running", node=NODE_B, timeout=240)
        covered = all_reporting(whole)
        linux = [n for n in core.list_node().items if (n.metadata.labels or {}).get("kubernetes.io/os") == "linux"]
        assert covered["nodesLinux"] == len(linux) and covered.get("nodesNotCovered", []) == []
        whole.delete()

        narrow = Trace(objects, core, "narrow-tolerations", tolerations=[{"key": "dedicated", "operator": "Exists"}])
        missed = wait_until(lambda: next((m for m in summary(narrow).get("nodesNotCovered") or []
                                          if m["reason"] == "TaintNotTolerated"), None),
                            "the narrow trace to name the tainted node it misses", timeout=120)
        assert missed["nodes"] == [NODE_B] and missed["count"] == 1
        assert "node-role.kubernetes.io/control-plane:NoSchedule" in missed["detail"]
        agents = wait_until(lambda: (lambda c: c if c.get("status") == "True" else None)(condition(narrow, "AgentsReady")),
                            "the narrow trace's one agent reporting", timeout=240)
        assert "1/1 nodes reporting; 1 of" in agents["message"] and "TaintNotTolerated: node-b" in agents["message"]
    finally:
        whole.delete()
        if narrow is not None:
            narrow.delete()


def test_traces_that_once_shared_a_port_both_run_and_a_third_waits_for_a_slot(operator, objects, core, apps):
    base = operator.settings.agent_metrics_port
    assert preferred_port("t1", base, METRICS_PORT_SPAN) == preferred_port("prod", base, METRICS_PORT_SPAN)
    made = [Trace(objects, core, "t1"), Trace(objects, core, "prod")]
    try:
        for trace in made:
            all_reporting(trace)
        ports = {port_of(apps.api_client.sanitize_for_serialization(
            apps.read_namespaced_daemon_set(daemonset_name(t.name), SYSTEM_NS))) for t in made}
        assert len(ports) == 2 and None not in ports

        third = Trace(objects, core, "namespace-filtered")
        made.append(third)
        waiting = wait_until(lambda: (lambda c: c if c.get("reason") == "TraceLimitReached" else None)(
            condition(third, "AgentsReady")), "the third trace to wait for a slot")
        assert "(prod, t1)" in waiting["message"] and f"maxRunningTraces ({LIMIT})" in waiting["message"]
        assert third.get()["status"]["phase"] == "Pending"
        with pytest.raises(kubernetes.client.ApiException) as absent:
            apps.read_namespaced_daemon_set(daemonset_name(third.name), SYSTEM_NS)
        assert absent.value.status == 404

        made.pop(0).delete()   # t1 goes: its slot is free
        all_reporting(third)
    finally:
        for trace in made:
            trace.delete()
