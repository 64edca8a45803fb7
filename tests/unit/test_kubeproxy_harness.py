"""The kube-proxy harness's teardown check (tests/harness/kubeproxy.py HostState): what it
reports when the host is not as before kube-proxy started."""

from __future__ import annotations

import pytest

from tests.harness.kubeproxy import HostState

pytestmark = pytest.mark.unit

BEFORE = HostState(tables=(), settings=(("/proc/sys/net/ipv4/ip_forward", "0"),
                                        ("/proc/sys/net/ipv4/conf/rtb1s0/forwarding", "0"),
                                        ("/sys/class/net/rtb1s0/bridge/nf_call_iptables", "0")))


def test_the_same_host_has_no_differences():
    assert BEFORE.differences(BEFORE) == []


def test_a_table_left_behind_and_a_setting_not_restored_are_each_named():
    after = HostState(tables=("ip kube-proxy",), settings=(("/proc/sys/net/ipv4/ip_forward", "0"),
                                                           ("/proc/sys/net/ipv4/conf/rtb1s0/forwarding", "1"),
                                                           ("/sys/class/net/rtb1s0/bridge/nf_call_iptables", "0")))
    assert BEFORE.differences(after) == ["nftables table ip kube-proxy left behind",
                                         "/proc/sys/net/ipv4/conf/rtb1s0/forwarding is 1, was 0"]


def test_settings_that_went_away_with_their_bridge_left_nothing_behind():
    gone = HostState(tables=(), settings=(("/proc/sys/net/ipv4/ip_forward", "0"),
                                          ("/proc/sys/net/ipv4/conf/rtb1s0/forwarding", None),
                                          ("/sys/class/net/rtb1s0/bridge/nf_call_iptables", None)))
    assert BEFORE.differences(gone) == []
