"""The agent's /metrics, /readyz and /livez, served for real on a free local port."""

import os
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from retransmit_agent.preflight import effective_capabilities, security_mode
from retransmit_core.version import package_version
from retransmit_agent.metrics import AgentInfo, AgentState, MetricsServer

pytestmark = pytest.mark.unit

INFO = AgentInfo(version="0.1.0", kernel="6.18.0-1-amd64", mode="capabilities")


@pytest.fixture
def served():
    state = AgentState(trace="t1", node="n1", info=INFO)
    server = MetricsServer(state, 0, host="127.0.0.1").start()
    yield state, f"http://127.0.0.1:{server.port}"
    server.stop()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_readyz_follows_the_attached_program(served):
    state, url = served
    assert get(url + "/readyz")[0] == 503
    state.attached = True
    assert get(url + "/readyz") == (200, "ok\n")


def test_livez_fails_when_the_report_loop_stalls(served):
    state, url = served
    assert get(url + "/livez")[0] == 200
    state.last_loop = time.monotonic() - state.liveness_bound - 1
    assert get(url + "/livez")[0] == 503
    state.beat()
    assert get(url + "/livez")[0] == 200


def test_metrics_expose_counts_by_pod_and_remote_port(served):
    state, url = served
    state.publish_counts(12, 3, 4, {("shop", "web", "5201"): 10, ("", "n1", "22"): 2}, missed=6)
    state.report_errors = 2
    code, text = get(url + "/metrics")
    assert code == 200
    got = samples(text)
    assert got[("rtrace_retransmits_total", (("pod_name", "web"), ("pod_namespace", "shop"), ("remote_port", "5201"), ("trace", "t1")))] == 10
    assert got[("rtrace_retransmits_total", (("pod_name", "n1"), ("pod_namespace", ""), ("remote_port", "22"), ("trace", "t1")))] == 2
    assert got[("rtrace_node_retransmits_total", (("node", "n1"), ("trace", "t1")))] == 12
    assert got[("rtrace_node_synack_retransmits_total", (("node", "n1"), ("trace", "t1")))] == 3
    assert got[("rtrace_lost_events_total", (("node", "n1"), ("trace", "t1")))] == 4
    assert got[("rtrace_missed_events_total", (("node", "n1"), ("trace", "t1")))] == 6
    assert got[("rtrace_report_errors_total", (("node", "n1"), ("trace", "t1")))] == 2


def test_counters_never_decrease_when_a_flow_leaves_the_kernel_map(served):
    state, url = served
    state.publish_counts(10, 0, 0, {("shop", "web", "5201"): 10})
    state.publish_counts(10, 0, 0, {("shop", "web", "5201"): 4})  # flow evicted, a new one counted
    got = samples(get(url + "/metrics")[1])
    assert got[("rtrace_retransmits_total", (("pod_name", "web"), ("pod_namespace", "shop"), ("remote_port", "5201"), ("trace", "t1")))] == 10


def test_agent_info_is_one_series_naming_version_kernel_and_security_mode(served):
    _, url = served
    info = {labels: value for (name, labels), value in samples(get(url + "/metrics")[1]).items()
            if name == "rtrace_agent_info"}
    assert info == {(("kernel", "6.18.0-1-amd64"), ("mode", "capabilities"), ("node", "n1"), ("trace", "t1"),
                     ("version", "0.1.0")): 1}


def test_unknown_paths_are_404(served):
    _, url = served
    assert get(url + "/nope")[0] == 404


def test_retransmits_by_tcp_state_are_counters_that_never_decrease(served):
    state, url = served
    state.publish_counts(7, 2, 0, {}, by_state={"ESTABLISHED": 5, "SYN_RECV": 2, "LAST_ACK": 2})
    state.publish_counts(7, 2, 0, {}, by_state={"ESTABLISHED": 6, "SYN_RECV": 1})  # a lower value is kept higher
    got = samples(get(url + "/metrics")[1])
    by_state = {dict(labels)["state"]: value for (name, labels), value in got.items()
                if name == "rtrace_node_retransmits_by_state_total"}
    assert by_state == {"ESTABLISHED": 6, "SYN_RECV": 2, "LAST_ACK": 2}
    assert {dict(labels)["node"] for (name, labels) in got if name == "rtrace_node_retransmits_by_state_total"} == {"n1"}


def test_an_agent_whose_kernel_cannot_trace_exports_failed_1_and_attached_0(tmp_path):
    """The real ClusterAgent opening the real kernel program against a tracefs without the tcp
    tracepoints (an empty folder) or, without privileges, failing earlier: either way the
    node cannot trace, which /metrics says as rtrace_agent_failed 1."""
    import kubernetes

    from retransmit_agent.cluster import ClusterAgent
    from retransmit_core.api import RetransmitTraceSpec
    from retransmit_core.contract import AgentInvocation

    agent = ClusterAgent(AgentInvocation(trace="t1", trace_uid="u1", spec=RetransmitTraceSpec(), tracefs=str(tmp_path)),
                         "n1", "rs", kubernetes.client.ApiClient())
    server = MetricsServer(agent.state, 0, host="127.0.0.1").start()
    try:
        before = samples(get(f"http://127.0.0.1:{server.port}/metrics")[1])
        assert before[("rtrace_agent_failed", (("node", "n1"), ("trace", "t1")))] == 0
        agent.open_program()
        assert agent.facts.problem
        after = samples(get(f"http://127.0.0.1:{server.port}/metrics")[1])
    finally:
        server.stop()
    assert after[("rtrace_agent_failed", (("node", "n1"), ("trace", "t1")))] == 1
    assert after[("rtrace_program_attached", (("node", "n1"), ("trace", "t1")))] == 0
    # The running agent's own facts: this process's kernel, version and capabilities.
    info, = [dict(labels) for (name, labels) in after if name == "rtrace_agent_info"]
    assert info["kernel"] == os.uname().release
    assert info["version"] == package_version()
    assert info["mode"] == security_mode(effective_capabilities())


def test_clients_ephemeral_ports_are_one_remote_port_value_so_a_series_is_never_a_flow(served):
    """A server pod retransmitting to many clients: one series, not one per client port."""
    state, url = served
    state.publish_counts(10, 0, 0, {("shop", "db", "41234"): 3, ("shop", "db", "58000"): 4, ("shop", "db", "32768"): 1,
                                    ("shop", "web", "5432"): 2, ("shop", "web", "32767"): 1})
    got = samples(get(url + "/metrics")[1])
    per_pod = {(dict(labels)["pod_name"], dict(labels)["remote_port"]): value for (name, labels), value in got.items()
               if name == "rtrace_retransmits_total"}
    assert per_pod == {("db", "ephemeral"): 8, ("web", "5432"): 2, ("web", "32767"): 1}
