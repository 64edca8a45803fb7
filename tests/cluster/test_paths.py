"""Where the loss is, on the test cluster: the path matrix from real retransmits.

A client pod on node-a sends to a server pod on node-b; an nftables rule in the server pod's
namespace drops (and counts) a share of the data segments arriving from the client's
addresses only, so the loss is on the path a -> b and nowhere else. The nodes get zone
labels. The trace's summary must put the reference counter's retransmits of the client's
flows on the pair (node-a, node-b) and of the server's flows (if any) on (node-b, node-a),
the zones likewise, and name the pair that holds most of them. And the drops: node-b's
agent counts the packets the rule dropped as NETFILTER_DROP, equal to the rule's own counter,
and the client's flows carry them beside their retransmits (the server's node reports the
flow reversed). The simulated nodes share one kernel, so node-a's agent sees the same drops
as outbound drops of its client pod (on a real node only the dropping node's kernel sees a
drop): the test reads node-b's count only.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from retransmit_operator.paths import HOT_MINIMUM, HOT_SHARE
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, NODE_B, expected, running, totals

pytestmark = pytest.mark.cluster

ZONE = "topology.kubernetes.io/zone"
ZONES = {NODE_A: "zone-a", NODE_B: "zone-b"}


@pytest.fixture
def zones(core):
    for node, zone in ZONES.items():
        core.patch_node(node, {"metadata": {"labels": {ZONE: zone}}})
    yield ZONES
    for node in ZONES:
        core.patch_node(node, {"metadata": {"labels": {ZONE: None}}})


def test_the_matrix_holds_each_paths_retransmits_and_names_the_lossy_pair(operator, reference, core, node_simulator,
                                                                         namespace, traces, zones):
    podtraffic.create_pod(core, namespace, "client", NODE_A, {"app": "client"})
    podtraffic.create_pod(core, namespace, "server", NODE_B, {"app": "server"})
    client_ips = podtraffic.wait_pod_ips(core, namespace, "client")
    server_ips = podtraffic.wait_pod_ips(core, namespace, "server")
    client = podtraffic.PodNet.of(node_simulator, namespace, "client")
    server = podtraffic.PodNet.of(node_simulator, namespace, "server")
    trace = traces(namespaces=[namespace])
    for node in (NODE_A, NODE_B):
        trace.wait_entry(f"{node}'s agent attached", running, node=node)

    before = reference.read()
    server.data_loss_from(client_ips, 8)
    try:
        for i, ip in enumerate(server_ips):
            podtraffic.bulk(server, client, ip, 5401 + i, connections=3, nbytes=1 << 20)
        client.wait_quiet()
        server.wait_quiet()
        rule = subprocess.run(server.enter("nft", "list", "chain", "inet", server.table, "input"),
                              check=True, capture_output=True, text=True).stdout
    finally:
        server.clear_loss()
    dropped = sum(int(n) for n in re.findall(r"counter packets (\d+)", rule))
    after = reference.read()
    a_to_b = sum(totals(expected(after, set(client_ips), before)))
    b_to_a = sum(totals(expected(after, set(server_ips), before)))
    assert a_to_b > 0, "the lossy path made no retransmits: nothing to check"
    want_nodes = {(NODE_A, NODE_B): a_to_b, **({(NODE_B, NODE_A): b_to_a} if b_to_a else {})}
    want_zones = {(ZONES[a], ZONES[b]): n for (a, b), n in want_nodes.items()}

    def matrix():
        summary = (trace.get().get("status") or {}).get("summary") or {}
        pairs = lambda key: {(p["source"], p["destination"]): p["retransmits"] for p in summary.get(key) or []}  # noqa: E731
        done = pairs("byNodePair") == want_nodes and pairs("byZonePair") == want_zones
        return summary if done else None
    summary = wait_until(matrix, f"the summary's node and zone pairs to equal the reference's {want_nodes}", timeout=120)

    print(f"a->b {a_to_b}, b->a {b_to_a}, hot path: {summary.get('hotPath')}")
    total = summary["retransmits"] + summary["synackRetransmits"]
    assert total == a_to_b + b_to_a   # every retransmit of the trace is on one of the two paths
    top = summary["byNodePair"][0]
    assert (top["source"], top["destination"], top["percent"]) == (NODE_A, NODE_B, a_to_b * 100 // total)
    if a_to_b >= HOT_MINIMUM and a_to_b >= HOT_SHARE * total:
        assert summary["hotPath"] == (f"{a_to_b * 100 // total}% of retransmits went from node {NODE_A} (zone zone-a) "
                                      f"to node {NODE_B} (zone zone-b)")
    else:
        pytest.fail(f"the loss on a -> b made too few retransmits to stand out ({a_to_b} of {total}): raise it")

    # The drops: node-b's NETFILTER_DROP is the rule's counter, short by at most the kfree_skb
    # hits the kernel did not run the program for (recursion protection; not in reports).
    assert dropped > 0, "the rule dropped nothing: the drops prove nothing"

    def drops_beside_retransmits():
        summary = (trace.get().get("status") or {}).get("summary") or {}
        on_b = sum(d["drops"] for d in summary.get("topDrops") or []
                   if (d["node"], d["reason"]) == (NODE_B, "NETFILTER_DROP"))
        client_flows = [f for f in summary.get("topFlows") or [] if f["local"]["ip"] in client_ips]
        beside = sum((f.get("peerDrops") or {}).get("NETFILTER_DROP", 0) for f in client_flows)
        return (summary, client_flows) if on_b == beside and 0 < on_b <= dropped else None
    summary, client_flows = wait_until(drops_beside_retransmits, f"node-b's NETFILTER_DROP drops ({dropped} by the rule) "
                                       "in topDrops and beside the client's flows", timeout=120)
    on_b = next(d["drops"] for d in summary["topDrops"] if (d["node"], d["reason"]) == (NODE_B, "NETFILTER_DROP"))
    print(f"nft rule dropped {dropped}, node-b counted NETFILTER_DROP {on_b}")
    assert dropped - on_b <= max(2, dropped // 100), (on_b, dropped)
    assert all(f"dropped on {NODE_B} (" in (f.get("lossAt") or "") for f in client_flows if f.get("peerDrops"))
