"""What gets past the CRD schema meets the same models in the operator: every refusal names
the field (as a spec path) and, for the problems a user makes most, the fix."""

from __future__ import annotations

import pytest

from retransmit_core.api import RetransmitTraceSpec, to_api
from retransmit_core.validation import validate_trace

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("spec, field, hint", [
    ({"duration": "banana"}, "spec.duration", "banana"),
    ({"duration": "0s"}, "spec.duration", "omit duration"),
    ({"reportInterval": "500ms"}, "spec.reportInterval", "use '1s' or more"),
    ({"reportInterval": "10"}, "spec.reportInterval", "'10'"),
    ({"topFlows": 0}, "spec.topFlows", "greater than or equal to 1"),
    ({"topFlows": 101}, "spec.topFlows", "less than or equal to 100"),
    ({"events": {"keep": 500}}, "spec.events.keep", "less than or equal to 100"),
    ({"events": {"maxPerSecond": -1}}, "spec.events.maxPerSecond", "greater than or equal to 0"),
    ({"filter": {"ports": [0]}}, "spec.filter.ports[0]", "greater than or equal to 1"),
    ({"filter": {"ports": [80, 70000]}}, "spec.filter.ports[1]", "less than or equal to 65535"),
    ({"filter": {"remoteCIDRs": ["10.0.0.0/8", "1:::2/64"]}}, "spec.filter.remoteCIDRs[1]", "is not a CIDR"),
    ({"filter": {"remoteCIDRs": ["10.0.0.0/33"]}}, "spec.filter.remoteCIDRs[0]", "ADDRESS/PREFIX"),
    ({"filter": {"states": ["ESTABLISHED", "TCP_SYN_SENT"]}}, "spec.filter.states[1]", "should be ESTABLISHED, SYN_SENT,"),
    ({"filter": {"ipFamilies": ["IPv5"]}}, "spec.filter.ipFamilies[0]", "should be IPv4 or IPv6 (got 'IPv5')"),
    ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector[bad key!]", "not a label key"),
    ({"nodeSelector": {"zone": "no spaces"}}, "spec.nodeSelector[zone]", "not a label value"),
    ({"podSelector": {"matchLabels": {"app": "-x"}}}, "spec.podSelector.matchLabels[app]", "not a label value"),
    ({"podSelector": {"matchExpressions": [{"key": "a b", "operator": "In", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].key", "not a label key"),
    ({"tolerations": [{"operator": "Sometimes"}]}, "spec.tolerations[0].operator", "should be Exists or Equal"),
    ({"namespaces": ["Kube_System"]}, "spec.namespaces[0]", "Kube_System"),
    ({"surprise": True}, "spec.surprise", "is not a field here: remove it"),
])
def test_invalid_spec_message_names_the_field(spec, field, hint):
    parsed, error = validate_trace("t", spec)
    assert parsed is None
    assert error.startswith(field + ":") or error.startswith(field + "."), error
    assert hint in error


def test_overlong_name_is_refused_with_the_limit_and_fix():
    parsed, error = validate_trace("n" * 57, {})
    assert parsed is None and "metadata.name" in error and "at most 56" in error


@pytest.mark.parametrize("name", ["a.b", "Shop", "-x"])
def test_a_name_that_is_no_dns_label_is_refused_because_report_names_could_collide(name):
    parsed, error = validate_trace(name, {})
    assert parsed is None and error.startswith(f"metadata.name: {name!r} is not a DNS label") and "no dots" in error


def test_empty_and_missing_spec_mean_all_defaults():
    for raw in (None, {}):
        spec, error = validate_trace("t", raw)
        assert error is None
        assert spec.report_interval == "10s" and spec.top_flows == 10 and spec.duration is None
        assert set(spec.filter.ip_families) == {"IPv4", "IPv6"}


def test_full_valid_spec_round_trips_through_the_api_form():
    raw = {
        "duration": "1m30s", "reportInterval": "2s", "topFlows": 5,
        "nodeSelector": {"kubernetes.io/hostname": "node-a"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
        "namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}},
        "filter": {"ipFamilies": ["IPv6"], "ports": [443], "remoteCIDRs": ["fd00::/8"], "states": ["SYN_SENT"]},
        "events": {"maxPerSecond": 10, "keep": 5},
    }
    spec, error = validate_trace("t", raw)
    assert error is None and spec.duration_seconds == 90.0
    assert RetransmitTraceSpec.model_validate(to_api(spec)) == spec
