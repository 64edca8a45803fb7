"""The default security mode, auto, on the real API server with simulated nodes.

The node simulator runs a container that drops ALL capabilities with only those it adds
(setpriv), and node-b's "runtime" here withholds CAP_PERFMON from unprivileged containers.
So node-b's capabilities agent really probes and finds it may not load BPF, and says
needsPrivileged in its report; the operator then runs a privileged agent on node-b alone (a
second DaemonSet pinned by node name) and keeps the capabilities agents off it, records
node-b on the trace's DaemonSet and names it, with the reason, in the trace's status. Both
nodes report. At completion both DaemonSets go.
"""

from __future__ import annotations

import json

import kubernetes
import pytest

from retransmit_core.api import GROUP, PLURAL, VERSION, Phase
from retransmit_core.naming import (
    AGENT_PRIVILEGE_LABEL,
    PRIVILEGED_NODES_ANNOTATION,
    agent_selector_labels,
    daemonset_name,
    privileged_daemonset_name,
)
from retransmit_operator.privilege import recorded_privileged_nodes
from tests.harness.controlplane import wait_gone, wait_until
from tests.harness.runc_capfilter import CAPABILITIES
from tests.harness.tracecluster import NODE_A, NODE_B, SYSTEM_NS

pytestmark = pytest.mark.cluster


@pytest.fixture
def perfmon_withheld_on_node_b(node_simulator):
    node_simulator.withheld_capabilities[NODE_B] = {"PERFMON"}
    yield
    node_simulator.withheld_capabilities.pop(NODE_B, None)


def daemonset(apps, name: str):
    try:
        return apps.api_client.sanitize_for_serialization(apps.read_namespaced_daemon_set(name, SYSTEM_NS))
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def node_names(ds: dict) -> tuple[str, list[str]]:
    (term,) = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchFields"]
    assert expression["key"] == "metadata.name"
    return expression["operator"], expression["values"]


def effective_capabilities(node_simulator, pod: str) -> set[str]:
    (pid,) = node_simulator.pids(SYSTEM_NS, pod).values()
    mask = next(int(line.split()[1], 16) for line in open(f"/proc/{pid}/status") if line.startswith("CapEff:"))
    return {name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}


def test_a_node_whose_agent_needs_privileged_gets_a_privileged_agent_and_only_it(
        operator, traces, apps, core, objects, node_simulator, perfmon_withheld_on_node_b):
    assert operator.settings.agent_security_mode == "auto"
    trace = traces()

    privileged = wait_until(lambda: daemonset(apps, privileged_daemonset_name(trace.name)),
                            f"the privileged DaemonSet of {trace.name}", timeout=180)
    # Exactly node-b, and the capabilities DaemonSet keeps off it and records why.
    assert node_names(privileged) == ("In", [NODE_B])
    main = daemonset(apps, daemonset_name(trace.name))
    assert node_names(main) == ("NotIn", [NODE_B])
    recorded = recorded_privileged_nodes(main)
    assert set(recorded) == {NODE_B} and "CAP_PERFMON" in recorded[NODE_B], recorded
    assert privileged["metadata"]["ownerReferences"] == main["metadata"]["ownerReferences"]
    assert privileged["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] is True

    # Both nodes report: node-b from its privileged agent, node-a from a capabilities agent.
    wait_until(lambda: ((trace.get().get("status") or {}).get("summary") or {}).get("nodes") == "2/2",
               f"trace {trace.name}: 2/2 nodes reporting", timeout=240)
    entry_b = trace.wait_entry("Running", lambda e: e.phase == Phase.RUNNING, node=NODE_B)
    assert entry_b.needs_privileged is None
    selector = ",".join(f"{k}={v}" for k, v in agent_selector_labels(trace.name).items())
    agents = {p.spec.node_name: p for p in core.list_namespaced_pod(SYSTEM_NS, label_selector=selector).items
              if p.metadata.deletion_timestamp is None and p.status.phase == "Running"}
    assert set(agents) == {NODE_A, NODE_B}
    assert agents[NODE_B].metadata.labels.get(AGENT_PRIVILEGE_LABEL) == "true"
    assert agents[NODE_B].metadata.owner_references[0].name == privileged_daemonset_name(trace.name)
    assert agents[NODE_A].metadata.owner_references[0].name == daemonset_name(trace.name)
    assert {"BPF", "PERFMON"} <= effective_capabilities(node_simulator, agents[NODE_A].metadata.name)
    assert "SYS_ADMIN" not in effective_capabilities(node_simulator, agents[NODE_A].metadata.name)
    assert "SYS_ADMIN" in effective_capabilities(node_simulator, agents[NODE_B].metadata.name)

    # The status says which node runs privileged and why; an Event said so when it began.
    status = trace.get()["status"]
    (group,) = status["summary"]["privilegedNodes"]
    assert (group["count"], group["nodes"], group["reason"]) == (1, [NODE_B], recorded[NODE_B])
    agents_ready = next(c for c in status["conditions"] if c["type"] == "AgentsReady")
    assert f"1 node runs a privileged agent, capabilities were not enough there ({NODE_B}: " in agents_ready["message"]
    events = core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={trace.name}").items
    assert any(e.reason == "AgentsPrivileged" and NODE_B in e.message for e in events), [
        (e.reason, e.message) for e in events]
    # node-b's report no longer asks, and it stays recorded: the choice is stable per trace.
    assert json.loads(daemonset(apps, daemonset_name(trace.name))["metadata"]["annotations"][
        PRIVILEGED_NODES_ANNOTATION]) == {recorded[NODE_B]: [NODE_B]}

    # Completion removes both DaemonSets.
    objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name, {"spec": {"duration": "1s"}})
    wait_until(lambda: (trace.get().get("status") or {}).get("phase") == "Completed",
               f"trace {trace.name} Completed", timeout=120)
    for name in (daemonset_name(trace.name), privileged_daemonset_name(trace.name)):
        wait_gone(lambda: apps.read_namespaced_daemon_set(name, SYSTEM_NS), f"DaemonSet {name} deleted", timeout=120)
