"""Drops by reason beside the retransmits (skb:kfree_skb, Linux 5.17+), on the real kernel.

References: the nftables rule's own counter for the packets it dropped (NETFILTER_DROP), and
the namespace's TcpExt counters for a receiver whose buffer is too small (TCPRcvQDrop and
TCPOFODrop are counted exactly where the kernel drops with PROTO_MEM: tcp_data_queue and
tcp_data_queue_ofo). Only the server's addresses are traced (the local-IP filter), so every
count is of the test's own flows, whatever else the machine does.
"""

from __future__ import annotations

import pytest

from retransmit_agent.btf import Btf
from retransmit_agent.drops import reason_names
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness import loads
from tests.harness.dropcheck import drop_client_data, netfilter_drop_mismatches, nft_dropped, run_driver, within_misses
from tests.harness.oldlayout import OldLayoutAgent

pytestmark = pytest.mark.kernel


def tcp_ext(ns) -> dict[str, int]:
    lines = [line.split() for line in ns.exec("cat", "/proc/net/netstat").splitlines() if line.startswith("TcpExt:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_netfilter_drops_of_the_traced_flows_equal_the_nft_rules_counter(ns, family):
    client, server = ns.v4 if family == "IPv4" else ns.v6
    port = 5401
    drop_client_data(ns, client, server, port, percent=10)
    with RetransmitProgram.open(KernelConfig(local_ips=frozenset({server}))) as program:
        assert program.counts_drops, program.drop_support
        flows = run_driver(ns, "tests.harness.traffic", "bulk", "--server-ip", server, "--client-ip", client, "--port", str(port),
                               "--connections", "3", "--bytes", str(1 << 20))
        snap = program.snapshot()
    dropped = nft_dropped(ns)
    drops = snap.drops
    # NETFILTER_DROP equals the rule's counter, in total and summed over the flows, each
    # inbound to the server and keyed from the server's end
    assert netfilter_drop_mismatches(drops, dropped, flows, server, port, family) == [], (drops, dropped)
    # the kernel's other reasons for these flows are the kernel's own names
    names = set(reason_names(Btf.load().enum("skb_drop_reason")).values())
    assert set(drops.by_reason) <= names


def test_a_receiver_with_a_tiny_buffer_drops_with_the_kernels_memory_reason(ns):
    client, server = ns.v4
    before = tcp_ext(ns)
    with RetransmitProgram.open(KernelConfig(local_ips=frozenset({server}))) as program:
        flows = run_driver(ns, "tests.harness.slowreader", "--server-ip", server, "--client-ip", client,
                           "--port", "5402", "--connections", "4", "--bytes", str(4 << 20))
        snap = program.snapshot()
    after = tcp_ext(ns)
    memory = (after["TCPRcvQDrop"] - before["TCPRcvQDrop"]) + (after["TCPOFODrop"] - before["TCPOFODrop"])
    drops = snap.drops
    names = set(reason_names(Btf.load().enum("skb_drop_reason")).values())
    assert drops.by_reason and set(drops.by_reason) <= names, drops.by_reason
    # Linux 6.x drops for want of receive memory as PROTO_MEM, exactly where TcpExt counts
    # TCPRcvQDrop (in order) and TCPOFODrop (out of order)
    assert memory > 0, "the receiver dropped nothing for memory: the test proves nothing"
    assert within_misses(drops.by_reason.get("PROTO_MEM", 0), memory, drops.missed), (drops.by_reason, memory)
    clients = {(c["client"][0], c["client"][1]) for c in flows}
    assert {(f.remote_ip, f.remote_port) for f in drops.flows} <= clients
    assert all(f.local_ip == server and f.inbound == f.drops for f in drops.flows)


def test_a_kernel_without_the_reason_field_counts_no_drops_and_check_says_why(ns):
    with OldLayoutAgent(drop=("reason",), remote_cidrs=loads.own_cidrs(ns)) as agent:
        assert "error" not in agent.attached, agent.attached.get("error")
        assert any(path.endswith("kfree_skb/format") for path in agent.attached["masked"])
        assert agent.attached["counts_drops"] is False
        assert "-DHAVE_DROP_REASONS" not in " ".join(agent.attached["switches"])
        assert "kfree_skb" not in agent.attached["instructions"]
        line = agent.attached["checks"]["drop reasons"]
        assert line.startswith("DEGRADED") and "no `reason` field (added in Linux 5.17)" in line, line
        # retransmits are counted as before
        loads.bulk(ns, loss=10, family="IPv4", port=5403, connections=1, nbytes=1 << 20)
        result = agent.finish()
    assert result["drops"] is None
    assert result["retransmits"] > 0
