"""Command-line values parsed into a KernelConfig; errors name the option, the value and the fix."""

from __future__ import annotations

import pytest

from retransmit_agent.filters import (
    UsageError,
    kernel_config,
    parse_cidr,
    parse_count,
    parse_family,
    parse_port,
    parse_seconds,
    parse_state,
)
from retransmit_agent.kernel import KernelConfig
from retransmit_core.api import RetransmitTraceSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,family", [("IPv4", "IPv4"), ("ipv6", "IPv6"), ("4", "IPv4"), ("v6", "IPv6")])
def test_family_spellings(text, family):
    assert parse_family(text) == family


@pytest.mark.parametrize("text,state", [("ESTABLISHED", "ESTABLISHED"), ("established", "ESTABLISHED"),
                                        ("TCP_SYN_SENT", "SYN_SENT"), ("fin-wait1", "FIN_WAIT1")])
def test_state_spellings(text, state):
    assert parse_state(text) == state


def test_cidr_is_canonicalised_and_a_bare_address_is_a_host_route():
    assert parse_cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert parse_cidr("fd00::5") == "fd00::5/128"


@pytest.mark.parametrize("parse,text,words", [
    (parse_family, "IPX", ["--family", "'IPX'", "IPv4 or IPv6"]),
    (parse_port, "0", ["--port", "'0'", "1 to 65535"]),
    (parse_port, "http", ["--port", "'http'"]),
    (parse_cidr, "10.0.0.0/33", ["--remote-cidr", "'10.0.0.0/33'", "ADDRESS/PREFIX"]),
    (parse_state, "OPEN", ["--state", "'OPEN'", "ESTABLISHED", "SYN_SENT"]),
])
def test_errors_name_option_value_and_fix(parse, text, words):
    with pytest.raises(UsageError) as err:
        parse(text)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_durations_and_counts():
    assert parse_seconds("--duration", "1m30s") == 90
    with pytest.raises(UsageError, match="--duration 'banana': not a duration"):
        parse_seconds("--duration", "banana")
    with pytest.raises(UsageError, match="longer than 0s"):
        parse_seconds("--interval", "0s")
    assert parse_count("--top", "0") == 0
    with pytest.raises(UsageError, match="--top '-2'"):
        parse_count("--top", "-2")


def test_kernel_config_from_repeatable_options():
    config = kernel_config(families=["ipv6"], ports=["443", "80", "443"], remote_cidrs=["10.0.0.0/8", "10.1.0.0/8"],
                           states=["established"], samples_per_second=7, flow_capacity=64)
    assert config == KernelConfig(families=frozenset({"IPv6"}), ports=frozenset({80, 443}),
                                  remote_cidrs=("10.0.0.0/8",), states=frozenset({"ESTABLISHED"}),
                                  samples_per_second=7, flow_capacity=64)


def test_no_options_mean_no_restriction():
    config = kernel_config()
    assert config.families == frozenset({"IPv4", "IPv6"})
    assert not config.ports and not config.remote_cidrs and not config.states and config.local_ips is None


def test_kernel_config_from_a_trace_spec():
    spec = RetransmitTraceSpec.model_validate({
        "filter": {"ipFamilies": ["IPv4"], "ports": [8080], "remoteCIDRs": ["fd00::/8"], "states": ["SYN_SENT"]},
        "events": {"maxPerSecond": 0},
    })
    config = KernelConfig.from_spec(spec, local_ips={"10.0.0.5"})
    assert config.families == frozenset({"IPv4"}) and config.ports == frozenset({8080})
    assert config.remote_cidrs == ("fd00::/8",) and config.states == frozenset({"SYN_SENT"})
    assert config.local_ips == frozenset({"10.0.0.5"}) and config.samples_per_second == 0
    assert KernelConfig.from_spec(RetransmitTraceSpec()).local_ips is None


@pytest.mark.parametrize("kwargs", [{"families": frozenset()}, {"ports": frozenset({0})},
                                    {"remote_cidrs": ("nope",)}, {"states": frozenset({"OPEN"})},
                                    {"local_ips": frozenset({"10.0.0.300"})}, {"ring_pages": 3},
                                    {"flow_capacity": 0}])
def test_kernel_config_rejects_impossible_values(kwargs):
    with pytest.raises(ValueError):
        KernelConfig(**kwargs)
