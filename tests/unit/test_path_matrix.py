"""The trace's path matrix (operator/paths.py): each remote address named by its node (pod,
node address, loopback, pod CIDR), Service addresses unknown and the rest outside; node and
zone pairs summed from the nodes' byRemote; the one pair that holds most retransmits named,
and nothing said when the loss is spread out. And the agent's byRemote: every flow's
retransmits by remote address, resumed across a restart."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from retransmit_agent.nodeentry import NodeFacts as AgentFacts, node_entry
from retransmit_agent.resume import Baseline
from retransmit_core.api import MAX_REMOTES, Backend, Endpoint, Flow, IPFamily, NodeStatus, RemoteCount
from retransmit_core.podindex import PodIndex
from retransmit_operator.paths import OUTSIDE, UNKNOWN, Places, path_matrix
from retransmit_operator.placement import NodeFacts
from retransmit_operator.remotenames import ServiceIndex

pytestmark = pytest.mark.unit

ZONE = "topology.kubernetes.io/zone"


def node(name: str, zone: str | None, cidrs: tuple[str, ...] = ()) -> NodeFacts:
    labels = {"kubernetes.io/os": "linux", **({ZONE: zone} if zone else {})}
    return NodeFacts(name, labels, (), addresses=(f"198.18.0.{ord(name[-1]) - 96}",), pod_cidrs=cidrs)


NODES = {n.name: n for n in (node("node-a", "zone-x", ("10.0.1.0/24", "fd00:1::/64")),
                             node("node-b", "zone-x", ("10.0.2.0/24",)),
                             node("node-c", "zone-y", ("10.0.3.0/24",)),
                             node("node-d", "zone-y", ("10.0.4.0/24",)))}


def places(pods: PodIndex | None = None) -> Places:
    services = ServiceIndex()
    services.observe({"metadata": {"uid": "s", "namespace": "shop", "name": "web"},
                      "spec": {"clusterIPs": ["198.19.0.10"], "ports": [{"port": 80}]}})
    return Places(pods, NODES, {ip: n.name for n in NODES.values() for ip in n.addresses}, services)


def pod(name: str, node_name: str, ip: str) -> dict:
    return {"metadata": {"uid": name, "name": name, "namespace": "shop"}, "spec": {"nodeName": node_name},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def test_each_remote_address_is_named_by_its_node():
    index = PodIndex()
    index.observe(pod("db", "node-c", "10.0.9.7"))   # an address outside every podCIDR: the pod watch knows
    where = places(index)
    assert where.node_of("10.0.9.7", "node-a") == "node-c"
    assert where.node_of("198.18.0.2", "node-a") == "node-b"           # a node's own address
    assert where.node_of("127.0.0.1", "node-a") == "node-a"            # loopback: the sender
    assert where.node_of("::1", "node-b") == "node-b"
    assert where.node_of("10.0.4.33", "node-a") == "node-d"            # a pod gone: its node's podCIDR
    assert where.node_of("fd00:1::5", "node-b") == "node-a"
    assert where.node_of("198.19.0.10", "node-a") == UNKNOWN           # a Service: its backend is not known
    assert where.node_of("203.0.113.9", "node-a") == OUTSIDE
    assert where.node_of("::ffff:10.0.2.8", "node-a") == "node-b"      # v4-mapped, canonical first


def report(name: str, remotes: dict[str, int]) -> NodeStatus:
    return NodeStatus(node=name, retransmits=sum(remotes.values()),
                      by_remote=[RemoteCount(ip=ip, retransmits=n) for ip, n in remotes.items()])


def test_the_pair_that_holds_most_retransmits_is_named():
    reports = [report("node-a", {"10.0.2.5": 820, "10.0.3.5": 40, "203.0.113.9": 20}),
               report("node-b", {"10.0.1.5": 100, "198.19.0.10": 20})]
    total = 1000
    matrix = path_matrix(reports, places(), total)
    assert [(p.source, p.destination, p.retransmits, p.percent) for p in matrix.by_node_pair] == [
        ("node-a", "node-b", 820, 82), ("node-b", "node-a", 100, 10), ("node-a", "node-c", 40, 4),
        ("node-a", OUTSIDE, 20, 2), ("node-b", UNKNOWN, 20, 2)]
    assert [(p.source, p.destination, p.retransmits) for p in matrix.by_zone_pair] == [
        ("zone-x", "zone-x", 920), ("zone-x", "zone-y", 40), ("zone-x", OUTSIDE, 20), ("zone-x", UNKNOWN, 20)]
    assert matrix.hot_path == "82% of retransmits went from node node-a (zone zone-x) to node node-b (zone zone-x)"


def flow(remote_ip: str, total_retrans: int | None, data_segs_out: int | None) -> Flow:
    return Flow(local=Endpoint(ip="10.0.1.5", port=40000), remote=Endpoint(ip=remote_ip, port=443), family=IPFamily.IPV4,
                retransmits=1, total_retrans=total_retrans, data_segs_out=data_segs_out)


def test_a_pairs_ratio_sums_its_listed_connections_socket_counters():
    a = report("node-a", {"10.0.2.5": 60, "10.0.2.6": 20, "10.0.3.5": 20}).model_copy(update={"top_flows": [
        flow("10.0.2.5", 30, 1000), flow("10.0.2.6", 10, 3000),   # to node-b: 40 of 4,000
        flow("10.0.3.5", None, None)]})                              # to node-c: no socket counters read
    b = report("node-b", {"10.0.4.5": 10}).model_copy(update={"top_flows": [flow("10.0.4.5", 5, 100)]})
    matrix = path_matrix([a, b], places(), 110)
    ratios = {(p.source, p.destination): (p.total_retrans, p.data_segs_out, p.retrans_ratio) for p in matrix.by_node_pair}
    assert ratios == {("node-a", "node-b"): (40, 4000, 0.01), ("node-a", "node-c"): (None, None, None),
                      ("node-b", "node-d"): (5, 100, 0.05)}
    zones = {(p.source, p.destination): (p.total_retrans, p.data_segs_out) for p in matrix.by_zone_pair}
    assert zones == {("zone-x", "zone-x"): (40, 4000), ("zone-x", "zone-y"): (5, 100)}


def test_a_service_flows_retransmits_go_to_its_backends_node_and_the_rest_stay_unknown():
    def to_web(port: int, retransmits: int, backend: str | None, segments: int | None = None) -> Flow:
        return Flow(local=Endpoint(ip="10.0.1.5", port=port),
                    remote=Endpoint(ip="198.19.0.10", port=80, backend=backend and Backend(ip=backend, port=8080)),
                    family=IPFamily.IPV4, retransmits=retransmits,
                    total_retrans=segments, data_segs_out=segments and segments * 10)
    # byRemote holds every flow to the Service's address (40); the listed flows name where 35 went.
    a = report("node-a", {"198.19.0.10": 40}).model_copy(update={"top_flows": [
        to_web(40001, 20, "10.0.2.7", segments=5),   # a backend on node-b (its podCIDR)
        to_web(40002, 10, "10.0.3.7"),               # on node-c
        to_web(40003, 5, None)]})                    # the table no longer held it: unknown
    matrix = path_matrix([a], places(), 40)
    pairs = {(p.source, p.destination): (p.retransmits, p.total_retrans, p.data_segs_out) for p in matrix.by_node_pair}
    assert pairs == {("node-a", "node-b"): (20, 5, 50), ("node-a", "node-c"): (10, None, None),
                     ("node-a", UNKNOWN): (10, None, None)}
    # A flow never moves more than its address's byRemote count holds.
    b = report("node-b", {"198.19.0.10": 3}).model_copy(update={"top_flows": [to_web(40004, 9, "10.0.3.8")]})
    assert [(p.destination, p.retransmits) for p in path_matrix([b], places(), 3).by_node_pair] == [("node-c", 3)]


def test_a_zone_pair_is_named_when_no_node_pair_stands_out():
    reports = [report("node-a", {"10.0.3.5": 300, "10.0.4.5": 60}), report("node-b", {"10.0.4.5": 300, "10.0.2.9": 340})]
    matrix = path_matrix(reports, places(), 1000)
    assert matrix.hot_path == "66% of retransmits went from zone zone-x to zone zone-y"


def test_nothing_is_said_when_the_loss_is_spread_out_or_tiny():
    spread = [report("node-a", {"10.0.2.5": 30, "10.0.3.5": 30}), report("node-c", {"10.0.4.5": 30, "10.0.1.5": 10})]
    assert path_matrix(spread, places(), 100).hot_path is None
    assert path_matrix([report("node-a", {"10.0.2.5": 5})], places(), 5).hot_path is None   # 100%, but 5 retransmits


def test_no_zone_matrix_without_zones():
    bare = {name: NodeFacts(name, {}, (), facts.addresses, facts.pod_cidrs) for name, facts in NODES.items()}
    where = Places(None, bare, {}, ServiceIndex())
    matrix = path_matrix([report("node-a", {"10.0.2.5": 50})], where, 50)
    assert matrix.by_zone_pair == [] and matrix.hot_path == "100% of retransmits went from node node-a to node node-b"


def test_the_agent_reports_every_flows_retransmits_by_remote_address_and_resumes_them():
    from retransmit_agent.flows import AF_INET, flow_counters
    from retransmit_agent.kernel import KernelSnapshot

    def snapshot(counts: list[tuple[str, int]]) -> KernelSnapshot:
        flows = [flow_counters(AF_INET, bytes([10, 0, 1, 2]), bytes(int(x) for x in ip.split(".")), 40000 + i, 443, n, 0,
                               0, 1, 1, 0) for i, (ip, n) in enumerate(counts)]
        return KernelSnapshot(retransmits=sum(n for _, n in counts), synack_retransmits=0, lost_events=0, sampled_events=0,
                              failed_attempts=None, missed_events=None, by_state={}, flow_counters=flows)

    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    facts = AgentFacts("node-a")
    step = node_entry(snapshot([("10.0.2.5", 3), ("10.0.2.5", 4), ("10.0.3.1", 2)]), facts, top_flows=1, keep_events=0, now=now)
    # Every flow counts, not only the one top flow the entry keeps.
    assert step.entry.by_remote == [RemoteCount(ip="10.0.2.5", retransmits=7), RemoteCount(ip="10.0.3.1", retransmits=2)]
    # A restarted agent's kernel map starts empty: it adds its fresh counts to the report's.
    resumed = node_entry(snapshot([("10.0.3.1", 5)]), facts, top_flows=1, keep_events=0, now=now,
                         baseline=Baseline.from_entry(step.entry))
    assert resumed.entry.by_remote == [RemoteCount(ip="10.0.2.5", retransmits=7), RemoteCount(ip="10.0.3.1", retransmits=7)]
    # Bounded: the busiest MAX_REMOTES addresses.
    many = node_entry(snapshot([(f"10.1.{i // 250}.{i % 250}", i + 1) for i in range(MAX_REMOTES + 10)]), facts,
                      top_flows=1, keep_events=0, now=now)
    assert len(many.entry.by_remote) == MAX_REMOTES and many.entry.by_remote[0].retransmits == MAX_REMOTES + 10


def test_remembered_places_are_worked_out_again_after_the_ttl_a_bounded_number_per_pass(monkeypatch):
    # Five pods on node-c, each the only remote of one node-a report; then all five move to
    # node-d (same addresses, outside every podCIDR, so only the pod watch knows them).
    import retransmit_operator.paths as paths
    monkeypatch.setattr(paths, "REFRESH_PER_PASS", 2)
    index = PodIndex()
    ips = [f"10.9.0.{i}" for i in range(5)]
    for i, ip in enumerate(ips):
        index.observe(pod(f"p{i}", "node-c", ip))
    where = places(index)
    reports = [report("node-a", {ip: 10}) for ip in ips]

    def to(node: str) -> int:
        where_now = {(p.source, p.destination): p.retransmits for p in path_matrix(reports, where, 50).by_node_pair}
        return where_now.get(("node-a", node), 0) // 10
    where.begin_pass(1000.0)
    assert to("node-c") == 5
    for i, ip in enumerate(ips):
        index.observe(pod(f"p{i}", "node-d", ip))
    where.begin_pass(1000.0 + paths.PLACES_TTL / 2)
    assert to("node-c") == 5                      # remembered: within the TTL nothing is worked out again
    moved = []
    for n in range(1, 4):                         # past the TTL: two reports' addresses per pass
        where.begin_pass(1000.0 + paths.PLACES_TTL + n)
        moved.append(to("node-d"))
    assert moved == [2, 4, 5]
    # A report that changed is worked out at once, even with no budget left in the pass.
    monkeypatch.setattr(paths, "REFRESH_PER_PASS", 0)
    index.observe(pod("p0", "node-b", ips[0]))
    reports[0] = report("node-a", {ips[0]: 10})
    where.begin_pass(2000.0)
    assert to("node-b") == 1 and to("node-d") == 4
