"""A trace's sums kept one report at a time (operator/tally.py) equal the sums of the same
reports added up from scratch, through any sequence of writes, rewrites and deletions, and
the report index keeps one tally per trace and uid from its watch events."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from retransmit_core.api import Endpoint, Flow, NodeStatus, PodCount
from retransmit_core.naming import report_object
from retransmit_operator.aggregate import aggregate_summary
from retransmit_operator.reportindex import ReportIndex
from retransmit_operator.tally import TraceTally, remote_end

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 3, 0, 0, tzinfo=timezone.utc)
NS = "retransmit-system"


def random_entry(rng: random.Random, node: str) -> NodeStatus:
    flows = [Flow(family="IPv4", local=Endpoint(ip=f"10.0.{rng.randrange(4)}.{rng.randrange(1, 9)}", port=rng.randrange(30000, 30010)),
                  remote=Endpoint(ip=f"10.1.0.{rng.randrange(1, 9)}", port=443, service=rng.choice([None, "web"])),
                  retransmits=rng.randrange(0, 6),
                  synack_retransmits=rng.randrange(0, 2), last_seen=NOW - timedelta(seconds=rng.randrange(3)))
             for _ in range(rng.randrange(0, 5))]
    pods = [PodCount(namespace=f"ns-{rng.randrange(3)}", pod=f"pod-{rng.randrange(5)}",
                     node=rng.choice([None, node, "elsewhere"]), retransmits=rng.randrange(0, 9))
            for _ in range(rng.randrange(0, 4))]
    return NodeStatus(
        node=node, phase="Running", retransmits=rng.randrange(100), synack_retransmits=rng.randrange(5),
        lost_events=rng.randrange(3), missed_events=rng.choice([None, rng.randrange(4)]),
        failed_attempts=rng.choice([None, 0, rng.randrange(4)]),
        **rng.choice([{}, {"out_segs": (out := rng.randrange(1, 9000)), "retrans_segs": rng.randrange(out)}]),
        by_state={s: n for s in ("ESTABLISHED", "SYN_SENT") if (n := rng.randrange(3))},
        by_cause={c: n for c in ("timeout", "fast") if (n := rng.randrange(3))},
        top_flows=flows, top_pods=pods, last_report_time=NOW)


def sums(summary) -> tuple:
    return (summary.retransmits, summary.synack_retransmits, summary.lost_events, summary.missed_events,
            summary.out_segs, summary.retrans_segs, summary.retrans_ratio,
            summary.failed_attempts, summary.by_cause, summary.by_state, summary.top_pods, summary.top_flows)


@pytest.mark.parametrize("seed", range(20))
def test_kept_sums_equal_sums_from_scratch_after_any_changes(seed):
    rng = random.Random(seed)
    nodes = [f"node-{i}" for i in range(6)]
    kept, current = TraceTally(), {}
    for _ in range(60):
        node = rng.choice(nodes)
        if rng.random() < 0.25:
            kept.drop(node)
            current.pop(node, None)
        else:
            current[node] = random_entry(rng, node)
            kept.put(current[node])
        reports = sorted(current.values(), key=lambda e: e.node)
        for top_n in (1, 3, 50):
            from_scratch = aggregate_summary(reports, len(nodes), top_n, None)
            snapshot = kept.snapshot(top_n)
            incremental = aggregate_summary(reports, len(nodes), top_n, None, tally=snapshot)
            assert sums(incremental) == sums(from_scratch)
            ends = Counter()   # what topServices is ranked from: every listed flow, by remote end
            for e in reports:
                for f in e.top_flows:
                    ends[remote_end(f)] += f.retransmits + f.synack_retransmits
            assert snapshot.remote_ends == {end: n for end, n in ends.items() if n}
            known = [e for e in reports if e.out_segs is not None]
            assert (incremental.out_segs, incremental.retrans_segs) == (
                (sum(e.out_segs for e in known), sum(e.retrans_segs for e in known)) if known else (None, None))
            if known and incremental.out_segs:
                assert incremental.retrans_ratio == round(incremental.retrans_segs / incremental.out_segs, 6)
    # Everything taken out leaves nothing behind (no zero pods, no empty state keys).
    for node in nodes:
        kept.drop(node)
    empty = kept.snapshot(10)
    assert (empty.retransmits, empty.by_state, empty.top_pods, empty.top_flows, empty.missed_events,
            empty.remote_ends) == (0, {}, [], [], None, {})


NODES = [f"node-{i}" for i in range(8)]


def churn(rng: random.Random, kept: TraceTally, tables: dict, entry, grow, lower):
    """300 report changes as a running trace sees them, applied to `kept` and mirrored in
    `tables` (node -> its rows): mostly rows growing (`grow`), sometimes a row leaving its
    node's report, a restarted agent's lower count (`lower`), a node's report gone. Yields
    after each change, with the nodes whose reports `kept` holds now."""
    for step in range(300):
        node = rng.choice(NODES)
        table = tables[node]
        roll = rng.random()
        if roll < 0.05:
            kept.drop(node)
            table.clear()
        else:
            if roll < 0.15 and table:
                del table[rng.choice(sorted(table))]
            elif roll < 0.2 and table:
                lower(table, rng.choice(sorted(table)))
            for _ in range(rng.randrange(1, 4)):
                grow(table)
            kept.put(entry(node))
        yield step, [n for n in NODES if n in kept._entries]


@pytest.mark.parametrize("seed", range(10))
def test_top_pods_ranked_among_the_last_answer_and_changed_pods_equal_a_full_ranking(seed):
    """top_pods re-ranks only the last answer's pods and the pods changed since: through
    growing counts (as agents report them), a node's pods leaving its report, a node gone and
    a count going down, at one top_n as a running trace asks, it equals the full ranking."""
    rng = random.Random(seed)
    counts = {node: {} for node in NODES}   # node -> (namespace, pod) -> retransmits

    def entry(node: str) -> NodeStatus:
        return NodeStatus(node=node, phase="Running", last_report_time=NOW, top_pods=[
            PodCount(namespace=ns, pod=pod, node=node, retransmits=n) for (ns, pod), n in sorted(counts[node].items())])

    def grow(pods: dict) -> None:
        key = (f"ns-{rng.randrange(3)}", f"pod-{rng.randrange(12)}")
        pods[key] = pods.get(key, 0) + rng.randrange(0, 7)

    def lower(pods: dict, key) -> None:
        pods[key] = max(0, pods[key] - rng.randrange(1, 5))

    kept = TraceTally()
    for step, listed in churn(rng, kept, counts, entry, grow, lower):
        assert kept.top_pods(4) == TraceTally.of(entry(n) for n in listed).top_pods(4), f"step {step}"


@pytest.mark.parametrize("seed", range(10))
def test_top_flows_ranked_among_the_last_answer_and_changed_nodes_equal_a_full_ranking(seed):
    """The same for top_flows: flows growing and seen later, a flow leaving its node's report,
    a node gone, a restarted agent's lower count, at one top_n: always the full ranking."""
    rng = random.Random(seed)
    flows = {node: {} for node in NODES}   # node -> (local port, remote) -> [retransmits, last seen]

    def entry(node: str) -> NodeStatus:
        return NodeStatus(node=node, phase="Running", last_report_time=NOW, top_flows=[
            Flow(family="IPv4", local=Endpoint(ip="10.0.0.1", port=port), remote=Endpoint(ip=remote, port=443),
                 retransmits=n, last_seen=NOW + timedelta(seconds=seen)) for (port, remote), (n, seen) in sorted(flows[node].items())])

    def grow(table: dict) -> None:
        key = (rng.randrange(30000, 30006), f"10.1.0.{rng.randrange(1, 5)}")
        n, seen = table.get(key, [0, 0])
        table[key] = [n + rng.randrange(0, 4), seen + rng.randrange(0, 2)]

    def lower(table: dict, key) -> None:
        table[key][0] = max(0, table[key][0] - rng.randrange(1, 5))

    kept = TraceTally()
    for step, listed in churn(rng, kept, flows, entry, grow, lower):
        assert kept.top_flows(5) == TraceTally.of(entry(n) for n in listed).top_flows(5), f"step {step}"


def report(trace: str, uid: str, entry: NodeStatus) -> dict:
    return report_object(trace, uid, entry.node, NS, entry)


def test_the_index_keeps_one_tally_per_trace_and_uid_from_watch_events():
    rng = random.Random(7)
    index = ReportIndex()
    a1, b1 = random_entry(rng, "a"), random_entry(rng, "b")
    old_trace = random_entry(rng, "c")    # a report left by an earlier trace of the same name
    other = random_entry(rng, "a")
    index.replace([report("shop", "uid-1", a1), report("shop", "uid-1", b1),
                   report("shop", "uid-0", old_trace), report("web", "uid-9", other)])
    index.replace_heartbeats([])

    def check(trace: str, uid: str, expected: list[NodeStatus]) -> None:
        reports, kept = index.view(trace, uid, top_n=10)
        assert [r.entry.node for r in reports] == sorted(e.node for e in expected)
        assert sums(aggregate_summary([r.entry for r in reports], 2, 10, None, tally=kept)) == \
            sums(aggregate_summary(expected, 2, 10, None))

    check("shop", "uid-1", [a1, b1])
    check("web", "uid-9", [other])
    a2 = random_entry(rng, "a")
    index.observe(report("shop", "uid-1", a2))                       # a rewrite
    check("shop", "uid-1", [a2, b1])
    index.observe(report("shop", "uid-1", b1), deleted=True)         # a deletion
    check("shop", "uid-1", [a2])
    check("shop", "uid-0", [old_trace])                              # the earlier trace's apart
    index.replace([report("web", "uid-9", other)])                   # a relist
    check("shop", "uid-1", [])
    check("web", "uid-9", [other])
