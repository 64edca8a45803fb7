"""The auto security mode's pure pieces: which nodes get a privileged agent, how the two
DaemonSets split the nodes between them, and what the status says about it."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from retransmit_core.api import MAX_PRIVILEGED_REASONS, NodeStatus, Phase, RetransmitTraceSpec, Summary
from retransmit_core.naming import (
    AGENT_PRIVILEGE_LABEL,
    PRIVILEGED_NODES_ANNOTATION,
    agent_selector_labels,
    daemonset_name,
    privileged_daemonset_name,
)
from retransmit_core.schedule import cluster_agents
from retransmit_operator.conditions import Observation, compute_status
from retransmit_operator.privilege import (
    agents_scheduled,
    node_name_affinity,
    privileged_event,
    privileged_nodes,
    privileged_nodes_annotation,
    privileged_summary,
    reason_of,
    recorded_privileged_nodes,
)
from retransmit_operator.render import render_daemonset, render_privileged_daemonset
from retransmit_operator.settings import Settings
from retransmit_operator.slots import slots_in_use

pytestmark = pytest.mark.unit

OLD_KERNEL = "not permitted to load BPF programs (uid 0): this kernel has no CAP_BPF or CAP_PERFMON (cap_last_cap is 37)"
NOT_GRANTED = "not permitted to load BPF programs (uid 0): this process has neither CAP_SYS_ADMIN nor CAP_PERFMON"
SPEC = RetransmitTraceSpec()
AUTO = Settings(namespace="rt", agent_security_mode="auto")
NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def failed(node: str, message: str, needs: bool = True) -> NodeStatus:
    return NodeStatus(node=node, phase=Phase.FAILED, message=message, needs_privileged=needs or None)


def test_the_record_round_trips_through_the_daemonset_annotation():
    nodes = {"b": OLD_KERNEL, "a": OLD_KERNEL, "c": NOT_GRANTED}
    text = privileged_nodes_annotation(nodes)
    # Grouped by reason, so many nodes with one reason cost one copy of it.
    assert json.loads(text) == {NOT_GRANTED: ["c"], OLD_KERNEL: ["a", "b"]}
    assert recorded_privileged_nodes({"metadata": {"annotations": {PRIVILEGED_NODES_ANNOTATION: text}}}) == nodes


@pytest.mark.parametrize("value", ["", "not json", "[1, 2]", '{"r": "node-a"}'])
def test_a_missing_or_foreign_annotation_records_no_node(value):
    assert recorded_privileged_nodes({"metadata": {"annotations": {PRIVILEGED_NODES_ANNOTATION: value}}}) == {}
    assert recorded_privileged_nodes(None) == {}


def test_nodes_asking_join_and_recorded_nodes_stay_with_their_first_reason():
    recorded = {"a": OLD_KERNEL}
    reports = [failed("a", NOT_GRANTED),                      # asks again, another reason: the first stays
               failed("b", NOT_GRANTED),                      # asks: joins
               failed("c", "tracefs is not mounted", needs=False),   # fails, but privileges would not help
               NodeStatus(node="d", phase=Phase.RUNNING)]
    assert privileged_nodes(recorded, reports) == {"a": OLD_KERNEL, "b": NOT_GRANTED}
    # The privileged agent on b reports Running: b stays (flipping back would only fail again).
    assert privileged_nodes({"a": OLD_KERNEL, "b": NOT_GRANTED}, [NodeStatus(node="b", phase=Phase.RUNNING)]) == {
        "a": OLD_KERNEL, "b": NOT_GRANTED}


def test_a_long_message_is_shortened_as_a_reason():
    assert len(reason_of(failed("a", "x" * 500))) == 200
    assert reason_of(NodeStatus(node="a", needs_privileged=True)).startswith("the agent could not load BPF")


def test_the_two_daemonsets_split_the_nodes_by_name_and_share_the_trace():
    nodes = {"old-2": OLD_KERNEL, "old-1": OLD_KERNEL}
    main = render_daemonset("web", "uid-1", SPEC, AUTO, 9500, nodes)
    extra = render_privileged_daemonset("web", "uid-1", SPEC, AUTO, 9500, nodes)
    assert main["metadata"]["name"] == daemonset_name("web")
    assert extra["metadata"]["name"] == privileged_daemonset_name("web") == "rtrace-web-privileged"

    def terms(ds):
        return ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms(main) == [{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["old-1", "old-2"]}]}]
    assert terms(extra) == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["old-1", "old-2"]}]}]
    assert recorded_privileged_nodes(main) == nodes
    assert PRIVILEGED_NODES_ANNOTATION not in extra["metadata"]["annotations"]

    def context(ds):
        return ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert context(main)["privileged"] is False and context(main)["capabilities"]["drop"] == ["ALL"]
    assert context(extra)["privileged"] is True

    # Both DaemonSets' pods are the trace's agents (the selector of the pod watch and of the
    # trace's agents), on the trace's port, owned by the trace; only the privileged
    # DaemonSet's selector tells its pods apart.
    for ds in (main, extra):
        assert agent_selector_labels("web").items() <= ds["spec"]["template"]["metadata"]["labels"].items()
        assert ds["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 9500
    assert extra["spec"]["selector"]["matchLabels"] == {**agent_selector_labels("web"), AGENT_PRIVILEGE_LABEL: "true"}
    assert AGENT_PRIVILEGE_LABEL not in main["spec"]["template"]["metadata"]["labels"]
    # One trace, one slot: the slot logic sees one port for both DaemonSets.
    assert slots_in_use([main, extra]) == {"web": 9500}


def test_without_nodes_needing_privileged_the_auto_daemonset_is_the_capabilities_one():
    auto = render_daemonset("web", "uid-1", SPEC, AUTO, 9500, {})
    caps = render_daemonset("web", "uid-1", SPEC, Settings(namespace="rt", agent_security_mode="capabilities"), 9500)
    assert auto == caps
    assert "affinity" not in auto["spec"]["template"]["spec"]


@pytest.mark.parametrize("mode", ["privileged", "capabilities"])
def test_explicit_modes_never_split_the_nodes(mode):
    ds = render_daemonset("web", "uid-1", SPEC, Settings(agent_security_mode=mode), 9500, {"old": OLD_KERNEL})
    assert "affinity" not in ds["spec"]["template"]["spec"]
    assert recorded_privileged_nodes(ds) == {}


def test_a_new_node_needing_privileged_changes_the_capabilities_template():
    before = render_daemonset("web", "uid-1", SPEC, AUTO, 9500, {"a": OLD_KERNEL})
    after = render_daemonset("web", "uid-1", SPEC, AUTO, 9500, {"a": OLD_KERNEL, "b": OLD_KERNEL})
    hash_of = lambda ds: ds["metadata"]["annotations"]["retransmit.dev/spec-hash"]  # noqa: E731
    assert hash_of(before) != hash_of(after)


def scheduled(desired: int, generation: int = 1, observed: int = 1) -> dict:
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": observed, "desiredNumberScheduled": desired}}


def test_the_traces_agents_are_counted_over_both_daemonsets():
    assert agents_scheduled(scheduled(3), scheduled(1)) == 4
    assert agents_scheduled(scheduled(3), None) == 3
    assert agents_scheduled(scheduled(3), scheduled(1, generation=2)) is None   # not placed yet
    assert agents_scheduled(None, None) is None
    assert cluster_agents([scheduled(3), scheduled(1)]) == 4


def test_the_summary_names_nodes_by_reason_most_common_first_and_bounded():
    nodes = {f"old-{i}": OLD_KERNEL for i in range(7)} | {"b": NOT_GRANTED} | {
        f"r{i}": f"reason {i}" for i in range(MAX_PRIVILEGED_REASONS)}
    summary = privileged_summary(nodes)
    assert len(summary) == MAX_PRIVILEGED_REASONS
    assert (summary[0].reason, summary[0].count, summary[0].nodes) == (OLD_KERNEL, 7, [f"old-{i}" for i in range(5)])
    assert privileged_summary({}) == []


def test_the_agents_condition_says_which_nodes_run_privileged_and_why():
    s = Summary(nodes_desired=3, nodes_reporting=3, privileged_nodes=privileged_summary({"old-1": OLD_KERNEL}))
    obs = Observation(generation=1, spec_error=None, start_time=NOW, completion_time=None,
                      nodes=[NodeStatus(node=n, phase=Phase.RUNNING) for n in ("a", "b", "old-1")], summary=s, now=NOW)
    agents = next(c for c in compute_status(obs, []).conditions if c.type == "AgentsReady")
    assert agents.status == "True"
    assert f"1 node runs a privileged agent, capabilities were not enough there (old-1: {OLD_KERNEL})" in agents.message


def test_the_event_names_the_added_nodes_and_their_reasons():
    type_, reason, message = privileged_event("rt", "rtrace-web-privileged", {"b": NOT_GRANTED, "a": OLD_KERNEL})
    assert (type_, reason) == ("Normal", "AgentsPrivileged")
    assert "rtrace-web-privileged" in message and f"a: {OLD_KERNEL}" in message and f"b: {NOT_GRANTED}" in message


def test_node_name_affinity_sorts_the_names():
    assert node_name_affinity({"b", "a"}, "In")["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["a", "b"]
