"""A pod's own segment counters on its way from the agent to the table: the node report's
topPods rows carry them (resumed across restarts like the node's), they never cause a write
alone, the operator sums them into summary.topPods, the plugin shows the ratio beside the
count and sorts pods by it; the agent is given the host's /proc, and the node simulator
hands that mount's path over as the host's."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retransmit_plugin.tables import Output, format_trace, render
from retransmit_agent.flows import FlowCounters
from retransmit_agent.kernel import KernelSnapshot
from retransmit_agent.nodeentry import NodeFacts, node_entry
from retransmit_agent.resume import Baseline
from retransmit_agent.segments import TcpSegments
from retransmit_agent.writeschedule import entry_changed
from retransmit_core.api import NodeStatus, PodCount, RetransmitTraceSpec, to_api
from retransmit_core.contract import ENV_HOST_PROC, HOST_PROC_MOUNT
from retransmit_core.podindex import Owner
from retransmit_operator.render import render_daemonset
from retransmit_operator.settings import Settings
from retransmit_operator.tally import TraceTally
from tests.harness.nodesim.podspec import PodContext, container_env

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 6, 0, 0, tzinfo=timezone.utc)
OWNERS = {"198.18.0.5": Owner(pod="web", namespace="shop"), "198.18.0.6": Owner(pod="db", namespace="shop"),
          "10.0.0.1": Owner(node="node-a")}


def flow(local_ip: str, retransmits: int, port: int = 40000) -> FlowCounters:
    return FlowCounters("IPv4", local_ip, port, "198.18.9.9", 5201, retransmits, 0, "ESTABLISHED",
                        NOW - timedelta(seconds=5), NOW)


def snapshot(*flows: FlowCounters) -> KernelSnapshot:
    return KernelSnapshot(retransmits=sum(f.retransmits for f in flows), synack_retransmits=0, lost_events=0,
                          sampled_events=0, failed_attempts=None, missed_events=None, by_state={},
                          flow_counters=list(flows), tcp_segments=TcpSegments(90_000, 900),
                          by_local_address={f.local_ip: f.retransmits for f in flows})   # one flow per address


def entry(baseline: Baseline = Baseline(), pod_segments=None) -> NodeStatus:
    # web (own network) and the node's address (a hostNetwork pod's, the node's own) retransmit.
    step = node_entry(snapshot(flow("198.18.0.5", 30), flow("10.0.0.1", 50, 40001)), NodeFacts(node="node-a"),
                      top_flows=10, keep_events=0, now=NOW, baseline=baseline, owners=OWNERS,
                      pod_segments=pod_segments or {})
    return step.entry


def test_a_top_pod_carries_its_namespaces_segments_and_the_ratio_from_them():
    report = entry(pod_segments={("shop", "web"): TcpSegments(3000, 30), ("shop", "db"): TcpSegments(10, 0)})
    (web,) = report.top_pods          # the hostNetwork flow counts for the node: no pod row, no segments
    assert (web.pod, web.retransmits, web.out_segs, web.retrans_segs, web.retrans_ratio) == ("web", 30, 3000, 30, 0.01)
    assert (report.out_segs, report.retrans_segs) == (90_000, 900)      # the node's are its own
    unread = entry().top_pods[0]      # no process found in the pod's namespace: nothing said
    assert (unread.out_segs, unread.retrans_segs, unread.retrans_ratio) == (None, None, None)
    assert PodCount(pod="p", namespace="n", retrans_ratio=0.5).retrans_ratio is None   # never on its own


def test_a_restarted_agent_adds_a_pods_segments_to_what_its_report_held():
    before = NodeStatus(node="node-a", top_pods=[PodCount(pod="web", namespace="shop", retransmits=7,
                                                          out_segs=1000, retrans_segs=70)])
    resumed = entry(Baseline.from_entry(before), {("shop", "web"): TcpSegments(3000, 30)})
    web = resumed.top_pods[0]
    assert (web.retransmits, web.out_segs, web.retrans_segs, web.retrans_ratio) == (37, 4000, 100, 0.025)
    not_found_yet = entry(Baseline.from_entry(before)).top_pods[0]
    assert (not_found_yet.out_segs, not_found_yet.retrans_segs) == (1000, 70)


def test_a_pods_segment_counters_alone_never_make_a_write():
    written = entry(pod_segments={("shop", "web"): TcpSegments(3000, 30)})
    busier = entry(pod_segments={("shop", "web"): TcpSegments(9000, 31)})
    assert not entry_changed(written, NodeStatus.model_validate(to_api(busier)))
    more = busier.model_copy(update={"top_pods": [busier.top_pods[0].model_copy(update={"retransmits": 31})]})
    assert entry_changed(written, more)


def test_the_summary_sums_a_pods_segments_over_the_reports_that_know_them():
    a = NodeStatus(node="node-a", top_pods=[PodCount(pod="web", namespace="shop", node="node-a", retransmits=30,
                                                     out_segs=3000, retrans_segs=30),
                                            PodCount(pod="db", namespace="shop", node="node-a", retransmits=5)])
    b = NodeStatus(node="node-b", top_pods=[PodCount(pod="web", namespace="shop", node="node-a", retransmits=2,
                                                     out_segs=1000, retrans_segs=10)])
    tally = TraceTally.of([a, b])
    web, db = tally.top_pods(10)
    assert (web.retransmits, web.out_segs, web.retrans_segs, web.retrans_ratio) == (32, 4000, 40, 0.01)
    assert (db.pod, db.out_segs, db.retrans_ratio) == ("db", None, None)
    tally.drop("node-b")
    assert tally.top_pods(10)[0].out_segs == 3000


TRACE = {"metadata": {"name": "t"}, "spec": {}, "status": {"phase": "Running", "summary": {"topPods": [
    {"namespace": "shop", "pod": "busy", "node": "node-a", "retransmits": 90, "outSegs": 90_000, "retransSegs": 90,
     "retransRatio": 0.001},
    {"namespace": "shop", "pod": "unread", "node": "node-a", "retransmits": 50},
    {"namespace": "shop", "pod": "lossy", "node": "node-b", "retransmits": 20, "outSegs": 400, "retransSegs": 20,
     "retransRatio": 0.05}]}}}


def pod_rows(text: str) -> tuple[str, list[str], list[list[str]]]:
    lines = text.split("TOP PODS")[1].split("\n\n")[0].splitlines()
    return lines[0], lines[1].split(), [line.split() for line in lines[2:]]


def test_the_pod_table_shows_the_ratio_beside_the_count_and_sorts_by_it_on_request():
    title, header, rows = pod_rows(render(TRACE))
    assert header == ["NAMESPACE", "POD", "NODE", "RETRANSMITS", "RATIO"]
    assert [(r[1], r[3], r[4]) for r in rows] == [("busy", "90", "0.10%"), ("unread", "50", "-"), ("lossy", "20", "5.00%")]
    title, _, rows = pod_rows(format_trace(TRACE, Output("table"), sort="ratio"))
    assert title == " (by retransmit ratio)"
    assert [r[1] for r in rows] == ["lossy", "busy", "unread"]      # unknown last
    _, header, rows = pod_rows(render(TRACE, wide=True))
    assert header[-1] == "RETRANS/SENT" and [r[-1] for r in rows] == ["90/90000", "-", "20/400"]


def test_the_agent_gets_the_hosts_proc_read_only_and_is_told_where():
    ds = render_daemonset("t", "uid-1", RetransmitTraceSpec(), Settings())
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == HOST_PROC_MOUNT)
    assert mount["readOnly"] is True
    assert next(v for v in pod["volumes"] if v["name"] == mount["name"])["hostPath"] == {"path": "/proc", "type": ""}
    assert {"name": ENV_HOST_PROC, "value": HOST_PROC_MOUNT} in container["env"]
    assert not pod.get("hostPID")
    # The node simulator runs the container as a host process: the variable names the host's /proc.
    ctx = PodContext(pod={"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "spec": pod},
                     node_name="node-a", pod_ips=["10.0.0.1"], host_ips=["10.0.0.1"], path="/bin", home="/root")
    env = container_env(container, ctx)
    assert env[ENV_HOST_PROC] == "/proc" and env["PYTHONUNBUFFERED"] == "1"
