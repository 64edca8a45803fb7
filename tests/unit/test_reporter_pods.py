"""Per-pod counts of one node: the kernel's per-address counts by the pod owning each address
now, resumed across restarts from every pod the report held."""

from datetime import datetime, timezone

import pytest

from retransmit_agent.resume import Baseline, PodTotals, ranked_pods
from retransmit_core.api import MAX_NODE_PODS, Endpoint, Flow, NodeStatus, PodCount, RecentEvent, to_api
from retransmit_core.podindex import Owner

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WEB, DB = Owner(pod="web", namespace="shop"), Owner(pod="db", namespace="data")
NODE = Owner(node="n1")
OWNERS = {"198.18.0.2": WEB, "fd00::2": WEB, "198.18.0.3": DB, "10.1.0.5": NODE}


def entry(**kw):
    return NodeStatus(node="n1", phase="Running", **kw)


def test_addresses_add_up_by_the_pod_owning_them_and_the_nodes_own_are_no_pods():
    totals = PodTotals().attribute({"198.18.0.2": 150, "fd00::2": 3, "198.18.0.3": 4, "10.1.0.5": 9}, OWNERS.get)
    assert totals.pods == {("shop", "web"): 153, ("data", "db"): 4}


def test_each_step_adds_only_what_each_address_counted_since_the_last():
    first = PodTotals().attribute({"198.18.0.2": 10}, OWNERS.get)
    second = first.attribute({"198.18.0.2": 25, "198.18.0.3": 1}, OWNERS.get)
    assert second.pods == {("shop", "web"): 25, ("data", "db"): 1}
    assert second.attribute({"198.18.0.2": 25, "198.18.0.3": 1}, OWNERS.get).pods == second.pods


def test_a_reused_address_keeps_its_history_with_the_pod_that_had_it():
    first = PodTotals().attribute({"198.18.0.3": 40}, OWNERS.get)
    # db was deleted and its address went to a new pod, which retransmitted 5 more.
    reused = {**OWNERS, "198.18.0.3": Owner(pod="db-2", namespace="data")}
    second = first.attribute({"198.18.0.3": 45}, reused.get)
    assert second.pods == {("data", "db"): 40, ("data", "db-2"): 5}


def test_an_address_not_yet_in_the_pod_index_is_counted_once_its_pod_is_known():
    first = PodTotals().attribute({"198.18.0.9": 6}, OWNERS.get)
    assert first.pods == {}
    known = {**OWNERS, "198.18.0.9": Owner(pod="new", namespace="shop")}
    assert first.attribute({"198.18.0.9": 8}, known.get).pods == {("shop", "new"): 8}


def test_a_count_that_lags_one_read_adds_nothing_twice():
    # A pending run moved into the map while the kernel was read: 30 shows as 27 once.
    steps = [30, 27, 31]
    totals = PodTotals()
    for count in steps:
        totals = totals.attribute({"198.18.0.2": count}, OWNERS.get)
    assert totals.pods == {("shop", "web"): 31}


def test_a_restarted_agent_resumes_every_pod_of_its_report_and_adds_its_fresh_counts():
    before = entry(retransmits=100, top_pods=[PodCount(namespace="shop", pod="web", node="n1", retransmits=80),
                                              PodCount(namespace="data", pod="db", node="n1", retransmits=20)]
                   + [PodCount(namespace="shop", pod=f"p{i}", node="n1", retransmits=1) for i in range(30)])
    baseline = Baseline.from_entry(NodeStatus.model_validate(to_api(before)))  # as read back from the API
    assert len(baseline.top_pods) == 32 and not baseline.empty
    # The new kernel program's per-address counts start at zero: web has 5 new retransmits.
    totals = PodTotals.resumed(baseline).attribute({"198.18.0.2": 5}, OWNERS.get)
    assert totals.pods == {("shop", "web"): 85, ("data", "db"): 20, **{("shop", f"p{i}"): 1 for i in range(30)}}


def test_counts_survive_repeated_restarts():
    previous, reported = None, []
    for new in (5, 0, 8):
        totals = PodTotals.resumed(Baseline.from_entry(previous)).attribute({"198.18.0.2": new}, OWNERS.get)
        pods = ranked_pods(totals.pods, "n1")
        reported.append([p.retransmits for p in pods])
        previous = NodeStatus.model_validate(to_api(entry(top_pods=pods)))
    assert reported == [[5], [5], [13]]


def test_ranked_pods_keeps_every_pod_with_a_count_busiest_first_up_to_the_reports_bound():
    counts = {("b", "x"): 5, ("a", "y"): 5, ("a", "z"): 9, ("a", "idle"): 0}
    pods = ranked_pods(counts, "n1")
    assert [(p.namespace, p.pod, p.node, p.retransmits) for p in pods] == [
        ("a", "z", "n1", 9), ("a", "y", "n1", 5), ("b", "x", "n1", 5)]
    many = {("ns", f"p{i}"): i + 1 for i in range(MAX_NODE_PODS + 3)}
    kept = ranked_pods(many, "n1")
    assert len(kept) == MAX_NODE_PODS and kept[-1].retransmits == 4   # the 3 least busy left out


def full_entry():
    flows = [Flow(local=Endpoint(ip="198.18.0.2", port=k, pod="web", namespace="shop"),
                  remote=Endpoint(ip="198.18.0.3", port=5432, pod="db", namespace="data"),
                  family="IPv4", retransmits=100 - k, last_state="ESTABLISHED", first_seen=T0, last_seen=T0)
             for k in range(10)]
    events = [RecentEvent(time=T0, kind="retransmit", family="IPv4", local=f.local, remote=f.remote) for f in flows]
    pods = [PodCount(namespace="shop", pod=f"web-{k}", node="n1", retransmits=1000 - k) for k in range(10)]
    return entry(retransmits=5000, top_flows=flows, recent_events=events, top_pods=pods)
