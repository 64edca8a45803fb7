"""`kubectl retransmit`: flags become a valid trace spec or one line naming the flag; a
trace's status becomes readable tables (pure parts; the cluster layer runs the rest)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from retransmit_plugin.main import EXIT_USAGE, PluginError, build_parser, spec_from_flags
from retransmit_plugin.tables import causes, endpoint, progress_line, render, table, time_left

pytestmark = pytest.mark.unit


def run_flags(*argv: str):
    return build_parser().parse_args(["run", *argv])


def test_run_flags_become_the_spec_the_api_validates():
    spec = spec_from_flags(run_flags("--node", "worker-3", "-l", "pool=blue", "--namespace-filter", "shop",
                                     "--pod-selector", "app=web", "--port", "443", "--remote-cidr", "10.0.0.0/8",
                                     "--state", "ESTABLISHED", "--family", "IPv4", "--duration", "90s"))
    assert spec["duration"] == "90s"
    assert spec["nodeSelector"] == {"pool": "blue", "kubernetes.io/hostname": "worker-3"}
    assert spec["namespaces"] == ["shop"] and spec["podSelector"]["matchLabels"] == {"app": "web"}
    assert spec["filter"] == {"ipFamilies": ["IPv4"], "ports": [443], "remoteCIDRs": ["10.0.0.0/8"],
                              "states": ["ESTABLISHED"]}


@pytest.mark.parametrize("argv, words", [
    (("--remote-cidr", "10.0.0.0/33"), "spec.filter.remoteCIDRs"),
    (("--duration", "ten minutes"), "spec.duration"),
    (("--state", "ESTABLISH"), "spec.filter.states"),
    (("--pod-selector", "app"), "--pod-selector 'app': use key=value"),
])
def test_bad_run_flags_name_the_field(argv, words):
    with pytest.raises(PluginError) as e:
        spec_from_flags(run_flags(*argv))
    assert e.value.status == EXIT_USAGE and words in str(e.value)


def test_an_unknown_flag_is_a_usage_error():
    with pytest.raises(PluginError) as e:
        build_parser().parse_args(["run", "--bogus"])
    assert e.value.status == EXIT_USAGE and "--bogus" in str(e.value)


TRACE = {
    "metadata": {"name": "shop"},
    "spec": {"duration": "60s"},
    "status": {
        "phase": "Running", "startTime": "2026-11-30T10:00:00Z",
        "conditions": [{"type": "Ready", "status": "False", "message": "waiting for node-b"}],
        "summary": {
            "retransmits": 120, "synackRetransmits": 3, "lostEvents": 0, "nodesReporting": 1, "nodesDesired": 2,
            "topFlows": [{"node": "node-a", "local": {"ip": "198.18.0.2", "port": 5201, "pod": "web", "namespace": "shop"},
                          "remote": {"ip": "fd00::9", "port": 40000}, "retransmits": 100, "synackRetransmits": 0,
                          "lastState": "ESTABLISHED", "byCause": {"fast": 90, "timeout": 10}}],
            "topPods": [{"namespace": "shop", "pod": "web", "node": "node-a", "retransmits": 103}],
            "byState": {"ESTABLISHED": 120, "SYN_RECV": 3},
        },
        "nodes": [{"node": "node-a", "phase": "Running", "retransmits": 120, "synackRetransmits": 3},
                  {"node": "node-b", "phase": "Failed", "message": "tracefs is not mounted"}],
    },
}


def test_the_result_reads_as_tables():
    text = render(TRACE, now=datetime(2026, 11, 30, 10, 0, 45, tzinfo=timezone.utc))
    assert text.splitlines()[0] == ("shop: Running; nodes 1/2 reporting; 120 retransmits, 3 SYN-ACK; 15s left; "
                                    "waiting for node-b")
    assert "198.18.0.2:5201 (shop/web)" in text and "[fd00::9]:40000" in text and "fast 90 timeout 10" in text
    for title in ("TOP FLOWS", "TOP PODS", "BY TCP STATE", "NODES"):
        assert title in text
    assert "BY CAUSE" not in text          # no byCause in this summary: no empty table
    assert "tracefs is not mounted" in text


def test_helpers():
    assert table(("A", "BB"), [(1, None)], right=(0,)) == ["A  BB", "1  -"]
    assert table(("A",), []) == []
    assert endpoint({"ip": "10.0.0.1", "port": 80, "node": "n1"}) == "10.0.0.1:80 (node n1)"
    assert causes({"unknown": 5, "probe": 1, "fast": 7}) == "fast 7 probe 1 unknown 5"
    assert causes({}) == "-"
    assert time_left({"spec": {}, "status": {"startTime": "2026-11-30T10:00:00Z"}}) is None
    assert "nodes 0/0" in progress_line({"metadata": {"name": "x"}})


def test_the_result_names_the_linux_nodes_the_trace_misses():
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "nodesLinux": 4,
        "nodesNotCovered": [{"reason": "TaintNotTolerated", "count": 2, "nodes": ["cp-1", "cp-2"],
                             "detail": "taints node-role.kubernetes.io/control-plane:NoSchedule are not tolerated"}]}}}
    lines = render(trace).splitlines()
    header = lines.index("NOT COVERED (2 of 4 Linux nodes)")
    assert lines[header + 1].split()[:4] == ["REASON", "NODES", "EXAMPLES", "FIX"]
    assert lines[header + 2].startswith("TaintNotTolerated") and "cp-1, cp-2" in lines[header + 2]
    assert "NOT COVERED" not in render(TRACE)
