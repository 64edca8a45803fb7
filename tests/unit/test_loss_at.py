"""Drops beside retransmits in the trace's summary: a top flow carries the drops of its
packets on the way in at the other end's node (that node's droppedFlows lists it reversed),
`lossAt` names the nodes that dropped and why, or says the traced nodes dropped none when both
ends' nodes count drops, and says nothing when a node that would know does not count them."""

from __future__ import annotations

import pytest

from retransmit_core.api import DroppedFlow, Endpoint, Flow, NodeStatus
from retransmit_operator.aggregate import NOT_DROPPED, aggregate_summary
from retransmit_operator.paths import Places
from retransmit_operator.placement import NodeFacts
from retransmit_operator.remotenames import ServiceIndex
from retransmit_operator.tally import TraceTally

pytestmark = pytest.mark.unit

A, B = "10.0.1.5", "10.0.2.7"   # a client pod on node-a, a server pod on node-b
NODES = {"node-a": NodeFacts("node-a", {}, (), pod_cidrs=("10.0.1.0/24",)),
         "node-b": NodeFacts("node-b", {}, (), pod_cidrs=("10.0.2.0/24",))}


def sender(drops=None, flow_drops=None, remote=B) -> NodeStatus:
    flow = Flow(family="IPv4", local=Endpoint(ip=A, port=40000), remote=Endpoint(ip=remote, port=5201),
                retransmits=40, drops=flow_drops)
    return NodeStatus(node="node-a", retransmits=40, top_flows=[flow], drops=drops)


def receiver(inbound: dict[str, int] | None, counts: bool = True) -> NodeStatus:
    dropped = [DroppedFlow(family="IPv4", local=Endpoint(ip=B, port=5201), remote=Endpoint(ip=A, port=40000),
                           drops=sum(inbound.values()), inbound=sum(inbound.values()), by_reason=inbound)] if inbound else []
    return NodeStatus(node="node-b", drops=sum((inbound or {}).values()) if counts else None,
                      drops_by_reason=inbound if counts else None, dropped_flows=dropped if counts else None)


def top_flow(reports: list[NodeStatus]) -> Flow:
    places = Places(None, NODES, {}, ServiceIndex())
    return aggregate_summary(reports, 2, 10, None, places=places).top_flows[0]


def test_the_receivers_drops_of_the_flow_sit_beside_the_senders_retransmits():
    flow = top_flow([sender(drops=0), receiver({"NETFILTER_DROP": 37})])
    assert flow.peer_drops == {"NETFILTER_DROP": 37}
    assert flow.loss_at == "dropped on node-b (NETFILTER_DROP 37)"
    both = top_flow([sender(drops=2, flow_drops={"TCP_OFO_DROP": 2}), receiver({"NETFILTER_DROP": 37, "PROTO_MEM": 1})])
    assert both.loss_at == "dropped on node-a (TCP_OFO_DROP 2); dropped on node-b (NETFILTER_DROP 37, PROTO_MEM 1)"


def test_no_traced_node_dropped_them_is_said_only_when_both_ends_could_tell():
    assert top_flow([sender(drops=0), receiver(None)]).loss_at == NOT_DROPPED
    assert top_flow([sender(drops=0, remote="203.0.113.9")]).loss_at == NOT_DROPPED   # outside: an untraced box
    assert top_flow([sender(drops=None), receiver(None)]).loss_at is None              # the sender's kernel cannot count
    assert top_flow([sender(drops=0), receiver(None, counts=False)]).loss_at is None    # nor the receiver's


def test_the_kept_sums_follow_the_receivers_report_as_it_changes():
    tally = TraceTally.of([sender(drops=0), receiver({"NETFILTER_DROP": 5})])
    assert tally.snapshot(10).top_flows[0][1].peer_drops == {"NETFILTER_DROP": 5}
    tally.put(receiver({"NETFILTER_DROP": 9}))
    kept = tally.snapshot(10)
    assert kept.top_flows[0][1].peer_drops == {"NETFILTER_DROP": 9}
    assert [(d.node, d.reason, d.drops) for d in kept.top_drops] == [("node-b", "NETFILTER_DROP", 9)]
    assert kept.counting_drops == {"node-a", "node-b"}
    tally.drop("node-b")
    kept = tally.snapshot(10)
    assert kept.top_flows[0][1].peer_drops is None and kept.top_drops == [] and kept.counting_drops == {"node-a"}
