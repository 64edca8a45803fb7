"""`kubectl retransmit`: flags (global ones before or after the subcommand) become a valid
trace spec or one line naming the flag; a trace becomes readable tables or one of kubectl's
other -o forms (pure parts; the cluster layer runs the rest)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml

from retransmit_core.naming import DEFAULT_NAMESPACE
from retransmit_core.version import package_version
from retransmit_plugin.main import (
    EXAMPLES,
    EXIT_USAGE,
    PROG,
    PluginError,
    build_parser,
    main,
    parse,
    pod_namespaces,
    spec_from_flags,
)
from retransmit_plugin.tables import (
    Output,
    causes,
    endpoint,
    format_trace,
    parse_output,
    progress_line,
    render,
    table,
    time_left,
)

pytestmark = pytest.mark.unit


def run_flags(*argv: str):
    return parse(["run", *argv])


def test_run_flags_become_the_spec_the_api_validates():
    flags = run_flags("--node", "worker-3", "-l", "pool=blue", "-n", "shop",
                      "--pod-selector", "app=web", "--port", "443", "--remote-cidr", "10.0.0.0/8",
                      "--state", "ESTABLISHED", "--family", "IPv4", "--duration", "90s")
    spec = spec_from_flags(flags, pod_namespaces(flags, "default"))
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
        spec_from_flags(run_flags(*argv), None)
    assert e.value.status == EXIT_USAGE and words in str(e.value)


def test_an_unknown_flag_is_a_usage_error():
    with pytest.raises(PluginError) as e:
        build_parser().parse_args(["run", "--bogus"])
    assert e.value.status == EXIT_USAGE and "--bogus" in str(e.value)
    with pytest.raises(PluginError) as e:
        build_parser().parse_args(["show"])
    assert e.value.status == EXIT_USAGE and "name (see kubectl retransmit show --help)" in str(e.value)


@pytest.mark.parametrize("argv", [
    ["--context", "kind-x", "--kubeconfig", "f", "-n", "shop", "--operator-namespace", "ops", "show", "foo"],
    ["show", "foo", "--context", "kind-x", "--kubeconfig", "f", "-n", "shop", "--operator-namespace", "ops"],
    ["show", "--context", "kind-x", "foo", "--kubeconfig=f", "--namespace=shop", "--operator-namespace=ops"],
    ["--context", "kind-x", "show", "--kubeconfig", "f", "foo", "-n", "shop", "--operator-namespace", "ops"],
])
def test_global_flags_work_before_and_after_the_subcommand(argv):
    ns = parse(argv)
    assert (ns.command, ns.name, ns.context, ns.kubeconfig) == ("show", "foo", "kind-x", "f")
    assert (ns.namespace, ns.operator_namespace, ns.all_namespaces) == ("shop", "ops", False)


def test_global_flags_default_when_not_given_anywhere():
    ns = parse(["check"])
    assert (ns.context, ns.kubeconfig, ns.namespace, ns.all_namespaces) == (None, None, None, False)
    assert ns.operator_namespace == DEFAULT_NAMESPACE


@pytest.mark.parametrize("argv, context_namespace, want", [
    (["run", "-n", "shop"], "default", ["shop"]),
    (["-n", "shop", "run"], "default", ["shop"]),
    (["run", "--namespace", "shop", "--namespace-filter", "web"], "default", ["shop", "web"]),
    (["run", "--namespace-filter", "web"], "default", ["web"]),
    (["run"], "team-a", ["team-a"]),                 # no -n: the context's namespace, as kubectl get pods
    (["run", "-A"], "team-a", None),                 # -A: every namespace
    (["--all-namespaces", "run"], "team-a", None),
])
def test_n_and_A_select_the_pods_namespaces_as_kubectl_get_pods(argv, context_namespace, want):
    flags = parse(argv)
    assert pod_namespaces(flags, context_namespace) == want
    assert (spec_from_flags(flags, want)["namespaces"] or None) == want       # [] in the API: every namespace


@pytest.mark.parametrize("argv", [["run", "-n", "shop", "-A"], ["-A", "show", "x", "-n", "shop"],
                                  ["run", "-A", "--namespace-filter", "shop"]])
def test_n_with_A_is_a_usage_error(argv):
    with pytest.raises(PluginError) as e:
        pod_namespaces(parse(argv), "default")
    assert e.value.status == EXIT_USAGE and "-A/--all-namespaces" in str(e.value)


def test_n_narrows_the_rows_show_and_watch_print():
    assert parse(["show", "x", "-n", "shop"]).namespace_rows == ["shop"]
    assert parse(["watch", "x", "-n", "shop"]).namespace_rows == ["shop"]
    assert parse(["show", "x", "-A"]).namespace_rows is None
    assert parse(["show", "x"]).namespace_rows is None


def test_every_help_has_examples_and_the_global_flags():
    parser = build_parser()
    helps = {None: parser.format_help()}
    subparsers = next(a for a in parser._actions if a.dest == "command")
    helps.update({name: p.format_help() for name, p in subparsers.choices.items()})
    assert set(helps) == set(EXAMPLES)
    for name, text in helps.items():
        assert "examples:" in text and f"{PROG} {name or ''}".strip() in text.split("examples:")[1], name
        assert "--operator-namespace" in text and "--all-namespaces" in text, name


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"{PROG} {package_version()}"


@pytest.mark.parametrize("text", ["jsonpath", "jsonpath={.a", "jsonpath={range .a}", "jsonpath={.a[?(@.b)]}",
                                  "xml", "jsonpath={..a}"])
def test_a_bad_output_form_is_one_usage_line_naming_the_fix(text, capsys):
    assert main(["show", "x", "-o", text]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-o/--output" in err


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


def test_the_result_names_the_nodes_whose_agents_run_privileged_and_why():
    why = "not permitted to load BPF programs (uid 0): this kernel has no CAP_BPF or CAP_PERFMON (cap_last_cap is 37)"
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "privilegedNodes": [{"reason": why, "count": 2, "nodes": ["old-1", "old-2"]}]}}}
    lines = render(trace).splitlines()
    header = lines.index("PRIVILEGED AGENTS (2 nodes: capabilities were not enough)")
    assert lines[header + 1].split() == ["NODES", "EXAMPLES", "REASON"]
    assert lines[header + 2].split()[:3] == ["2", "old-1,", "old-2"] and lines[header + 2].endswith(why)
    assert "PRIVILEGED AGENTS" not in render(TRACE)


STORED = {**TRACE, "apiVersion": "retransmit.dev/v1alpha1", "kind": "RetransmitTrace",
          "metadata": {"name": "shop", "resourceVersion": "7",
                       "managedFields": [{"manager": "retransmit-operator", "operation": "Apply"}]}}


def test_json_and_yaml_print_the_object_without_managed_fields():
    for form, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        printed = load(format_trace(STORED, parse_output(form)))
        assert "managedFields" not in printed["metadata"], form
        assert printed["metadata"]["resourceVersion"] == "7" and printed["status"] == STORED["status"], form
    assert "managedFields" in STORED["metadata"]       # the caller's object is left as it was


def test_name_prints_resource_dot_group_slash_name():
    assert format_trace(STORED, parse_output("name")) == "retransmittrace.retransmit.dev/shop"


@pytest.mark.parametrize("template, want", [
    ("{.status.phase}", "Running"),
    ("jsonpath='{.status.phase}'", None),              # the shell's quotes, kept by a script: stripped
    ("{.status.summary.retransmits}/{.status.summary.synackRetransmits}", "120/3"),
    ("{.status.nodes[*].node}", "node-a node-b"),
    ("{.status.nodes[-1].message}", "tracefs is not mounted"),
    ("{.status.summary.byState['SYN_RECV']}", "3"),
    ('{range .status.nodes[*]}{.node}{"\\t"}{.phase}{"\\n"}{end}', "node-a\tRunning\nnode-b\tFailed\n"),
    ("{range .status.nodes}{.node},{end}", "node-a,node-b,"),
    ("{.status.summary.topPods[0]}", json.dumps(TRACE["status"]["summary"]["topPods"][0])),
    ("{.status.noSuchField}", ""),                     # kubectl's --allow-missing-template-keys=true
    ("{.metadata.managedFields}", ""),
    ("phase {.status.phase}", "phase Running"),
])
def test_jsonpath_prints_what_the_template_selects(template, want):
    text = template if template.startswith("jsonpath=") else f"jsonpath={template}"
    assert format_trace(STORED, parse_output(text)) == (want if want is not None else "Running")


def test_wide_adds_columns_and_n_keeps_only_that_namespaces_rows():
    flow = {**TRACE["status"]["summary"]["topFlows"][0], "family": "IPv4", "firstSeen": "2026-11-30T10:00:01Z",
            "lastSeen": "2026-11-30T10:00:09Z", "socket": {"srttMicroseconds": 2500},
            "dataSegsOut": 4000, "totalRetrans": 220, "retransRatio": 0.055}
    other = {**flow, "local": {"ip": "198.18.0.3", "port": 80, "pod": "db", "namespace": "data"}, "retransmits": 20}
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "topFlows": [flow, other],
        "topPods": TRACE["status"]["summary"]["topPods"] + [{"namespace": "data", "pod": "db", "retransmits": 20}]}}}
    table_text, wide = format_trace(trace, Output("table")), format_trace(trace, parse_output("wide"))
    assert "FIRST SEEN" not in table_text and "SRTT" not in table_text and "REPORTING" not in table_text
    lines = wide.splitlines()
    header, first = lines[lines.index("TOP FLOWS") + 1:][:2]
    assert [c.strip() for c in header.split("  ") if c.strip()][-6:] == [
        "CAUSES", "FAMILY", "FIRST SEEN", "LAST SEEN", "SRTT (us)", "RETRANS/SENT"]
    assert first.split()[-5:] == ["IPv4", "2026-11-30T10:00:01Z", "2026-11-30T10:00:09Z", "2500", "220/4000"]
    assert "REPORTING" in wide and "DEPARTED" in wide
    everything = format_trace(trace, Output("table"))
    only_shop = format_trace(trace, Output("table"), namespaces=["shop"])
    assert "(data/db)" in everything and "(data/db)" not in only_shop and "(shop/web)" in only_shop
    pods = lambda text: [line.split()[:2] for line in text.split("TOP PODS\n")[1].split("\n\n")[0].splitlines()[1:]]
    assert pods(everything) == [["shop", "web"], ["data", "db"]] and pods(only_shop) == [["shop", "web"]]
    assert "retransmits 120" in only_shop              # totals stay the trace's


def test_service_node_and_outside_ends_read_as_who_has_the_address():
    assert endpoint({"ip": "198.19.0.110", "port": 80, "service": "web", "namespace": "shop",
                     "servicePort": "http"}) == "198.19.0.110:80 (service shop/web:http)"
    assert endpoint({"ip": "198.18.0.20", "port": 30080, "service": "web", "namespace": "shop", "servicePort": "http",
                     "node": "node-b"}) == "198.18.0.20:30080 (service shop/web:http on node node-b)"
    assert endpoint({"ip": "203.0.113.9", "port": 443, "outside": True}) == "203.0.113.9:443 (outside the cluster)"
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "topServices": [{"namespace": "shop", "service": "web", "retransmits": 10}]}}}
    lines = render(trace).splitlines()
    header = lines.index("TOP SERVICES (REMOTE)")
    assert lines[header + 2].split() == ["shop", "web", "10"]


def test_a_service_end_shows_the_backend_kube_proxy_chose_after_an_arrow():
    web = {"ip": "198.19.0.110", "port": 80, "service": "web", "namespace": "shop", "servicePort": "http"}
    pod = {"ip": "198.18.2.3", "port": 8080, "pod": "web-0", "namespace": "shop"}
    assert endpoint({**web, "backend": pod}) == "198.19.0.110:80 (service shop/web:http -> web-0)"
    assert endpoint({**web, "backend": {**pod, "namespace": "data"}}) == \
        "198.19.0.110:80 (service shop/web:http -> data/web-0)"
    assert endpoint({**web, "backend": {"ip": "198.18.0.20", "port": 6443, "node": "node-b"}}) == \
        "198.19.0.110:80 (service shop/web:http -> node node-b)"
    assert endpoint({**web, "backend": {"ip": "fd00::9", "port": 8080}}) == \
        "198.19.0.110:80 (service shop/web:http -> [fd00::9]:8080)"
    assert endpoint({**web, "ip": "198.18.0.20", "port": 30080, "node": "node-b", "backend": pod}) == \
        "198.19.0.110:80 (service shop/web:http on node node-b -> web-0)".replace("198.19.0.110:80", "198.18.0.20:30080")


def test_the_answer_where_comes_first_then_the_path_tables():
    pairs = [{"source": "node-a", "destination": "node-b", "retransmits": 82, "percent": 82, "retransRatio": 0.0412},
             {"source": "node-b", "destination": "outside", "retransmits": 3, "percent": 3}]
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "hotPath": "82% of retransmits went from node node-a to node node-b",
        "byNodePair": pairs}}}
    lines = render(trace).splitlines()
    assert lines[1] == "WHERE: 82% of retransmits went from node node-a to node node-b"
    header = lines.index("PATHS (NODE TO NODE)")
    assert lines[header + 1].split() == ["FROM", "TO", "RETRANSMITS", "%", "RATIO"]
    assert [line.split() for line in lines[header + 2:header + 4]] == [["node-a", "node-b", "82", "82", "4.12%"],
                                                                       ["node-b", "outside", "3", "3", "-"]]
    assert "WHERE:" not in render(TRACE) and "PATHS" not in render(TRACE)   # nothing stands out: nothing said


def test_flows_show_their_ratio_beside_the_count_and_sort_by_it_on_request():
    low = {**TRACE["status"]["summary"]["topFlows"][0], "local": {"ip": "198.18.0.2", "port": 5201},
           "dataSegsOut": 10000, "totalRetrans": 100, "retransRatio": 0.01}
    high = {**low, "local": {"ip": "198.18.0.3", "port": 80}, "retransmits": 20, "retransRatio": 0.2}
    unread = {**low, "local": {"ip": "198.18.0.4", "port": 81}, "retransmits": 50}
    del unread["retransRatio"]
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "topFlows": [low, unread, high]}}}

    def flow_rows(text):
        rows = text.split("\n\n")[2].splitlines()
        header = rows[1].split()
        return rows[0], header[header.index("RETRANSMITS"):][:2], [row.split()[1:5] for row in rows[2:]]

    title, columns, rows = flow_rows(format_trace(trace, Output("table")))
    assert title == "TOP FLOWS" and columns == ["RETRANSMITS", "RATIO"]
    assert [r[0] for r in rows] == ["198.18.0.2:5201", "198.18.0.4:81", "198.18.0.3:80"]
    assert [r[3] for r in rows] == ["1.00%", "-", "20.00%"]
    title, _, rows = flow_rows(format_trace(trace, Output("table"), sort="ratio"))
    assert title == "TOP FLOWS (by retransmit ratio)"
    assert [r[0] for r in rows] == ["198.18.0.3:80", "198.18.0.2:5201", "198.18.0.4:81"]   # unknown last
    ns = build_parser().parse_args(["show", "shop", "--sort", "ratio"])
    assert ns.sort == "ratio" and build_parser().parse_args(["show", "shop"]).sort == "retransmits"


def test_the_nodes_segment_ratio_is_beside_the_totals_and_in_each_node_row():
    trace = {**TRACE, "status": {**TRACE["status"],
                                 "summary": {**TRACE["status"]["summary"], "outSegs": 20000, "retransSegs": 300,
                                             "retransRatio": 0.015},
                                 "nodes": [{"node": "node-a", "phase": "Running", "retransmits": 120, "retransRatio": 0.02}]}}
    text = render(trace)
    assert "nodes retransmitted/sent segments 300/20000 (1.50%)" in text
    lines = text.splitlines()
    header = lines.index("NODES")
    assert lines[header + 1].split()[:5] == ["NODE", "PHASE", "RETRANSMITS", "SEGMENT", "RATIO"]
    assert lines[header + 2].split()[:4] == ["node-a", "Running", "120", "2.00%"]
    assert "retransmitted/sent" not in render(TRACE)   # no counters read: no ratio made up


def test_the_dropping_node_and_reason_lead_and_each_flow_says_where_it_was_lost():
    flow = {**TRACE["status"]["summary"]["topFlows"][0], "lossAt": "dropped on node-b (NETFILTER_DROP 37)"}
    trace = {**TRACE, "status": {**TRACE["status"], "summary": {
        **TRACE["status"]["summary"], "hotPath": "90% of retransmits went from node node-a to node node-b",
        "topDrops": [{"node": "node-b", "reason": "NETFILTER_DROP", "drops": 37}], "topFlows": [flow]}}}
    lines = render(trace).splitlines()
    assert lines[1] == ("WHERE: 90% of retransmits went from node node-a to node node-b; "
                        "most dropped on node node-b: NETFILTER_DROP 37")
    header = lines.index("TOP FLOWS")
    assert lines[header + 1].rstrip().endswith("LOST AT") and lines[header + 2].endswith("dropped on node-b (NETFILTER_DROP 37)")
    dropped = lines.index("DROPPED BY TRACED NODES")
    assert lines[dropped + 2].split() == ["node-b", "NETFILTER_DROP", "37"]
    assert "LOST AT" not in render(TRACE) and "DROPPED" not in render(TRACE)
