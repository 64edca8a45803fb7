"""Where agents run and which Linux nodes a trace misses (operator/placement.py), and the
slots a running trace holds: its port and one of maxRunningTraces (operator/slots.py)."""

from __future__ import annotations

import pytest

from retransmit_core.api import RetransmitTraceSpec
from retransmit_core.naming import METRICS_PORT_ANNOTATION
from retransmit_operator.placement import (
    TOLERATE_EVERYTHING,
    NodeFacts,
    blocking_taints,
    coverage,
    placement,
    tolerates,
)
from retransmit_operator.render import render_daemonset
from retransmit_operator.settings import Settings
from retransmit_operator.slots import choose_port, port_of, preferred_port, slots_in_use, waiting_reason

pytestmark = pytest.mark.unit

CONTROL_PLANE = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "db", "effect": "NoExecute"}


def node(name, taints=(), os="linux", **labels):
    return NodeFacts.from_object({"metadata": {"name": name, "labels": {"kubernetes.io/os": os, **labels}},
                                  "spec": {"taints": list(taints)}})


def spec(**fields):
    return RetransmitTraceSpec.model_validate(fields)


@pytest.mark.parametrize("toleration, taint, expected", [
    ({"operator": "Exists"}, CONTROL_PLANE, True),                      # empty key + Exists: every taint
    ({"key": "dedicated", "operator": "Exists"}, DEDICATED, True),
    ({"key": "dedicated", "operator": "Equal", "value": "db"}, DEDICATED, True),
    ({"key": "dedicated", "operator": "Equal", "value": "web"}, DEDICATED, False),
    ({"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}, DEDICATED, False),  # other effect
    ({"key": "other", "operator": "Exists"}, DEDICATED, False),
])
def test_tolerates_follows_the_core_v1_rules(toleration, taint, expected):
    assert tolerates(toleration, taint) is expected


def test_a_trace_without_tolerations_gets_the_default_and_its_own_replace_it():
    default = placement(spec(), {}, TOLERATE_EVERYTHING)
    assert default.tolerations == ({"operator": "Exists"},)
    assert default.node_selector == {"kubernetes.io/os": "linux"}
    own = placement(spec(tolerations=[{"key": "dedicated", "operator": "Exists"}], nodeSelector={"pool": "db"}),
                    {"pool": "web"}, TOLERATE_EVERYTHING)
    assert own.tolerations == ({"key": "dedicated", "operator": "Exists"},)
    assert own.node_selector == {"pool": "db", "kubernetes.io/os": "linux"}
    assert placement(spec(), {"pool": "web"}, ()).node_selector == {"pool": "web", "kubernetes.io/os": "linux"}


def test_the_daemonset_controllers_own_tolerations_keep_cordoned_and_pressured_nodes_covered():
    cordoned = node("n", [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                          {"key": "node.kubernetes.io/memory-pressure", "effect": "NoSchedule"}])
    assert blocking_taints(cordoned, ()) == []
    # PreferNoSchedule never keeps a pod off.
    assert blocking_taints(node("p", [{"key": "x", "effect": "PreferNoSchedule"}]), ()) == []


def test_coverage_names_every_missed_linux_node_by_reason():
    nodes = [node("cp", [CONTROL_PLANE]), node("db-1", [DEDICATED], pool="db"), node("web-1", pool="web"),
             node("web-2", pool="web"), node("win", os="windows")]
    where = placement(spec(nodeSelector={"pool": "web"}, tolerations=[{"key": "dedicated", "operator": "Exists"}]),
                      {}, TOLERATE_EVERYTHING)
    linux, missed = coverage(nodes, where, frozenset({"web-1"}), "t", "ns")
    assert linux == 4   # the Windows node is not the trace's business
    assert [(m.reason, m.count, m.nodes) for m in missed] == [
        ("NotSelected", 2, ["cp", "db-1"]), ("AgentNotRunning", 1, ["web-2"])]
    assert "kubectl -n ns get pods -l retransmit.dev/trace=t" in missed[1].detail

    where = placement(spec(tolerations=[{"key": "dedicated", "operator": "Exists"}]), {}, TOLERATE_EVERYTHING)
    linux, missed = coverage(nodes, where, None, "t", "ns")   # agents not placed yet: not judged
    assert [(m.reason, m.nodes) for m in missed] == [("TaintNotTolerated", ["cp"])]
    assert "node-role.kubernetes.io/control-plane:NoSchedule" in missed[0].detail
    assert "spec.tolerations" in missed[0].detail


def test_the_default_covers_a_tainted_control_plane():
    nodes = [node("cp", [CONTROL_PLANE]), node("worker")]
    assert coverage(nodes, placement(spec(), {}, TOLERATE_EVERYTHING), frozenset({"cp", "worker"}), "t", "ns") == (2, [])


def test_coverage_lists_a_few_names_and_counts_all():
    nodes = [node(f"n{i:02d}", [CONTROL_PLANE]) for i in range(12)]
    _, (missed,) = coverage(nodes, placement(spec(tolerations=[{"key": "x", "operator": "Exists"}]), {}, ()),
                            frozenset(), "t", "ns")
    assert missed.count == 12 and missed.nodes == ["n00", "n01", "n02", "n03", "n04"]


# ---- slots

# crc32 % 100 gives these three the same offset (79): the clash that kept a second trace Pending.
COLLIDING = ("t1", "prod", "namespace-filtered")


def test_colliding_names_get_different_ports():
    assert len({preferred_port(name, 9464, 100) for name in COLLIDING}) == 1
    taken: list[int] = []
    for name in COLLIDING:
        port = choose_port(name, 9464, 100, taken)
        assert port is not None and 9464 <= port < 9564
        taken.append(port)
    assert len(set(taken)) == 3 and taken[0] == preferred_port("t1", 9464, 100)
    assert choose_port("x", 9464, 3, [9464, 9465, 9466]) is None


def test_the_port_is_read_back_from_the_daemonset_it_was_rendered_into():
    settings = Settings()
    ds = render_daemonset("prod", "uid", spec(), settings, 9500)
    assert ds["metadata"]["annotations"][METRICS_PORT_ANNOTATION] == "9500" and port_of(ds) == 9500
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == 9500 and "9500" in container["args"]
    del ds["metadata"]["annotations"][METRICS_PORT_ANNOTATION]   # made by an operator before ports were recorded
    assert port_of(ds) == 9500
    gone = {**ds, "metadata": {**ds["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert slots_in_use([ds]) == {"prod": 9500}
    assert slots_in_use([gone]) == {}   # a DaemonSet being deleted frees its slot


def test_a_trace_waits_while_the_slots_are_taken_and_names_who_holds_them():
    assert waiting_reason("c", ["a"], [], 2) is None
    assert waiting_reason("a", ["a", "b"], [], 2) is None          # its own slot counts as its own
    reason = waiting_reason("c", ["a", "b"], [], 2)
    assert reason.startswith("2 trace(s) run already (a, b), the most maxRunningTraces (2) allows")
    # One slot free, but an older trace waits for it.
    assert "1 waiting trace(s) started earlier go first" in waiting_reason("c", ["a"], ["b"], 2)


def test_render_uses_the_default_tolerations_and_the_priority_class():
    settings = Settings(agent_priority_class_name="system-node-critical", agent_node_selector={"pool": "web"})
    pod = render_daemonset("t", "uid", spec(), settings)["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"pool": "web", "kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert "priorityClassName" not in render_daemonset("t", "uid", spec(), Settings())["spec"]["template"]["spec"]
