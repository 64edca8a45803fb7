"""Where the loss is, on the test cluster: the path matrix from real retransmits.

Three nodes in two zones (node-a in zone-a; node-b and node-c in zone-b: the simulator adds
node-c for this test). Client pods on node-a and node-c send to a server pod on node-b; an
nftables rule in the server pod's namespace drops (and counts) a share of the data segments
arriving from node-a's pod CIDRs only, so the loss is on the path a -> b and nowhere else.
The trace's summary must hold, for every node pair and zone pair, exactly the retransmits
the reference counter saw on the flows between their pods (a -> b holds the client on
node-a's; c -> b, b -> a and b -> c only theirs, if any), name a -> b as the pair that
stands out, and give a -> b a ratio from the client's connections no larger than what their
sockets counted in the end (TCP_INFO). And the drops: node-b's agent counts the packets the
rule dropped as NETFILTER_DROP, equal to the rule's own counter, and the client's flows carry
them beside their retransmits (the server's node reports the flow reversed). The simulated
nodes share one kernel, so node-a's agent sees the same drops as outbound drops of its client
pod (on a real node only the dropping node's kernel sees a drop): the test reads node-b's
count only.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest

from retransmit_core.ratio import retransmit_ratio
from retransmit_operator.paths import HOT_MINIMUM, HOT_SHARE
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, NODE_B, expected, running

pytestmark = pytest.mark.cluster

NODE_C = "node-c"
ZONE = "topology.kubernetes.io/zone"
ZONES = {NODE_A: "zone-a", NODE_B: "zone-b", NODE_C: "zone-b"}


@pytest.fixture
def three_zoned_nodes(core, node_simulator):
    """node-c added to the simulated cluster, and the three nodes' zone labels; undone after
    the test (ask for it before `traces`, so the trace is gone before node-c is)."""
    node_simulator.add_node(NODE_C)
    try:
        for node, zone in ZONES.items():
            core.patch_node(node, {"metadata": {"labels": {ZONE: zone}}})
        yield ZONES
    finally:
        for node in (NODE_A, NODE_B):
            core.patch_node(node, {"metadata": {"labels": {ZONE: None}}})
        node_simulator.remove_node(NODE_C)


def pairs_of(flows: dict, node_of_ip: dict[str, str]) -> Counter:
    """Retransmits (skb + SYN-ACK) by (sending node, receiving node) over reference flows."""
    pairs: Counter = Counter()
    for (_, local_ip, _, remote_ip, _), (retransmits, synacks) in flows.items():
        if retransmits + synacks:
            pairs[(node_of_ip[local_ip], node_of_ip[remote_ip])] += retransmits + synacks
    return pairs


def test_the_matrix_holds_each_paths_retransmits_and_names_the_lossy_pair(operator, reference, core, node_simulator,
                                                                         namespace, three_zoned_nodes, traces):
    where = {"client-a": NODE_A, "client-c": NODE_C, "server": NODE_B}
    for pod, node in where.items():
        podtraffic.create_pod(core, namespace, pod, node, {"app": pod})
    ips = {pod: podtraffic.wait_pod_ips(core, namespace, pod) for pod in where}
    node_of_ip = {ip: where[pod] for pod, addresses in ips.items() for ip in addresses}
    nets = {pod: podtraffic.PodNet.of(node_simulator, namespace, pod) for pod in where}
    trace = traces(namespaces=[namespace])
    for node in ZONES:
        trace.wait_entry(f"{node}'s agent attached", running, node=node)

    before = reference.read()
    node_a = node_simulator.nodes_by_name[NODE_A]
    server = nets["server"]
    server.data_loss_from([str(node_a.pod_cidr_v4), str(node_a.pod_cidr_v6)], 8)
    client_a_connections = []
    try:
        for i, ip in enumerate(ips["server"]):
            client_a_connections += podtraffic.bulk(server, nets["client-a"], ip, 5401 + i, connections=3, nbytes=1 << 20)
            podtraffic.bulk(server, nets["client-c"], ip, 5411 + i, connections=3, nbytes=1 << 20)
        for net in nets.values():
            net.wait_quiet()
        rule = subprocess.run(server.enter("nft", "list", "chain", "inet", server.table, "input"),
                              check=True, capture_output=True, text=True).stdout
    finally:
        server.clear_loss()
    dropped = sum(int(n) for n in re.findall(r"counter packets (\d+)", rule))
    client_ips = set(ips["client-a"])
    want_nodes = pairs_of(expected(reference.read(), set(node_of_ip), before), node_of_ip)
    a_to_b = want_nodes[(NODE_A, NODE_B)]
    assert a_to_b > 0, "the lossy path made no retransmits: nothing to check"
    want_zones: Counter = Counter()
    for (a, b), n in want_nodes.items():
        want_zones[(ZONES[a], ZONES[b])] += n

    def matrix():
        summary = (trace.get().get("status") or {}).get("summary") or {}
        pairs = lambda key: {(p["source"], p["destination"]): p["retransmits"] for p in summary.get(key) or []}  # noqa: E731
        done = pairs("byNodePair") == dict(want_nodes) and pairs("byZonePair") == dict(want_zones)
        return summary if done else None
    summary = wait_until(matrix, f"the summary's node and zone pairs to equal the reference's {dict(want_nodes)}",
                         timeout=120)

    print(f"pairs {dict(want_nodes)}, hot path: {summary.get('hotPath')}")
    total = summary["retransmits"] + summary["synackRetransmits"]
    assert total == sum(want_nodes.values())   # every retransmit of the trace is on one of the pairs
    top = summary["byNodePair"][0]
    assert (top["source"], top["destination"], top["percent"]) == (NODE_A, NODE_B, a_to_b * 100 // total)
    if a_to_b >= HOT_MINIMUM and a_to_b >= HOT_SHARE * total:
        assert summary["hotPath"] == (f"{a_to_b * 100 // total}% of retransmits went from node {NODE_A} (zone zone-a) "
                                      f"to node {NODE_B} (zone zone-b)")
    else:
        pytest.fail(f"the loss on a -> b made too few retransmits to stand out ({a_to_b} of {total}): raise it")

    # The pair's ratio: the client's listed connections' socket counters, read at their
    # retransmits, so never above what the sockets counted once all was acknowledged.
    in_the_end = (sum(c["total_retrans"] for c in client_a_connections),
                  sum(c["data_segs_out"] for c in client_a_connections))
    assert 0 < top["totalRetrans"] <= in_the_end[0] and 0 < top["dataSegsOut"] <= in_the_end[1], (top, in_the_end)
    assert top["retransRatio"] == retransmit_ratio(top["totalRetrans"], top["dataSegsOut"])
    print(f"a->b ratio {top['totalRetrans']}/{top['dataSegsOut']}; the client's sockets in the end: "
          f"{in_the_end[0]}/{in_the_end[1]}")

    # The drops: node-b's NETFILTER_DROP is the rule's counter, short by at most the kfree_skb
    # hits the kernel did not run the program for (recursion protection; not in reports).
    assert dropped > 0, "the rule dropped nothing: the drops prove nothing"

    # Wait for node-b's count to reach the rule's: node-b's agent may have written its last
    # report before the traffic ended (the matrix above waits on node-a's report, not node-b's).
    missable = max(2, dropped // 100)
    last: dict = {}

    def drops_beside_retransmits():
        summary = (trace.get().get("status") or {}).get("summary") or {}
        on_b = last["on_b"] = sum(d["drops"] for d in summary.get("topDrops") or []
                                  if (d["node"], d["reason"]) == (NODE_B, "NETFILTER_DROP"))
        client_flows = [f for f in summary.get("topFlows") or [] if f["local"]["ip"] in client_ips]
        beside = last["beside"] = sum((f.get("peerDrops") or {}).get("NETFILTER_DROP", 0) for f in client_flows)
        return (summary, client_flows) if on_b == beside and 0 <= dropped - on_b <= missable else None
    try:
        summary, client_flows = wait_until(
            drops_beside_retransmits, f"node-b's NETFILTER_DROP drops in topDrops and beside the client's flows, "
            f"{dropped} by the rule's counter (at most {missable} fewer)", timeout=120)
    except TimeoutError as e:
        raise AssertionError(f"{e}: last seen node-b {last.get('on_b')}, beside the flows {last.get('beside')}") from None
    on_b = next(d["drops"] for d in summary["topDrops"] if (d["node"], d["reason"]) == (NODE_B, "NETFILTER_DROP"))
    print(f"nft rule dropped {dropped}, node-b counted NETFILTER_DROP {on_b}")
    assert all(f"dropped on {NODE_B} (" in (f.get("lossAt") or "") for f in client_flows if f.get("peerDrops"))
