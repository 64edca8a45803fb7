"""Per pod, on simulated nodes: summary.topPods carries each pod's own network namespace's
segment counters and their ratio, as the agent (rendered DaemonSet, the host's /proc at the
path the simulator maps, no ptrace) read them; a hostNetwork pod gets none.

Ground truth: each pod's namespace's own /proc/net/snmp (nothing else sends there: the pods
only sleep until the test drives traffic) and the reference counter's retransmit events of
the pod's addresses.
"""

from __future__ import annotations

import subprocess

import pytest

from retransmit_agent.segments import parse_snmp_tcp
from retransmit_core.api import GROUP, PLURAL, VERSION
from retransmit_core.ratio import retransmit_ratio
from tests.harness import podtraffic
from tests.harness.controlplane import wait_until
from tests.harness.tracecluster import NODE_A, expected, running, totals
from tests.kernel.test_counting import MAX_SEGMENTS_PER_SKB

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def namespace_segments(pod: podtraffic.PodNet):
    return parse_snmp_tcp(subprocess.run(pod.enter("cat", "/proc/net/snmp"), capture_output=True, text=True,
                                         check=True).stdout)


def test_top_pods_carry_their_namespaces_ratio_and_a_host_network_pod_none(operator, reference, pods, traces,
                                                                           core, namespace):
    host = podtraffic.pod_manifest("host", NODE_A, {"app": "host"})
    host["spec"]["hostNetwork"] = True
    core.create_namespaced_pod(namespace, host)
    podtraffic.wait_pod_ips(core, namespace, "host")
    trace = traces(namespaces=[pods.namespace], nodeSelector={"kubernetes.io/hostname": NODE_A})
    trace.wait_entry("agent attached and reporting", running)
    # The pods existed before counting began: the agent counts them from its first read,
    # and nothing has sent in their namespaces since they were made.
    start = {"server": namespace_segments(pods.server), "client": namespace_segments(pods.client)}
    before = reference.read()
    pods.lossy_bulk(loss=5)
    after = reference.read()
    end = {"server": namespace_segments(pods.server), "client": namespace_segments(pods.client)}
    trace.objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, trace.name, {"spec": {"duration": "1s"}})
    wait_until(lambda: (trace.get().get("status") or {}).get("phase") == "Completed", "the trace to complete",
               timeout=120)

    want = {name: end[name].since(start[name]) for name in end}
    # The final report (SIGTERM flush) holds the counters after the traffic; the summary follows it.
    summary_pods = wait_until(
        lambda: (lambda rows: rows if {r["pod"]: (r.get("outSegs"), r.get("retransSegs")) for r in rows} == {
            name: (s.out_segs, s.retrans_segs) for name, s in want.items()} else None)(
            (trace.get()["status"].get("summary") or {}).get("topPods") or []),
        "summary.topPods with each pod's own segments", timeout=60)

    for row in summary_pods:
        segments = want[row["pod"]]
        assert row["retransRatio"] == retransmit_ratio(segments.retrans_segs, segments.out_segs)
        # RetransSegs counts segments, the tracepoint skbs: events <= segments <= events * max segments/skb.
        events, _ = totals(expected(after, set(getattr(pods, f"{row['pod']}_ips")), before))
        assert 0 < events <= segments.retrans_segs <= events * MAX_SEGMENTS_PER_SKB, (row, events)
        print(f"{row['pod']}: {segments.retrans_segs}/{segments.out_segs} = {row['retransRatio']}; {events} events")
    # The hostNetwork pod shares the node's counters: no row of its own, never the node's numbers.
    entry = trace.entry()
    assert "host" not in {p.pod for p in entry.top_pods}
    assert all(p.out_segs != entry.out_segs for p in entry.top_pods)
