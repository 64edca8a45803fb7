"""Every Kubernetes Event and condition message the operator can produce, and the node
messages and check lines the agent puts on the resource, read as sentences a platform
engineer understands without knowing Python.

The rule (one for every message, chosen so messages compose):
- One line. A phrase, or clauses joined by ": " and "; ", with no final period: messages are
  joined into others (Degraded lists each node's message after "; "), and kubectl shows them
  in a column.
- It starts with a lowercase word, a number, a field path (spec.x.y, metadata.name) or a
  name (DaemonSet, Linux, ...), never with a Python class name.
- No Python reprs: no tuples, lists, dicts, sets or bytes ("('", "['", "{'", "', '", "b'"),
  no None/True/False, no enum reprs (Phase.FAILED), no "<... object at 0x...>", no pydantic
  wording ("Value error", "Input should", "instance of"). Values may be quoted 'like this'
  (conventions.md: "spec.filter.remoteCIDRs[1]: '10.0.0.0/33' is not a CIDR").
- Selectors are key=value pairs joined by ", ".
- A failure (a Warning Event, a False condition whose reason is a problem) names the field
  or the thing and says what to do.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from retransmit_agent.bccerrors import bcc_failure
from retransmit_agent.check import HostFacts, evaluate
from retransmit_agent.kernelinfo import TracepointLayout
from retransmit_agent.preflight import KernelProblem, find_tracefs, require_kernel_headers, require_tracepoints
from retransmit_core.api import NodeStatus, Summary
from retransmit_operator.conditions import (
    Observation, compute_status, refused_message, rolled_event, scheduled_event, transitions,
)
from retransmit_core.apierrors import describe
from retransmit_operator.kube import ApiFailure
from retransmit_operator.render import selector_text
from retransmit_core.validation import validate_trace

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)

REPR = re.compile(
    r"\('|\['|\{'|', '|\bb'|\bNone\b|\bTrue\b|\bFalse\b|\b[A-Z][a-zA-Z]+\.[A-Z][A-Z_]+\b"
    r"|object at 0x|<[a-zA-Z_.]+[ >:]|frozenset|\bset\(|\(\)|\[\]|\{\}|Value error|Input should|instance of"
    r"|\\n|Traceback")
FIX = re.compile(r"\b(use|check|fix|remove|recreate|install|run|omit|mount|report|should be|is required|"
                 r"grant|ask|delete|set|load|give|retried)\b")


def problems(message: str, *, failure: bool = False, sentence: bool = True) -> list[str]:
    """What breaks the rule in `message` (empty: it reads well)."""
    out = []
    if not message or message != message.strip() or "\n" in message:
        out.append("empty, padded or more than one line")
    found = REPR.search(message)
    if found:
        out.append(f"Python artefact {found.group(0)!r}")
    if message.count("(") != message.count(")"):
        out.append("unbalanced parentheses")
    if sentence and message.endswith("."):
        out.append("ends with a period")
    if failure and not FIX.search(message):
        out.append("a failure without a fix")
    return out


def obs(**kw):
    base = dict(generation=1, spec_error=None, start_time=T0, completion_time=None, nodes=[],
                summary=Summary(nodes_desired=2, nodes_reporting=2, nodes="2/2", retransmits=1, synack_retransmits=0),
                now=T0 + timedelta(seconds=5), namespace="retransmit-system")
    base.update(kw)
    return Observation(**base)


BAD_SPECS = [
    {"filter": {"remoteCIDRs": ["10.0.0.0/33"]}},
    {"filter": {"remoteCIDRs": "10.0.0.0/8"}},
    {"filter": {"ports": [0]}},
    {"filter": {"ports": ["http"]}},
    {"filter": {"states": ["BOGUS"]}},
    {"filter": {"ipFamilies": ["IPv5"]}},
    {"filter": None},
    {"duration": "10 minutes"},
    {"duration": "0s"},
    {"reportInterval": "100ms"},
    {"nodeSelector": {"bad key!": "x"}},
    {"nodeSelector": {"pool": "bad value!"}},
    {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}},
    {"topFlows": 0},
    {"topFlows": None},
    {"topFlows": "many"},
    {"events": {"maxPerSecond": -1}},
    {"namespaces": "shop"},
    {"namespaces": ["Kube_System"]},
    {"unknownField": 1},
]


def spec_errors() -> list[str]:
    errors = [validate_trace("shop", spec)[1] for spec in BAD_SPECS]
    errors.append(validate_trace("x" * 60, {})[1])
    errors.append(refused_message("shop", 'DaemonSet.apps "rtrace-shop" is invalid: spec.template.spec.tolerations[0]'
                                          '.key: Invalid value: "a b": name part must consist of alphanumeric characters'))
    assert all(errors), "every bad spec above is refused"
    return errors


def node_messages(tmp_path: Path, monkeypatch) -> list[str]:
    """What the agent writes as a failed node's message: its KernelProblems."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    out = []
    for attempt in (lambda: find_tracefs(str(tmp_path / "nowhere")), lambda: require_tracepoints(tmp_path),
                    lambda: require_kernel_headers("0.0.0-none")):
        with pytest.raises(KernelProblem) as e:
            attempt()
        out.append(str(e.value))
    out.append(str(bcc_failure(Exception("Failed to load BPF program b'tcp_retransmit_skb': Invalid argument"),
                               ["R1 invalid mem access 'scalar'"])))
    out.append(str(bcc_failure(Exception("Failed to compile BPF module b'/x/retransmit.bpf.c'"),
                               ["/x/retransmit.bpf.c:3:1: error: no member named 'err'"])))
    out.append(str(bcc_failure(Exception("Failed to load BPF program b'tcp_retransmit_skb'"),
                               ["bpf: Failed to load program: Operation not permitted"])))
    return out


def every_status_and_event(tmp_path, monkeypatch) -> list[tuple[str, str, str, bool]]:
    """(where, reason, message, is a failure) for every condition and Event of representative passes."""
    failed_nodes = [NodeStatus(node=f"node-{c}", phase="Failed", message=m)
                    for c, m in zip("bcdefg", node_messages(tmp_path, monkeypatch))]
    two = Summary(nodes_desired=3, nodes_reporting=1, nodes="1/3")
    observations = [
        obs(start_time=None, summary=Summary()),                                           # pending
        obs(nodes_desired_known=False),                                                     # scheduling
        obs(summary=Summary(nodes_desired=0, nodes="0/0")),                                 # no matching nodes
        obs(summary=two),                                                                   # starting
        obs(summary=two, stale_nodes=["node-b"], stale_after=timedelta(seconds=45)),        # one silent
        obs(summary=two, stale_nodes=["node-b", "node-c"], stale_after=timedelta(seconds=45)),
        obs(summary=two, stale_nodes=["node-b"], stale_after=None, namespace=""),
        obs(),                                                                              # all reporting
        obs(nodes=failed_nodes[:1]),                                                        # one failed
        obs(nodes=failed_nodes + [NodeStatus(node="node-z", phase="Failed")]),              # many failed
        obs(completion_time=T0 + timedelta(minutes=5)),                                     # completed
        obs(completion_time=T0 + timedelta(minutes=5), summary=Summary(retransmits=1, synack_retransmits=1)),
    ] + [obs(spec_error=e) for e in spec_errors()]
    out = []
    for o in observations:
        status = compute_status(o, [])
        for c in status.conditions:
            problem = c.status == "False" and c.reason not in ("Pending", "DaemonSetPending", "AgentsScheduling",
                                                               "AgentsStarting", "TraceCompleted", "NoNodeFailed")
            problem = problem or (c.type == "Degraded" and c.status == "True")
            out.append((f"condition {c.type}", c.reason, c.message, problem))
        for type_, reason, message in transitions(None, status):
            out.append((f"Event {type_}", reason, message, type_ == "Warning"))
    # The events the reconciler makes itself.
    for type_, reason, message in (scheduled_event("retransmit-system", "rtrace-shop",
                                                   selector_text({"kubernetes.io/hostname": "node-b",
                                                                  "kubernetes.io/os": "linux"})),
                                   rolled_event("retransmit-system", "rtrace-shop")):
        out.append((f"Event {type_}", reason, message, False))
    return out


def test_every_event_and_condition_message_reads_as_a_sentence(tmp_path, monkeypatch):
    rendered = every_status_and_event(tmp_path, monkeypatch)
    reasons = {reason for _, reason, _, _ in rendered}
    # The representative passes reach every reason the operator sets.
    assert {"Pending", "AgentsScheduling", "NoMatchingNodes", "AgentsStarting", "AgentsNotReporting",
            "AllAgentsReporting", "Running", "NodesFailed", "NodeFailed", "NoNodeFailed", "Completed",
            "TraceCompleted", "InvalidSpec", "AgentsReady", "AgentsScheduled", "AgentsUpdated"} <= reasons
    bad = [(where, reason, message, problems(message, failure=failure))
           for where, reason, message, failure in rendered if problems(message, failure=failure)]
    assert bad == []


def test_selectors_read_as_key_value_pairs():
    _, _, message = scheduled_event("retransmit-system", "rtrace-shop",
                                    selector_text({"kubernetes.io/os": "linux", "kubernetes.io/hostname": "node-b"}))
    assert message.endswith("matching kubernetes.io/hostname=node-b, kubernetes.io/os=linux")


@pytest.mark.parametrize("spec, expected", [
    ({"filter": {"remoteCIDRs": ["10.0.0.0/33"]}}, "spec.filter.remoteCIDRs[0]: '10.0.0.0/33' is not a CIDR"),
    ({"filter": {"states": ["BOGUS"]}}, "spec.filter.states[0]: should be ESTABLISHED, SYN_SENT,"),
    ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector[bad key!]: 'bad key!' is not a label key"),
    ({"duration": "10 minutes"}, "spec.duration: '10 minutes' is not a duration: use a number and a unit"),
    ({"topFlows": None}, "spec.topFlows: should be a whole number (got null)"),
    ({"filter": None}, "spec.filter: should be an object (key: value) (got null)"),
    ({"unknownField": 1}, "spec.unknownField: is not a field here: remove it"),
])
def test_spec_errors_name_the_field_the_value_and_the_fix(spec, expected):
    assert validate_trace("shop", spec)[1].startswith(expected)


def test_the_agents_node_messages_carry_no_bytes_reprs(tmp_path, monkeypatch):
    for message in node_messages(tmp_path, monkeypatch):
        assert problems(message, failure=True) == [], message


def test_api_failures_read_as_one_line_with_the_fix():
    forbidden = ApiFailure("apply status", 403, "Forbidden", 'retransmittraces.retransmit.dev "shop" is forbidden')
    assert str(forbidden).startswith("apply status failed (HTTP 403 Forbidden): ")
    assert "ClusterRole" in str(forbidden)
    body = '{"kind":"Status","message":"too old resource version: 1 (2)","code":410}'
    assert describe(ApiException(status=410, reason="Gone")) == "HTTP 410 Gone"
    err = ApiException(status=410, reason="Gone")
    err.body = body
    assert describe(err) == "HTTP 410 too old resource version: 1 (2)"
    refused = ConnectionRefusedError(111, "Connection refused")
    assert describe(refused) == "the API server did not answer: connection refused"
    for message in (str(forbidden), str(ApiFailure("list node reports", 503, "NotListed", "not listed yet"))):
        assert problems(message, failure=True) == [], message


def test_the_kernel_check_lines_carry_no_python_reprs():
    """Check lines are a table ("FAIL name: detail -> fix"), not sentences; still no reprs."""
    facts = HostFacts(release="4.9.0", tracefs=None, tracefs_how="not mounted",
                      tracepoints={"tcp_retransmit_skb": False, "tcp_retransmit_synack": False},
                      layout=TracepointLayout(skb=frozenset(), synack=frozenset()), btf_problem="no /sys/kernel/btf/vmlinux",
                      ringbuf=None, jiffies64=None, capabilities=0, headers=None, bcc_version=None,
                      bcc_has_ringbuf_api=False, misses_counted=False)
    for line in evaluate(facts):
        assert problems(line.detail, sentence=False) == [], line.render()
        if line.status == "fail":
            assert problems(line.fix, failure=True, sentence=False) == [], line.render()
