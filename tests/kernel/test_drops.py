"""Drops by reason beside the retransmits (skb:kfree_skb, Linux 5.17+), on the real kernel.

References: the nftables rule's own counter for the packets it dropped (NETFILTER_DROP), and
the namespace's TcpExt counters for a receiver whose buffer is too small (TCPRcvQDrop and
TCPOFODrop are counted exactly where the kernel drops with PROTO_MEM: tcp_data_queue and
tcp_data_queue_ofo). Only the server's addresses are traced (the local-IP filter), so every
count is of the test's own flows, whatever else the machine does.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from retransmit_agent.btf import Btf
from retransmit_agent.drops import reason_names
from retransmit_agent.kernel import KernelConfig, RetransmitProgram
from tests.harness import loads
from tests.harness.oldlayout import OldLayoutAgent

pytestmark = pytest.mark.kernel


def nft_dropped(ns) -> int:
    """Packets the namespace's counted drop rule dropped (its `counter packets N`)."""
    text = ns.exec("nft", "list", "chain", "inet", ns.table, "input")
    counts = [int(n) for n in re.findall(r"counter packets (\d+)", text)]
    assert counts, text
    return sum(counts)


def tcp_ext(ns) -> dict[str, int]:
    lines = [line.split() for line in ns.exec("cat", "/proc/net/netstat").splitlines() if line.startswith("TcpExt:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


def run_driver(ns, module: str, *args: str) -> list[dict]:
    """Run a traffic driver in the namespace to its end; its last line lists the connections."""
    proc = ns.python(module, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def within_misses(ours: int, reference: int, missed: int) -> bool:
    """Our count equals the reference's, short by at most the kfree_skb hits the kernel did not
    run the program for (recursion protection, counted since 6.7)."""
    return ours <= reference <= ours + missed


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_netfilter_drops_of_the_traced_flows_equal_the_nft_rules_counter(ns, family):
    client, server = ns.v4 if family == "IPv4" else ns.v6
    port = 5401
    # 10% of the client's data segments to the server dropped on input, counted by the rule
    match = "ip" if family == "IPv4" else "ip6"
    ns.nft(f"flush chain inet {ns.table} input\n"
           f"add rule inet {ns.table} input {match} saddr {client} tcp dport {port} tcp flags & syn == 0 "
           f"numgen random mod 100 < 10 counter drop\n")
    with RetransmitProgram.open(KernelConfig(local_ips=frozenset({server}))) as program:
        assert program.counts_drops, program.drop_support
        flows = run_driver(ns, "tests.harness.traffic", "bulk", "--server-ip", server, "--client-ip", client, "--port", str(port),
                               "--connections", "3", "--bytes", str(1 << 20))
        snap = program.snapshot()
    dropped = nft_dropped(ns)
    assert dropped > 0, "the rule dropped nothing: the test proves nothing"
    drops = snap.drops
    assert within_misses(drops.by_reason.get("NETFILTER_DROP", 0), dropped, drops.missed), (drops, dropped)
    # per flow: each connection's drops are inbound to the server, keyed from the server's end
    # (the sender's retransmitting flow reversed), and add up to the rule's counter too
    clients = {(c["client"][0], c["client"][1]) for c in flows}
    per_flow = {(f.remote_ip, f.remote_port): f for f in drops.flows if f.by_reason.get("NETFILTER_DROP")}
    assert set(per_flow) <= clients and per_flow
    assert all(f.local_ip == server and f.local_port == port and f.family == family and f.outbound == 0
               for f in per_flow.values())
    assert within_misses(sum(f.by_reason["NETFILTER_DROP"] for f in per_flow.values()), dropped, drops.missed)
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
