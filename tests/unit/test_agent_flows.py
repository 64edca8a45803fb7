"""Decoding kernel map keys, states and timestamps into flows and events."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from retransmit_core.api import format_endpoint
from retransmit_agent.flows import (
    AF_INET,
    AF_INET6,
    decode_address,
    encode_address,
    flow_counters,
    ktime_to_datetime,
    recent_event,
    state_name,
)

pytestmark = pytest.mark.unit


def test_ipv4_address_uses_the_first_four_network_order_bytes():
    raw = bytes([10, 1, 2, 3]) + bytes(12)
    assert decode_address(AF_INET, raw) == "10.1.2.3"


def test_ipv6_address_decodes_all_sixteen_bytes_in_canonical_form():
    raw = bytes.fromhex("fd000000000000000000000000000001")
    assert decode_address(AF_INET6, raw) == "fd00::1"


def test_encode_is_the_inverse_of_decode():
    for ip, family in (("198.18.0.7", AF_INET), ("fd00:12::34", AF_INET6)):
        assert decode_address(family, encode_address(ip)) == ip


def test_unknown_family_is_rejected_by_name():
    with pytest.raises(ValueError, match="AF_INET"):
        decode_address(7, bytes(16))


@pytest.mark.parametrize("number,name", [(1, "ESTABLISHED"), (2, "SYN_SENT"), (3, "SYN_RECV"),
                                         (4, "FIN_WAIT1"), (9, "LAST_ACK"), (12, "NEW_SYN_RECV"),
                                         (13, "BOUND_INACTIVE")])
def test_state_numbers_follow_the_kernel_enum(number, name):
    assert state_name(number) == name


def test_state_numbers_outside_the_enum_have_no_name():
    assert state_name(0) is None and state_name(14) is None


def test_ktime_converts_with_the_wall_clock_offset_to_aware_utc():
    offset = 1_700_000_000 * 10**9 - 5 * 10**9   # wall clock minus monotonic
    when = ktime_to_datetime(5 * 10**9 + 250_000_000, offset)
    assert when == datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=timezone.utc)


def test_flow_counters_from_a_map_entry():
    flow = flow_counters(AF_INET6, encode_address("fd00::1"), encode_address("fd00::2"), 443, 51000,
                         7, 2, 10**9, 3 * 10**9, 1, offset_ns=0)
    assert flow.key == ("IPv6", "fd00::1", 443, "fd00::2", 51000)
    assert (flow.retransmits, flow.synack_retransmits, flow.total) == (7, 2, 9)
    assert flow.last_state == "ESTABLISHED"
    assert (flow.last_seen - flow.first_seen).total_seconds() == 2
    api = flow.to_flow()
    assert api.local.ip == "fd00::1" and api.remote.port == 51000 and api.family == "IPv6"


def test_recent_event_from_sample_fields():
    event = recent_event(2 * 10**9, AF_INET, 1, 3, 8080, 40000, bytes([198, 18, 0, 1]) + bytes(12),
                         bytes([198, 18, 0, 2]) + bytes(12), offset_ns=0)
    assert event.kind == "synack" and event.state == "SYN_RECV" and event.family == "IPv4"
    assert (event.local.ip, event.local.port, event.remote.ip, event.remote.port) == ("198.18.0.1", 8080, "198.18.0.2", 40000)
    assert event.time == datetime(1970, 1, 1, 0, 0, 2, tzinfo=timezone.utc)


@pytest.mark.parametrize("ip,port,text", [("10.0.0.1", 80, "10.0.0.1:80"), ("fd00::1", 443, "[fd00::1]:443")])
def test_format_endpoint_brackets_ipv6(ip, port, text):
    assert format_endpoint(ip, port) == text
