"""The kube-proxy harness's teardown check (tests/harness/kubeproxy.py HostState): what it
reports when the host is not as before kube-proxy started."""

from __future__ import annotations

import pytest

from tests.harness.kubeproxy import HostState, Network, cluster_cidrs

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


def _network(*prefixes: str) -> Network:
    return Network(bridge="br", prefixes=prefixes, node="n", relay_ip="198.18.0.1")


def test_one_served_network_is_its_own_cluster_cidr_pair():
    assert cluster_cidrs([_network("198.18.16.0/20", "fd00:0:2::/48")]) == ["198.18.16.0/20", "fd00:0:2::/48"]


def test_a_simulator_and_the_real_node_share_the_smallest_prefix_per_family_that_holds_both():
    # kube-proxy takes one --cluster-cidr per family: a simulator's slot 1 and the real node's.
    got = cluster_cidrs([_network("198.18.16.0/20", "fd00:0:2::/48"), _network("198.19.250.0/24", "fd00:0:250::/64")])
    assert got == ["198.18.0.0/15", "fd00::/38"]
